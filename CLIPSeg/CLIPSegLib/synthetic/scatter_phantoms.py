"""Phantom family B: B-mode images simulated from point scatterers, a pulse and a beam.

Family A (``phantoms``) multiplies an echogenicity map by Gaussian speckle. Family B forms the echoes instead, so a
model that learnt A's texture meets images made by a different model of the physics. Same findings, phrasings,
exclusivity rules, ``Phantom`` type and array layout as family A: 2D ``[J, I]`` or 3D ``[K, J, I]`` (slice, depth,
lateral), spacing in mm in array order; the beam travels down J.

1. Tissue properties on the image grid: echo amplitude (reflectivity), scatterer density (mean scatterers per fine
   sample) and round-trip attenuation (dB/mm). Superficial layers (skin, fat, strap muscle) with specular
   interfaces (coherent bright lines); findings: hypoechoic solid nodule with an irregular margin (low
   reflectivity), anechoic cyst (no scatterers, almost no attenuation), calcifications (strong reflectors that
   attenuate heavily).
2. Beam coordinates: the beam may be steered a few degrees in the J-I plane (the grid is sheared so that the
   beam runs down the rows); depth is sampled ``UPSAMPLE`` times finer so the RF carrier is resolved.
3. Scatterers: a Poisson number per fine sample, summed with random signs (random phase), amplitude scaled by the
   reflectivity. Dense tissue gives fully developed (Rayleigh) speckle; sparse tissue (few scatterers per
   resolution cell) partially developed, K-like speckle. Sparse strong point scatterers with Pareto (heavy-tailed)
   amplitudes sit in the tissue: bright dots that are *not* calcifications (no mask, no shadow).
4. Each echo is attenuated by the attenuation integral along its path (cumulative sum down the beam): shadows
   behind calcifications and enhancement behind cysts come out of it, not painted in.
5. RF = (echoes + electronic noise) convolved with the PSF: a Gaussian-modulated cosine pulse axially (FFT
   convolution) and Gaussian beam profiles laterally and in elevation; envelope = ``|hilbert(RF)|`` along depth,
   block-averaged back to the image grid.
6. Time-gain compensation that undoes the attenuation only roughly (wrong slope, a wobble), a focal gain bump, a
   near-field band of reverberation lines and clutter haze.
7. Dynamic-range compression: log with a 40-70 dB display range, or a power law.

Everything is drawn from ``numpy.random.default_rng(seed)``: a seed gives the same case on every machine.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage, signal

from .phantoms import (FINDINGS, PHRASES, Phantom, ellipsoid_distance, grid_mm, place_centre,
                       random_rotation)

UPSAMPLE = 3  # fine depth samples per image row: the RF carrier gets 4-6 samples per period
_EPS = 1e-12


def _smooth_field(rng, shape, sigma_px):
    """Zero-mean, unit-std smooth Gaussian random field (float32) of ``shape``; ``sigma_px`` per axis, in voxels."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma_px)
    return f / (f.std() + 1e-8)


def _shear(arrays, t, order, inverse=False, mode="nearest"):
    """Shear each ``[..., J, I]`` array so that beam row j is shifted by ``j * t`` voxels along I (beam
    coordinates); ``inverse`` maps back to the image grid. ``t == 0`` returns the arrays unchanged."""
    if t == 0:
        return arrays
    nd = arrays[0].ndim
    m = np.eye(nd)
    m[nd - 1, nd - 2] = -t if inverse else t  # input (j, i) = output (j, i + j*t)
    return [ndimage.affine_transform(a, m, order=order, mode=mode).astype(a.dtype, copy=False) for a in arrays]


def _pulse(dz_mm, sigma_mm, period_mm):
    """Axial pulse-echo impulse response sampled every ``dz_mm``: Gaussian envelope (std ``sigma_mm``) x cosine of
    ``period_mm`` (the carrier's period along depth, half the wavelength for a round trip). 1D float32."""
    half = int(np.ceil(4.5 * sigma_mm / dz_mm))
    t = np.arange(-half, half + 1, dtype=np.float64) * dz_mm
    return (np.exp(-0.5 * (t / sigma_mm) ** 2) * np.cos(2 * np.pi * t / period_mm)).astype(np.float32)


def _tgc_db(rng, depth_mm, alpha_db_mm):
    """Time-gain compensation (dB) per depth ``depth_mm`` [J]: an imperfect estimate of the tissue attenuation
    slope, a smooth wobble from a few slider points, a focal-zone bump."""
    d_max = float(depth_mm[-1]) + 1e-6
    slope = alpha_db_mm * rng.uniform(0.75, 1.15)
    knots = np.linspace(0.0, d_max, 6)
    wobble = np.interp(depth_mm, knots, rng.uniform(-3.0, 3.0, size=6))
    focus = rng.uniform(0.3, 0.7) * d_max
    bump = rng.uniform(1.0, 4.0) * np.exp(-0.5 * ((depth_mm - focus) / (0.15 * d_max)) ** 2)
    return slope * depth_mm + wobble + bump


def make_scatter_phantom(
    shape=(256, 256),
    spacing=None,
    seed: int = 0,
    findings: tuple[str, ...] | None = None,
    p_finding: float = 0.55,
    steer_deg: float | None = None,
) -> Phantom:
    """Generate one family-B phantom.

    shape: ``(J, I)`` for a 2D image or ``(K, J, I)`` for a volume, in voxels.
    spacing: mm per voxel in the same order; default 0.25 mm in-plane and 0.6 mm between slices.
    findings: which findings to draw; ``None`` draws each independently with probability ``p_finding`` (as family
      A does, so absent findings are as frequent).
    steer_deg: beam steering angle in the J-I plane (degrees); ``None``: 0 in 60% of cases, else 4-12 either way.
    Returns a ``Phantom`` (image float32 in 0..255-like units, masks bool of the image's shape).
    """
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in shape)
    ndim = len(shape)
    if ndim not in (2, 3) or min(shape) < 1:
        raise ValueError(f"shape must be (J, I) or (K, J, I) with positive sizes, got {shape}")
    if spacing is None:
        spacing = (0.25, 0.25) if ndim == 2 else (0.6, 0.25, 0.25)
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim or min(spacing) <= 0:
        raise ValueError(f"spacing must give a positive mm size for each of the {ndim} axes, got {spacing}")
    if findings is None:
        findings = tuple(f for f in FINDINGS if rng.random() < p_finding)
    unknown = set(findings) - set(FINDINGS)
    if unknown:
        raise ValueError(f"unknown findings {sorted(unknown)}; expected some of {FINDINGS}")
    if steer_deg is None:
        steer_deg = 0.0 if rng.random() < 0.6 else float(rng.choice([-1, 1]) * rng.uniform(4.0, 12.0))

    coords = grid_mm(shape, spacing)
    ax = ndim - 2  # depth axis (rows)
    lat = [a for a in range(ndim) if a != ax]
    depth = coords[ax]

    # 1. tissue: layers below the skin, separated by undulating interfaces (depth profiles over the lateral plane)
    refl_t, alpha_t = rng.uniform(0.8, 1.2), rng.uniform(0.3, 0.8)  # echo amplitude; dB/mm round trip
    density_t = float(np.exp(rng.uniform(np.log(0.03), np.log(3.0))))  # scatterers per fine sample
    lat_shape = [shape[a] for a in lat]
    n_interfaces = int(rng.integers(1, 4))
    tops = np.sort(rng.uniform(1.5, min(14.0, 0.4 * shape[ax] * spacing[ax]), size=n_interfaces))
    interface_d = []  # signed distance (mm) below each interface, image grid
    for top in tops:
        undulation = _smooth_field(rng, lat_shape, [rng.uniform(4.0, 12.0) / spacing[a] for a in lat])
        z = top + rng.uniform(0.2, 1.2) * undulation
        interface_d.append((depth - np.expand_dims(z, ax)).astype(np.float32))
    layer = sum((d > 0).astype(np.int8) for d in interface_d)  # 0 = skin/fat ... n = gland
    layer_refl = np.append(rng.uniform(0.5, 1.6, size=n_interfaces), 1.0) * refl_t
    layer_dens = np.append(np.exp(rng.uniform(-1.0, 1.0, size=n_interfaces)), 1.0) * density_t
    layer_alpha = np.append(rng.uniform(0.7, 1.5, size=n_interfaces), 1.0) * alpha_t
    texture = _smooth_field(rng, shape, [rng.uniform(1.0, 3.0) / s for s in spacing])
    refl = layer_refl[layer] * (1.0 + rng.uniform(0.05, 0.3) * np.tanh(texture))
    dens = layer_dens[layer].astype(np.float32)
    alpha = layer_alpha[layer].astype(np.float32)

    # findings (truth masks) and their acoustic properties
    masks: dict[str, np.ndarray] = {}
    taken: list = []
    if "nodule" in findings:
        r = rng.uniform(4.0, 10.0)
        c = place_centre(rng, shape, spacing, r * 1.2, 1.0, taken, 2.0)
        if c is not None:
            radii = [r * rng.uniform(0.6, 1.0) for _ in range(ndim)]
            d = ellipsoid_distance(coords, c, radii, random_rotation(rng, ndim))
            margin = _smooth_field(rng, shape, [rng.uniform(0.8, 2.0) / s for s in spacing])
            m = d < 1.0 + rng.uniform(0.0, 0.2) * np.tanh(margin)  # irregular / microlobulated margin, <= 1.2 r
            inner = _smooth_field(rng, shape, [0.8 / s for s in spacing])
            refl = np.where(m, refl_t * rng.uniform(0.2, 0.55) * (1.0 + 0.3 * np.tanh(inner)), refl)
            dens = np.where(m, density_t * rng.uniform(0.3, 1.5), dens)
            alpha = np.where(m, alpha_t * rng.uniform(0.9, 1.4), alpha)
            masks["nodule"] = m
            taken.append((c, r * 1.3))
    if "cyst" in findings:
        r = rng.uniform(3.0, 8.0)
        c = place_centre(rng, shape, spacing, r, 1.0, taken, 1.5)
        if c is not None:
            radii = [r * rng.uniform(0.8, 1.0) for _ in range(ndim)]
            m = ellipsoid_distance(coords, c, radii, random_rotation(rng, ndim)) < 1.0
            m &= ~masks.get("nodule", np.zeros(shape, bool))  # solid or cystic, never both
            refl = np.where(m, refl_t * rng.uniform(0.0, 0.04), refl)
            dens = np.where(m, 0.01, dens)
            alpha = np.where(m, rng.uniform(0.0, 0.02), alpha)
            masks["cyst"] = m
            taken.append((c, r))
    if "calcification" in findings:
        m = np.zeros(shape, dtype=bool)
        inside_nodule = "nodule" in masks and rng.random() < 0.4
        for _ in range(int(rng.integers(1, 5))):
            r = rng.uniform(1.2, 2.2)
            if inside_nodule:
                idx = np.argwhere(masks["nodule"])
                c = [float(v) * s for v, s in zip(idx[rng.integers(len(idx))], spacing)]
            else:
                c = place_centre(rng, shape, spacing, r, 0.5, taken, 1.0)
                if c is None:
                    continue
            radii = [r * rng.uniform(0.7, 1.0) for _ in range(ndim)]
            m |= ellipsoid_distance(coords, c, radii, random_rotation(rng, ndim)) < 1.0
            taken.append((c, r))
        if "cyst" in masks:
            m &= ~masks["cyst"]
        if m.any():
            refl = np.where(m, refl_t * rng.uniform(6.0, 15.0), refl)
            dens = np.where(m, max(density_t, 1.0) * 2.0, dens)
            alpha = np.where(m, rng.uniform(6.0, 15.0), alpha)
            masks["calcification"] = m
    not_tissue = masks.get("cyst", np.zeros(shape, bool)) | masks.get("calcification", np.zeros(shape, bool))
    scatter_ok = (~not_tissue).astype(np.float32)  # where bright tissue scatterers and interfaces may lie

    # 2. beam coordinates: shear (steering), then fine depth sampling
    t = float(np.tan(np.deg2rad(steer_deg)) * spacing[ax] / spacing[-1])
    refl, dens, alpha, scatter_ok, *interface_d = _shear(
        [refl.astype(np.float32), dens, alpha, scatter_ok, *interface_d], t, order=1)
    u = UPSAMPLE
    dz = spacing[ax] / u
    fine = list(shape)
    fine[ax] *= u
    offset = ((np.arange(u, dtype=np.float32) + 0.5) / u - 0.5) * spacing[ax]  # fine sample - row centre, mm
    offset = np.tile(offset, shape[ax]).reshape([-1 if a == ax else 1 for a in range(ndim)])

    def up(a):
        return np.repeat(a, u, axis=ax)

    # 3. scatterers: Poisson count per fine sample, random-sign sum; mean power = reflectivity^2 at any density
    lam, ok = up(dens), up(scatter_ok) > 0.5
    n = rng.poisson(lam).astype(np.float32)
    echoes = up(refl) * np.sqrt(n / lam) * rng.standard_normal(fine, dtype=np.float32)
    if rng.random() < 0.75:  # sparse strong point scatterers, Pareto amplitudes: bright dots that are not foci
        p_bright = rng.uniform(2e-4, 2e-3)
        hit = (rng.random(fine, dtype=np.float32) < p_bright) & ok
        k = int(hit.sum())
        tail = np.minimum(rng.pareto(rng.uniform(1.3, 2.2), size=k), 20.0)  # capped: no PSF-truncation boxes
        echoes[hit] += refl_t * (2.0 + 3.0 * tail) * rng.choice([-1.0, 1.0], k)
    for d in interface_d:  # specular interfaces: one coherent reflector per beam line where the layer changes
        df = up(d) + offset
        cross = (np.diff(np.signbit(df), axis=ax, prepend=True)) & ~np.signbit(df)
        cross &= ok
        strength = 1.0 + 0.3 * np.tanh(_smooth_field(rng, lat_shape, [3.0 / spacing[a] for a in lat]))
        echoes += cross * (refl_t * rng.uniform(3.0, 8.0) * np.expand_dims(strength, ax)).astype(np.float32)

    # 4. attenuation integral down the beam (dB, round trip, to each sample's row centre) applied to every echo
    att_db = np.cumsum(alpha, axis=ax) * spacing[ax] - 0.5 * alpha * spacing[ax]
    echoes *= up(10.0 ** (-att_db / 20.0)).astype(np.float32)
    depth_fine = up(np.broadcast_to(depth, shape)) + offset
    skin = rng.uniform(0.8, 2.5)  # near field: reverberation lines at multiples of the skin depth, clutter haze
    for m_rev in range(1, 5):
        line = np.abs(depth_fine - m_rev * skin) < dz / 2
        echoes += line * (refl_t * rng.uniform(1.0, 3.0) * 0.5 ** m_rev)
    haze = refl_t * rng.uniform(0.1, 0.6) * np.exp(-depth_fine / rng.uniform(1.5, 4.0))
    echoes += haze * rng.standard_normal(fine, dtype=np.float32)
    echoes += (refl_t * 10.0 ** (-rng.uniform(55.0, 70.0) / 20.0)) * rng.standard_normal(fine, dtype=np.float32)

    # 5. PSF: axial pulse by FFT convolution, Gaussian beam laterally (and in elevation); envelope by Hilbert
    sigma_ax = dz * rng.uniform(4.0, 6.0) * rng.uniform(0.6, 1.0)
    period = sigma_ax / rng.uniform(0.6, 1.0)
    kernel = _pulse(dz, sigma_ax, period).reshape([-1 if a == ax else 1 for a in range(ndim)])
    rf = signal.fftconvolve(echoes, kernel, mode="same", axes=ax).astype(np.float32)
    rf = ndimage.gaussian_filter1d(rf, rng.uniform(0.2, 0.5) / spacing[-1], axis=ndim - 1)
    if ndim == 3:
        rf = ndimage.gaussian_filter1d(rf, rng.uniform(0.3, 0.9) / spacing[0], axis=0)
    env = np.abs(signal.hilbert(rf, N=fine[ax] + 2 * kernel.size, axis=ax))  # zero padding: no wrap-around
    env = env[tuple(slice(0, fine[ax]) if a == ax else slice(None) for a in range(ndim))]
    env = env.reshape(shape[:ax] + (shape[ax], u) + shape[ax + 1:]).mean(axis=ax + 1)

    # 6. time-gain compensation, back to the image grid
    rows = (np.arange(shape[ax]) + 0.5) * spacing[ax]
    gain = 10.0 ** (_tgc_db(rng, rows, alpha_t) / 20.0)
    env = env * gain.reshape([-1 if a == ax else 1 for a in range(ndim)]).astype(np.float32)
    (env,) = _shear([env.astype(np.float32)], t, order=1, inverse=True, mode="mirror")
    env = np.clip(env, 0.0, None)

    # 7. dynamic-range compression
    ref = float(np.percentile(env, 99.0)) + _EPS
    if rng.random() < 0.7:
        dr = rng.uniform(40.0, 70.0)
        disp = np.clip(1.0 + 20.0 * np.log10(env / ref + _EPS) / dr, 0.0, 1.0)
    else:
        disp = np.clip(env / ref, 0.0, 1.0) ** rng.uniform(0.3, 0.55)
    image = (disp * rng.uniform(180.0, 255.0)).astype(np.float32)
    return Phantom(image, masks, spacing, seed, {f: PHRASES[f] for f in masks})


def random_scatter_volume(seed: int, shape_ij: tuple[int, int] = (256, 256)) -> Phantom:
    """A family-B 3D phantom ``[K,J,I]`` with a random slice count (16-40) and anisotropic spacing (depth 0.15-0.3
    mm, lateral 0.2-0.32 mm, 0.4-1.2 mm between slices); findings drawn at random. The counterpart of
    ``phantoms.random_volume_phantom`` for evaluation and calibration (same seed ranges, different images)."""
    rng = np.random.default_rng([seed, 11])
    k = int(rng.integers(16, 41))
    spacing = (float(rng.uniform(0.4, 1.2)), float(rng.uniform(0.15, 0.3)), float(rng.uniform(0.2, 0.32)))
    return make_scatter_phantom((k, *shape_ij), spacing=spacing, seed=seed)
