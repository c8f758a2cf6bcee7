"""Ultrasound-like phantoms with ground-truth masks and finding descriptions.

Images are 2D ``[J, I]`` (rows = depth, columns = lateral) or 3D ``[K, J, I]`` arrays (slice, depth, lateral),
the project's internal z,y,x layout. Spacing is given in mm in the same axis order as the array.

The image is formed as echogenicity x speckle, then log-compressed:
- tissue: textured echogenicity around 1 with depth-dependent gain;
- hypoechoic solid nodule: dark (0.2-0.6), ellipsoidal, optionally lobulated;
- anechoic cyst: near-black, round, with bright posterior acoustic enhancement below it;
- calcifications: small very bright foci with a posterior acoustic shadow.
Speckle is the magnitude of a low-pass filtered complex Gaussian field (fully developed speckle).
Everything is drawn from ``numpy.random.default_rng(seed)``, so a seed gives the same case on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

FINDINGS = ("nodule", "cyst", "calcification")
# Findings that never share a voxel: a region is solid or cystic, not both (the generator keeps them apart; a test
# checks it). Calcifications may sit inside a nodule, so they are not exclusive with it.
EXCLUSIVE = (("nodule", "cyst"),)

# Phrasings a user may type for each finding. The first one is the canonical name.
PHRASES: dict[str, tuple[str, ...]] = {
    "nodule": (
        "thyroid nodule",
        "hypoechoic nodule",
        "solid nodule",
        "hypoechoic thyroid nodule",
        "hypoechoic solid nodule",
        "nodule",
        "solid hypoechoic mass",
    ),
    "cyst": (
        "cyst",
        "anechoic cyst",
        "simple cyst",
        "fluid-filled cyst",
        "anechoic lesion",
        "cystic lesion",
    ),
    "calcification": (
        "calcification",
        "calcifications",
        "echogenic foci",
        "echogenic focus",
        "bright echogenic foci",
        "macrocalcification",
    ),
}


@dataclass
class Phantom:
    """A phantom image with its truth.

    image: float32 array ``[K, J, I]`` or ``[J, I]``, arbitrary positive units (like a B-mode image, not normalised).
    masks: finding name -> bool array of the image's shape; only the findings present are keys.
    spacing: mm per voxel, in array axis order.
    """

    image: np.ndarray
    masks: dict[str, np.ndarray]
    spacing: tuple[float, ...]
    seed: int
    descriptions: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def findings(self) -> list[str]:
        return [f for f in FINDINGS if f in self.masks]


# Geometry shared with family B (``scatter_phantoms``): a change in what these draw from ``rng`` changes the cases
# of both families.


def grid_mm(shape, spacing):
    """Physical coordinates (mm) of voxel centres, one array per axis, broadcastable."""
    axes = [np.arange(n, dtype=np.float32) * s for n, s in zip(shape, spacing)]
    return np.meshgrid(*axes, indexing="ij", sparse=True)


def random_rotation(rng, ndim):
    """A random rotation matrix (ndim x ndim). In 3D, mostly in-plane so depth stays the depth axis."""
    if ndim == 2:
        a = rng.uniform(0, np.pi)
        return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]], dtype=np.float32)
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return (q * np.sign(np.diag(r))).astype(np.float32)


def ellipsoid_distance(coords, centre, radii, rotation):
    """Normalised ellipsoid distance (<1 inside). coords: per-axis mm grids; centre, radii in mm."""
    d = [c - c0 for c, c0 in zip(coords, centre)]
    acc = 0.0
    for row, r in zip(rotation, radii):
        proj = sum(row[i] * d[i] for i in range(len(d)))
        acc = acc + (proj / r) ** 2
    return np.sqrt(acc)


def _speckle(rng, shape, spacing, grain_mm):
    """Fully developed speckle, mean ~1: |lowpass(complex gaussian)|, anisotropic grain (mm) per axis."""
    sig = [max(g / s, 0.3) for g, s in zip(grain_mm, spacing)]
    re = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sig)
    im = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sig)
    mag = np.hypot(re, im)
    return mag / (mag.mean() + 1e-8)


def place_centre(rng, shape, spacing, radius_mm, margin_mm, taken, min_gap_mm):
    """Pick a centre (mm) that keeps the finding inside the image and away from ``taken`` (centre, radius) pairs."""
    ext = [n * s for n, s in zip(shape, spacing)]
    for _ in range(200):
        lo = [min(radius_mm + margin_mm, e / 2) for e in ext]
        c = [rng.uniform(l, e - l) for l, e in zip(lo, ext)]
        if all(np.linalg.norm(np.subtract(c, c2)) > radius_mm + r2 + min_gap_mm for c2, r2 in taken):
            return c
    return None


def make_phantom(
    shape=(256, 256),
    spacing=None,
    seed: int = 0,
    findings: tuple[str, ...] | None = None,
    p_finding: float = 0.55,
) -> Phantom:
    """Generate one phantom.

    shape: ``(J, I)`` for a 2D image or ``(K, J, I)`` for a volume, in voxels.
    spacing: mm per voxel in the same order; default 0.25 mm in-plane and 0.6 mm between slices.
    findings: which findings to draw; ``None`` draws each independently with probability ``p_finding``
      (so an image may hold several findings, or none).
    """
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in shape)
    ndim = len(shape)
    if ndim not in (2, 3) or min(shape) < 1:
        raise ValueError(f"shape must be (J, I) or (K, J, I) with positive sizes, got {shape}")
    if spacing is None:
        spacing = (0.25, 0.25) if ndim == 2 else (0.6, 0.25, 0.25)
    spacing = tuple(float(s) for s in spacing)
    if findings is None:
        findings = tuple(f for f in FINDINGS if rng.random() < p_finding)
    unknown = set(findings) - set(FINDINGS)
    if unknown:
        raise ValueError(f"unknown findings {sorted(unknown)}; expected some of {FINDINGS}")

    coords = grid_mm(shape, spacing)
    depth_axis = ndim - 2  # rows: the beam travels down the rows
    depth = coords[depth_axis]
    depth_mm = shape[depth_axis] * spacing[depth_axis]

    # Tissue echogenicity: smooth texture around 1 and a depth gain curve (time-gain compensation imperfect).
    tex_sigma = [rng.uniform(1.5, 4.0) / s for s in spacing]
    texture = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), tex_sigma)
    texture /= texture.std() + 1e-8
    echo = 1.0 + rng.uniform(0.05, 0.25) * texture
    gain = 1.0 + rng.uniform(-0.4, 0.4) * (depth / depth_mm) + rng.uniform(-0.2, 0.2) * (depth / depth_mm) ** 2
    echo = echo * gain
    post = np.ones(shape, dtype=np.float32)  # posterior enhancement / shadow multipliers
    masks: dict[str, np.ndarray] = {}
    taken: list = []
    in_plane_r = lambda lo, hi: rng.uniform(lo, hi)  # noqa: E731

    if "nodule" in findings:
        r = in_plane_r(4.0, 10.0)
        c = place_centre(rng, shape, spacing, r * 1.2, 1.0, taken, 2.0)
        if c is not None:
            radii = [r * rng.uniform(0.65, 1.0) for _ in range(ndim)]
            rot = random_rotation(rng, ndim)
            d = ellipsoid_distance(coords, c, radii, rot)
            m = d < 1.0
            for _ in range(int(rng.integers(0, 4))):  # lobulation: bumps on the border
                u = rng.normal(size=ndim)
                u /= np.linalg.norm(u)
                rb = r * rng.uniform(0.3, 0.5)
                cb = [c0 + u_ * ri * 0.85 for c0, u_, ri in zip(c, u, radii)]
                m |= ellipsoid_distance(coords, cb, [rb] * ndim, np.eye(ndim, dtype=np.float32)) < 1.0
            level = rng.uniform(0.2, 0.6)
            inner = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), [1.0 / s for s in spacing])
            echo = np.where(m, level * (1.0 + 0.25 * inner / (inner.std() + 1e-8)), echo)
            masks["nodule"] = m
            taken.append((c, r * 1.3))
    if "cyst" in findings:
        r = in_plane_r(3.0, 8.0)
        c = place_centre(rng, shape, spacing, r, 1.0, taken, 1.5)
        if c is not None:
            radii = [r * rng.uniform(0.85, 1.0) for _ in range(ndim)]
            d = ellipsoid_distance(coords, c, radii, random_rotation(rng, ndim))
            m = d < 1.0
            echo = np.where(m, rng.uniform(0.0, 0.06), echo)
            # Posterior acoustic enhancement: a bright band below the cyst, as wide as the cyst.
            lateral = np.sqrt(sum(((coords[a] - c[a]) / radii[a]) ** 2 for a in range(ndim) if a != depth_axis))
            below = (depth > c[depth_axis]) & (lateral < 0.9)
            fall = np.exp(-np.clip(depth - c[depth_axis] - radii[depth_axis], 0, None) / rng.uniform(6.0, 15.0))
            post = post * np.where(below & ~m, 1.0 + rng.uniform(0.4, 0.9) * fall, 1.0)
            masks["cyst"] = m
            taken.append((c, r))
    if "calcification" in findings:
        m = np.zeros(shape, dtype=bool)
        inside_nodule = "nodule" in masks and rng.random() < 0.4
        n = int(rng.integers(1, 5))
        for _ in range(n):
            r = rng.uniform(1.2, 2.2)
            if inside_nodule:
                idx = np.argwhere(masks["nodule"])
                c = [float(v) * s for v, s in zip(idx[rng.integers(len(idx))], spacing)]
            else:
                c = place_centre(rng, shape, spacing, r, 0.5, taken, 1.0)
                if c is None:
                    continue
            radii = [r * rng.uniform(0.7, 1.0) for _ in range(ndim)]
            f = ellipsoid_distance(coords, c, radii, random_rotation(rng, ndim)) < 1.0
            m |= f
            lateral = np.sqrt(sum(((coords[a] - c[a]) / radii[a]) ** 2 for a in range(ndim) if a != depth_axis))
            shadow = (depth > c[depth_axis] + radii[depth_axis]) & (lateral < 0.8)
            post = post * np.where(shadow, rng.uniform(0.2, 0.6), 1.0)
            taken.append((c, r))
        if m.any():
            echo = np.where(m, rng.uniform(2.5, 4.5), echo)
            masks["calcification"] = m
    # Image formation: echogenicity x posterior effects x speckle, then log compression.
    grain = [rng.uniform(0.15, 0.35) for _ in range(ndim)]
    grain[depth_axis] *= rng.uniform(0.4, 0.8)  # axial resolution finer than lateral
    amp = np.clip(echo, 0.0, None) * post * _speckle(rng, shape, spacing, grain)
    amp += rng.uniform(0.0, 0.05) * np.abs(rng.standard_normal(shape, dtype=np.float32))  # electronic noise floor
    dyn = rng.uniform(5.0, 30.0)
    image = np.log1p(dyn * amp) / np.log1p(dyn * 4.0) * rng.uniform(150, 255)
    descriptions = {f: PHRASES[f] for f in masks}
    return Phantom(image.astype(np.float32), masks, spacing, seed, descriptions)


def random_volume_phantom(seed: int, shape_ij: tuple[int, int] = (256, 256)) -> Phantom:
    """A 3D phantom ``[K,J,I]`` with a random slice count (16-40) and spacing (0.2-0.3 mm in-plane, 0.5-1.0 mm
    between slices); findings drawn at random. Used for calibration and held-out evaluation (disjoint seeds)."""
    rng = np.random.default_rng([seed, 7])
    k = int(rng.integers(16, 41))
    s = float(rng.uniform(0.2, 0.3))
    return make_phantom((k, *shape_ij), spacing=(float(rng.uniform(0.5, 1.0)), s, s), seed=seed)
