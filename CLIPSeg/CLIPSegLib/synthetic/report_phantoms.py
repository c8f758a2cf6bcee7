"""Chest-radiograph-like phantoms (PA view) with lungs and opacities, for segmentation from report sentences.

Images are 2D ``[J, I]`` arrays: rows (J) run from the patient's head to the feet, columns (I) across the chest.
Spacing is ``(row, column)`` in mm. Radiological convention: the patient faces the viewer, so the patient's RIGHT
lung is on the IMAGE's LEFT (small column index) and the patient's left lung on the image's right. ``SIDES`` and
every ``side`` field name the PATIENT's side.

The image is a projection: a density map (body soft tissue, minus the air of the lungs, plus mediastinum, spine,
heart, aortic knob, hila, ribs, clavicles, vessel markings and the opacities; arbitrary units, about 1 = full soft
tissue thickness) is turned into a radiograph-like brightness ``1 - exp(-mu * density)`` (bright = dense), then a
random detector: gamma, blur, vignetting/bias field, Poisson-like and Gaussian noise, global gain and offset.
Raw intensities are float32 >= 0, not normalised. The whole patient may be slightly rotated and shifted, and the
field of view (hence the spacing) is random unless ``spacing`` is given. Anatomy, opacities and detector draw from
separate streams spawned from the seed's generator: the same seed with ``n_opacities=0`` is the same patient and
exposure without the opacities.

Opacities, each inside ONE lung (its mask is clipped to that lung):
- ground-glass opacity: faint hazy patch with soft edges; vessels and ribs stay visible through it;
- consolidation: dense, irregular (a few merged blobs), sometimes with air bronchograms (thin dark branches);
- pleural effusion: homogeneous density at the lung base under a meniscus that rises laterally (lower zone only).
A mask is where the opacity's added density exceeds a fixed fraction of its peak (where it is visible). Its zone is
where its centroid lies: the upper or lower half of the rows spanned by its lung.
Everything is drawn from ``numpy.random.default_rng(seed)``, so a seed gives the same case on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.special import expit

KINDS = ("ground-glass opacity", "consolidation", "pleural effusion")
SIDES = ("right", "left")  # the PATIENT's side: "right" is the image's left half
ZONES = ("upper", "lower")
MIN_AREA_FRACTION = 60 / (256 * 256)  # smallest opacity mask, as a fraction of the image (60 px at 256 x 256)


@dataclass
class Opacity:
    """One opacity. mask: ``[J, I]`` bool, inside ``lungs[side]``; kind in KINDS, side in SIDES, zone in ZONES.
    ``cnr`` (contrast / clutter) says how well it stands out of what lies under it (measured at the generated size)."""

    kind: str
    side: str
    zone: str
    mask: np.ndarray
    contrast: float = float("nan")  # mean brightening of its mask by its added density, fraction of the display window
    clutter: float = float("nan")  # SD of the image without it over the mask and 3 px around in its lung, same unit

    @property
    def cnr(self) -> float:
        return self.contrast / max(self.clutter, 1e-6)


@dataclass
class ReportPhantom:
    """image: ``[J, I]`` float32 raw intensities >= 0 (bright = dense); spacing: mm (row, column);
    lungs: side -> ``[J, I]`` bool lung field; opacities: the opacities drawn (possibly none)."""

    image: np.ndarray
    spacing: tuple[float, float]
    lungs: dict[str, np.ndarray]
    opacities: list[Opacity]


@dataclass
class _Lung:
    """Lung outline in the patient frame (mm). a = lateral distance from the midline, y = down from the apex level.
    sign: -1 for the patient's right (image left, x < 0), +1 for the left."""

    sign: int
    apex: float
    base: float
    m: float  # medial border (mm from midline)
    w: float  # lateral border at the base
    c: float  # lateral position of the apex
    tw: float  # fraction of the height over which the lateral border widens
    tm: float  # same for the medial border
    dome: float  # height of the diaphragm dome
    peak: float  # where the dome peaks, as a fraction of the lung width
    notch: float  # cardiac notch: medial border moves out this much near the base


def _lung_field(lung: _Lung, x, y):
    a = lung.sign * x
    t = (y - lung.apex) / (lung.base - lung.apex)
    rise = lambda k: np.sqrt(np.clip(1 - (1 - np.clip(t / k, 0, 1)) ** 2, 0, 1))  # noqa: E731
    a_lat = lung.c + (lung.w - lung.c) * rise(lung.tw)
    a_med = lung.c - (lung.c - lung.m) * rise(lung.tm) + lung.notch * np.clip((t - 0.5) / 0.35, 0, 1)
    s = np.clip((a - lung.m) / (lung.w - lung.m), 0, 1)
    bottom = lung.base - lung.dome * np.clip(1 - ((s - lung.peak) / (1 - lung.peak)) ** 2, 0, None)
    return (t >= 0) & (a >= a_med) & (a <= a_lat) & (y <= bottom)


def _noise(rng, shape, sigma_px):
    """Smooth Gaussian noise with unit standard deviation."""
    n = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma_px)
    return n / (n.std() + 1e-8)


def _largest(mask):
    lab, n = ndimage.label(mask)
    if n <= 1:
        return ndimage.binary_fill_holes(mask)
    sizes = ndimage.sum(mask, lab, range(1, n + 1))
    return ndimage.binary_fill_holes(lab == 1 + int(np.argmax(sizes)))


def _band(dist_mm, half_mm, edge_mm=1.0):
    """Soft band of half-width half_mm around a centre line (dist_mm = signed distance)."""
    return expit((half_mm - np.abs(dist_mm)) / edge_mm)


def _tree(rng, start, angle, width, length, step=1.0, p_branch=0.05, spread=0.14):
    """A branching random walk from ``start`` (a, y mm): rows of (a, y, width mm)."""
    out, stack = [], [(np.array(start, float), angle, width, length)]
    while stack:
        p, ang, w, left = stack.pop()
        w0, n = w, int(left / step)
        for k in range(n):
            ang += rng.normal(0, spread)
            p = p + step * np.array([np.cos(ang), np.sin(ang)])
            w = w0 * (1 - 0.7 * k / max(n, 1))
            out.append((p[0], p[1], w))
            if rng.random() < p_branch and len(stack) < 40:
                turn = rng.choice([-1, 1]) * rng.uniform(0.35, 0.8)
                stack.append((p.copy(), ang + turn, 0.7 * w, 0.6 * (left - k * step)))
    return np.array(out, float).reshape(-1, 3)


def make_report_phantom(shape=(256, 256), spacing=None, seed: int = 0, n_opacities: int | None = None) -> ReportPhantom:
    """Generate one chest-radiograph-like phantom.

    shape: ``(J, I)`` pixels. spacing: mm per pixel ``(row, column)``; ``None`` draws a field of view of 330-430 mm
    across the larger side (isotropic pixels). n_opacities: how many opacities; ``None`` draws 0-3.
    """
    rng = np.random.default_rng(seed)
    rng_op, rng_det = rng.spawn(2)  # opacities and detector: a seed drawn with 0 opacities is the same patient
    shape = tuple(int(n) for n in shape)
    if len(shape) != 2 or min(shape) < 16:
        raise ValueError(f"shape must be (J, I) with both sizes >= 16, got {shape}")
    if spacing is None:
        s = rng.uniform(330.0, 430.0) / max(shape)
        spacing = (s, s)
    spacing = tuple(float(v) for v in spacing)
    J, I = shape
    px_mm = float(np.mean(spacing))

    # Patient anatomy (mm). y = 0 at the apex level, down positive; x = + toward the image right (patient's left).
    height = rng.uniform(210, 270)
    body_hw = rng.uniform(140, 175)
    lungs_geo = {}
    for side, sign in (("right", -1), ("left", 1)):
        base = height + (rng.uniform(5, 22) if side == "left" else 0.0)  # right hemidiaphragm higher
        m = rng.uniform(14, 26) if side == "right" else rng.uniform(18, 30)
        w = body_hw - rng.uniform(12, 24)
        lungs_geo[side] = _Lung(sign, rng.uniform(-6, 6), base, m, w, m + rng.uniform(0.25, 0.45) * (w - m),
                                rng.uniform(0.55, 0.8), rng.uniform(0.12, 0.3), rng.uniform(18, 42),
                                rng.uniform(0.35, 0.55), rng.uniform(8, 22) if side == "left" else 0.0)

    # Pixel grid -> patient frame: rotation about the image centre, shift, field of view.
    theta = np.deg2rad(rng.uniform(-3, 3)) if rng.random() < 0.6 else 0.0
    shift = (rng.uniform(-8, 8), rng.uniform(-15, 15))  # mm, (x, y) in the image plane
    y_mid = 0.5 * height + rng.uniform(-10, 25)
    rr, cc = np.meshgrid(np.arange(J, dtype=np.float32), np.arange(I, dtype=np.float32), indexing="ij")
    px, py = (cc - (I - 1) / 2) * spacing[1] - shift[0], (rr - (J - 1) / 2) * spacing[0] - shift[1]
    X = np.cos(theta) * px + np.sin(theta) * py
    Y = -np.sin(theta) * px + np.cos(theta) * py + y_mid

    def to_pixel(x, y):  # patient mm -> (row, column)
        y = y - y_mid
        qx, qy = np.cos(theta) * x - np.sin(theta) * y + shift[0], np.sin(theta) * x + np.cos(theta) * y + shift[1]
        return qy / spacing[0] + (J - 1) / 2, qx / spacing[1] + (I - 1) / 2

    def splat(points, sigma_mm):  # points: rows of (x, y, weight) -> blurred line map, peak ~ weight
        img = np.zeros(shape, np.float32)
        if len(points):
            r, c = to_pixel(points[:, 0], points[:, 1])
            r, c = np.round(r).astype(int), np.round(c).astype(int)
            ok = (r >= 0) & (r < J) & (c >= 0) & (c < I)
            np.add.at(img, (r[ok], c[ok]), points[ok, 2])
        sig = max(sigma_mm / px_mm, 0.6)
        return ndimage.gaussian_filter(img, sig) * np.sqrt(2 * np.pi) * sig / px_mm  # points every 1 mm

    # Lung fields, with a smooth random warp so outlines are irregular and asymmetric.
    warp_sigma = 40.0 / px_mm
    wx, wy = _noise(rng, shape, warp_sigma) * rng.uniform(3, 8), _noise(rng, shape, warp_sigma) * rng.uniform(3, 8)
    lungs = {side: _largest(_lung_field(g, X + wx, Y + wy)) for side, g in lungs_geo.items()}
    lung_any = lungs["right"] | lungs["left"]
    depth_mm = ndimage.distance_transform_edt(lung_any, sampling=spacing)
    lung_depth = ndimage.gaussian_filter((1 - np.exp(-depth_mm / rng.uniform(10, 20))).astype(np.float32), 1.5 / px_mm)
    air = rng.uniform(0.5, 0.7)  # density the lung air removes at full depth

    # Body envelope: neck, shoulders, thorax; elliptical cross-section gives the soft-tissue thickness.
    sig = expit
    neck, shoulder = rng.uniform(45, 65), body_hw * rng.uniform(1.08, 1.2)
    hw = neck + (shoulder - neck) * sig((Y + 55) / 8)
    hw = hw + (body_hw * (1 + 0.05 * (Y - height / 2) / height) - shoulder) * sig((Y - 20) / 25)
    tissue = np.sqrt(np.clip(1 - (X / hw) ** 2, 0, 1))
    density = tissue * rng.uniform(0.9, 1.1) - air * lung_depth

    # Mediastinum, spine (vertebral bodies), trachea, heart, aortic knob, hila.
    med_hw = 25 + 20 * np.clip(Y / height, 0, 1)
    density += 0.15 * _band(X - rng.uniform(-4, 4), med_hw, 6)
    period, phase = rng.uniform(24, 32), rng.uniform(0, 30)
    density += _band(X, rng.uniform(16, 22), 2) * (0.22 + 0.05 * np.cos(2 * np.pi * (Y - phase) / period))
    x_tr, y_car = rng.uniform(-4, 4), rng.uniform(0.25, 0.35) * height
    density -= 0.12 * _band(X - x_tr, rng.uniform(6, 9), 1.5) * sig((y_car - Y) / 4) * tissue
    # The heart displaces lung air in front of and behind it: over the lungs it casts a shadow, over the
    # mediastinum it adds little.
    hx, hy = rng.uniform(15, 35), lungs_geo["left"].base - rng.uniform(55, 80)
    hrx, hry, ha = rng.uniform(62, 85), rng.uniform(50, 65), np.deg2rad(rng.uniform(-30, -10))
    u, v = np.cos(ha) * (X - hx) + np.sin(ha) * (Y - hy), -np.sin(ha) * (X - hx) + np.cos(ha) * (Y - hy)
    heart = np.clip(1 - (u / hrx) ** 2 - (v / hry) ** 2, 0, 1) ** 0.3
    density += heart * (rng.uniform(0.55, 0.8) * air * lung_depth + rng.uniform(0.04, 0.1))
    ax_, ay_, ar_ = rng.uniform(25, 40), rng.uniform(0.18, 0.3) * height, rng.uniform(13, 19)
    density += 0.15 * np.sqrt(np.clip(1 - ((X - ax_) ** 2 + (Y - ay_) ** 2) / ar_ ** 2, 0, 1))
    hila = {}
    for side, g in lungs_geo.items():
        hila[side] = (g.m + rng.uniform(12, 25), rng.uniform(0.35, 0.5) * height)
        d2 = (X - g.sign * hila[side][0]) ** 2 + (Y - hila[side][1]) ** 2
        density += rng.uniform(0.06, 0.12) * np.exp(-d2 / (2 * rng.uniform(8, 14) ** 2))
    # Gastric bubble under the left hemidiaphragm; optional breast shadows over the lower lateral lungs.
    gx, gy = rng.uniform(40, 80), lungs_geo["left"].base + rng.uniform(12, 30)
    grx, gry = rng.uniform(18, 30), rng.uniform(10, 16)
    density -= 0.15 * np.sqrt(np.clip(1 - ((X - gx) / grx) ** 2 - ((Y - gy) / gry) ** 2, 0, 1))
    if rng.random() < 0.5:
        amp = rng.uniform(0.04, 0.1)
        for side, g in lungs_geo.items():
            bx, by = g.sign * g.w * rng.uniform(0.5, 0.7), g.base - rng.uniform(10, 40)
            inside = 1 - np.sqrt(((X - bx) / 70) ** 2 + ((Y - by) / 50) ** 2)
            density += amp * sig(inside / 0.08) * sig((Y - by + 15) / 6)

    # Ribs (posterior: arch then fall laterally; anterior: fainter, falling medially) and clavicles.
    for side, g in lungs_geo.items():
        a = g.sign * X
        gap = (height + rng.uniform(10, 30)) / 10
        y0, lat = rng.uniform(-25, -10), np.clip((a - 10) / 8, 0, 1) * sig((hw - 3 - np.abs(X)) / 2)
        for k in range(11):
            a_pk = rng.uniform(35, 60)
            q = rng.uniform(0.004, 0.006) * (1.6 if k < 2 else 1.0)
            yc = y0 + k * gap + rng.normal(0, 2) + q * ((a - a_pk) ** 2 - (12 - a_pk) ** 2)
            half = rng.uniform(4.5, 6.5) * (1 + 0.3 * np.clip(a / g.w, 0, 1))
            dist = Y - yc
            density += lat * (0.08 * _band(dist, half, 0.8) + 0.05 * np.exp(-((np.abs(dist) - half) / 1.2) ** 2))
        slope, ya = rng.uniform(0.3, 0.5), rng.uniform(-5, 15)
        fade = np.clip((a - 0.3 * g.w) / (0.3 * g.w), 0, 1) * lat
        for k in range(6):
            yc = ya + k * rng.uniform(30, 38) + slope * (g.w - a)
            density += 0.045 * fade * _band(Y - yc, rng.uniform(5, 7), 1.0)
        ycl = rng.uniform(-35, -15)
        yc = ycl - rng.uniform(0.12, 0.22) * (a - 15) + rng.uniform(3, 8) * np.sin(np.pi * a / g.w)
        density += 0.2 * np.clip((a - 12) / 6, 0, 1) * _band(Y - yc, rng.uniform(6, 8), 1.2) * sig((g.w + 25 - a) / 4)

    # Vessel markings: branching trees from each hilum, thick near it, fading to the periphery.
    vessels = np.zeros(shape, np.float32)
    for side, g in lungs_geo.items():
        pts = []
        for ang in rng.uniform(-1.9, 1.9, int(rng.integers(6, 10))):
            t = _tree(rng, hila[side], ang, rng.uniform(3, 5), rng.uniform(60, 130))
            pts.append(np.column_stack([g.sign * t[:, 0], t[:, 1], t[:, 2]]))
        pts = np.concatenate(pts)
        for lo, hi, s_mm in ((0, 1.6, 0.8), (1.6, 3.0, 1.2), (3.0, 9.0, 1.8)):
            sel = pts[(pts[:, 2] >= lo) & (pts[:, 2] < hi)]
            vessels += splat(np.column_stack([sel[:, :2], 0.02 * sel[:, 2]]), s_mm)
    vessels *= ndimage.gaussian_filter(lung_any.astype(np.float32), 2 / px_mm)
    texture = _noise(rng, shape, 2.0 / px_mm) * rng.uniform(0.01, 0.025) * lung_depth

    # Opacities.
    n = int(rng_op.integers(0, 4)) if n_opacities is None else int(n_opacities)
    min_px = max(6, int(np.ceil(MIN_AREA_FRACTION * J * I)))
    rows_of = {s: np.nonzero(lungs[s].any(axis=1))[0] for s in SIDES}
    opacities: list[Opacity] = []
    owns: list[np.ndarray] = []  # each opacity's own added density
    added = np.zeros(shape, np.float32)
    hidden = np.zeros(shape, np.float32)  # how much an effusion hides vessels
    taken = np.zeros(shape, bool)
    kinds = sorted((KINDS[int(k)] for k in rng_op.choice(len(KINDS), n)), key=lambda k: k != "pleural effusion")
    for j, kind in enumerate(kinds):  # effusions first: they need the free lung base
        if kind == "pleural effusion" and j >= 2:
            kind = "consolidation"
        for attempt in range(60):
            if attempt == 30:  # no room for this one: a focal opacity elsewhere instead
                kind = "ground-glass opacity" if kind != "ground-glass opacity" else "consolidation"
            has = {o.side for o in opacities if o.kind == kind == "pleural effusion"}  # one effusion per side
            free = [s for s in SIDES if s not in has]
            side = free[int(rng_op.integers(len(free)))]
            field, mask, extra = _opacity(rng_op, kind, lungs_geo[side], lungs[side], taken, X, Y, shape, px_mm, splat)
            mask &= lungs[side]
            if mask.sum() < min_px or (mask & ndimage.binary_dilation(taken, iterations=2)).any():
                continue
            r = rows_of[side]
            zone = "upper" if np.nonzero(mask)[0].mean() < (r.min() + r.max()) / 2 else "lower"
            if kind == "pleural effusion" and zone != "lower":
                continue
            soft_lung = ndimage.gaussian_filter(lungs[side].astype(np.float32), 1.0)
            fill = lung_depth if kind == "pleural effusion" else soft_lung
            own = air * field * fill - extra
            added += own
            if kind == "pleural effusion":
                hidden = np.maximum(hidden, field)
            opacities.append(Opacity(kind, side, zone, mask))
            owns.append(own)
            taken |= mask
            break
    density = density + vessels * (1 - hidden) + texture + added

    # Detector: projection brightness, gamma, blur, vignetting / bias field, noise, gain and offset.
    mu, gamma, blur = rng_det.uniform(1.0, 1.6), rng_det.uniform(0.75, 1.4), rng_det.uniform(0.4, 1.4) / px_mm * 1.5
    rad2 = ((rr - (J - 1) / 2) / J) ** 2 + ((cc - (I - 1) / 2) / I) ** 2
    vignette = 1 - rng_det.uniform(0, 0.6) * rad2
    bias = 1 + rng_det.uniform(0.03, 0.12) * _noise(rng_det, shape, max(J, I) / 4)
    offset = rng_det.uniform(0, 0.05)

    def expose(d):  # density -> noiseless brightness before the gain
        img = (1 - np.exp(-mu * np.clip(d, 0, None))) ** gamma
        return np.clip(ndimage.gaussian_filter(img, blur) * vignette * bias, 0, None) + offset

    clean = expose(density)
    photons = rng_det.uniform(300, 3000)
    img = clean + np.sqrt(clean / photons) * rng_det.standard_normal(shape, dtype=np.float32)
    img = img + rng_det.uniform(0.002, 0.012) * rng_det.standard_normal(shape, dtype=np.float32)
    img = np.clip(img, 0, None)
    # How visible each opacity is: its own brightening of its mask (the image with it minus without its added density,
    # noiseless; an effusion's hiding of the vessels stays in both) and the spread of the image without it over the
    # mask and 3 pixels around inside its lung (ribs, vessels, the lung's depth), both in the display window (0.5-99.5
    # percentiles of the noisy image).
    lo, hi = np.percentile(img, [0.5, 99.5])
    window = max(float(hi - lo), 1e-6)
    for o, own in zip(opacities, owns):
        without = expose(density - own)
        o.contrast = float(np.mean((clean - without)[o.mask])) / window
        o.clutter = float(np.std(without[ndimage.binary_dilation(o.mask, iterations=3) & lungs[o.side]])) / window
    img = img * rng_det.uniform(200, 4000)
    return ReportPhantom(img.astype(np.float32), spacing, lungs, opacities)


def _opacity(rng, kind, geo, lung, taken, X, Y, shape, px_mm, splat):
    """Added density field (peak 1, in units of the lung's air) of one opacity, its mask, and a density to subtract
    (air bronchograms). The caller clips the mask to the lung and checks size and overlap."""
    extra = np.zeros(shape, np.float32)
    if kind == "pleural effusion":
        a = geo.sign * X
        s = np.clip((a - geo.m) / (geo.w - geo.m), 0, 1)
        level = geo.base - geo.dome - rng.uniform(0.03, 0.2) * (geo.base - geo.apex)  # above the dome
        y_men = level - rng.uniform(20, 50) * s ** 2  # meniscus: rises laterally
        prof = expit((Y - y_men) / rng.uniform(3, 7))
        field = rng.uniform(0.8, 0.95) * prof * (1 + 0.15 * np.clip((Y - y_men) / 40, 0, 1)) / 1.15
        return field.astype(np.float32), (prof > 0.5), extra
    cand = np.argwhere(lung & ~taken)
    if len(cand) == 0:
        return np.zeros(shape, np.float32), np.zeros(shape, bool), extra
    r0, c0 = cand[int(rng.integers(len(cand)))]
    cx, cy = float(X[r0, c0]), float(Y[r0, c0])
    if kind == "ground-glass opacity":
        rad = rng.uniform(12, 30)
        f = np.zeros(shape, np.float32)
        for _ in range(int(rng.integers(1, 4))):
            bx, by, rb = cx + rng.normal(0, 0.5 * rad), cy + rng.normal(0, 0.5 * rad), rad * rng.uniform(0.5, 1.0)
            f = np.maximum(f, np.exp(-((X - bx) ** 2 + (Y - by) ** 2) / (2 * rb ** 2)))
        tex = 1 + 0.3 * _noise(rng, shape, 1.5 / px_mm)
        return rng.uniform(0.24, 0.34) * f * tex, f > 0.45, extra
    # consolidation: merged irregular ellipses, sharp-ish edges
    core = np.zeros(shape, bool)
    irregular = 0.18 * _noise(rng, shape, 3.0 / px_mm)
    for _ in range(int(rng.integers(2, 6))):
        bx, by = cx + rng.normal(0, 9), cy + rng.normal(0, 9)
        ra, rb, ang = rng.uniform(8, 20), rng.uniform(8, 20), rng.uniform(0, np.pi)
        u, v = np.cos(ang) * (X - bx) + np.sin(ang) * (Y - by), -np.sin(ang) * (X - bx) + np.cos(ang) * (Y - by)
        core |= np.sqrt((u / ra) ** 2 + (v / rb) ** 2) + irregular < 1
    core &= lung
    prof = ndimage.gaussian_filter(core.astype(np.float32), 1.5 / px_mm)
    amp = rng.uniform(0.45, 0.7)
    field = amp * prof * (1 + 0.08 * _noise(rng, shape, 2.0 / px_mm))
    if rng.random() < 0.5 and core.any():  # air bronchograms: thin dark branches running away from the hilum
        ang = np.arctan2(cy - 0.4 * geo.base, geo.sign * cx - geo.m) + rng.normal(0, 0.3)
        t = _tree(rng, (geo.sign * cx - 8 * np.cos(ang), cy - 8 * np.sin(ang)), ang, 1.8, rng.uniform(20, 40),
                  p_branch=0.08, spread=0.1)
        lines = splat(np.column_stack([geo.sign * t[:, 0], t[:, 1], 0.35 * amp * np.ones(len(t))]), 0.7)
        extra = lines * ndimage.binary_erosion(core, iterations=2)
    return field, prof > 0.5, extra
