"""From a probability volume to a mask, with a per-finding decision: is the finding there at all?

A finding is reported only through connected components (3D, face-connected) of ``probability > threshold`` that
  - reach a peak probability of at least ``min_peak``,
  - have a mean probability over their voxels of at least ``min_mean`` (a region the model is sure of throughout,
    not one it only half believes: a dark solid nodule asked as "cyst" comes out as a large component of middling
    probability, a true cyst as one of high probability everywhere),
  - extend at least ``min_extent_mm`` along the slice axis (slices spanned x slice spacing; capped at the volume's
    own extent, so a 2D image or a thin stack can still hold a finding), and
  - have a largest cross-section of at least ``min_area_mm2`` (in-plane area in mm^2),
  - stand out of their surrounding tissue by at least ``min_contrast`` speckle spreads (``region_contrast``), and
  - cast a posterior acoustic shadow of at least ``min_shadow`` spreads (``acoustic_shadow``; the calcification sign).
Components failing any test are dropped; if none is left the segment is empty and the finding "not found".
A rule may also give a ``grow_threshold`` below ``threshold``: the components of a found finding then grow to the
voxels above it that connect to them (hysteresis; each soft voxel goes to the component nearest to it in its own
connected soft region, ``growth_cells``), so a soft edge the model is less sure of joins a finding already decided;
components the rule dropped, and the soft edge nearer to them, stay out, an UNCERTAIN finding does not grow, and the
decision and its evidence stay those of the components at ``threshold``.
Before that, findings the model knows to be mutually exclusive (a solid nodule and a cyst never share a voxel) compete
voxel by voxel: a prompt keeps a voxel only where no exclusive finding is more probable (``suppress_exclusive``), as
in multi-class segmentation. A dark solid nodule asked as "cyst" is then left to the nodule if the model finds the
nodule surer there.
The thresholds belong to a model (its spec's ``presence`` entry), calibrated on phantom volumes it was not trained on
(``CLIPSegLib.training.calibration``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .acoustic_shadow import REACH_MM, posterior_shadow

# slice_gate: how the slice presence probability scales each slice (pipeline.apply_presence), calibrated with the rest.
DEFAULT_PRESENCE = {"threshold": 0.5, "min_peak": 0.8, "min_mean": 0.0, "min_extent_mm": 1.0, "min_area_mm2": 1.0,
                    "min_contrast": 0.0, "min_shadow": 0.0, "slice_gate": 1.0, "grow_threshold": None}


@dataclass
class Component:
    """One connected component: voxel count, peak probability, slices spanned and their extent along the slice axis
    (mm), largest cross-section (mm^2), mean probability over its voxels."""

    label: int
    voxels: int
    peak: float
    n_slices: int
    extent_mm: float
    max_area_mm2: float
    mean: float = 1.0
    contrast: float = float("inf")  # |region - surround| / surround's spread (``region_contrast``); inf: no image
    shadow: float = float("inf")  # darkening below it in spreads (``acoustic_shadow``); inf: no image or not measurable


# The surround a candidate region is compared with (``region_contrast``): in-plane ring from RING_GAP_MM to
# RING_MM outside the region, on the region's own slices.
RING_GAP_MM = 0.5
RING_MM = 2.5


def region_contrast(image: np.ndarray, region: np.ndarray, spacing_kji, array_axis: int) -> float:
    """How much a region stands out of its own surrounding tissue, in units of that tissue's speckle spread:
    ``|mean(region) - mean(ring)| / std(ring)``, the ring being the in-plane band ``RING_GAP_MM`` .. ``RING_MM``
    around the region on each of its slices.

    ``image``, ``region``: ``[K,J,I]`` arrays of the same bounding box (raw intensities, bool), already grown by at
    least ``RING_MM`` in-plane; ``spacing_kji``: mm in array order; slices along ``array_axis``. Unchanged by any
    gain or offset of the image (an affine intensity change), and smaller where the speckle is stronger: a bright
    speckle grain or point scatterer in heavy speckle is a weak contrast, a calcification in the same image a strong
    one. 0 when the ring is empty or flat with the same mean; inf for a region on a perfectly flat background."""
    plane = [a for a in range(3) if a != array_axis]

    def grow(mask, mm):
        steps = [max(1, int(round(mm / float(spacing_kji[a])))) for a in plane]
        struct = np.zeros((3, 3, 3), bool)
        struct[1, 1, 1] = True
        out = mask
        for a, n in zip(plane, steps):  # a box grown axis by axis: n voxels each way along each in-plane axis
            line = struct.copy()
            idx = [1, 1, 1]
            for d in (0, 2):
                idx[a] = d
                line[tuple(idx)] = True
            out = ndimage.binary_dilation(out, line, iterations=n)
        return out

    ring = grow(region, RING_MM) & ~grow(region, RING_GAP_MM)
    ring &= np.any(region, axis=tuple(plane), keepdims=True)  # the region's own slices only
    if not ring.any():
        return 0.0
    inside, around = image[region].astype(np.float64), image[ring].astype(np.float64)
    diff = abs(float(inside.mean() - around.mean()))
    spread = float(around.std())
    if spread <= 1e-12 * max(1.0, abs(float(around.mean()))):
        return float("inf") if diff > 0 else 0.0
    return diff / spread


def components(prob: np.ndarray, spacing, array_axis: int, threshold: float, image: np.ndarray | None = None):
    """Label ``prob > threshold`` (``[K,J,I]``); ``spacing`` mm along (I, J, K); slices along ``array_axis`` (0=K,
    1=J, 2=I; axis names: ``io.geometry``). With ``image`` (the ``[K,J,I]`` intensities the map was predicted from)
    each component's ``contrast`` against its surround (``region_contrast``) and the acoustic ``shadow`` below it
    (``acoustic_shadow.posterior_shadow``) are measured.

    Returns (label array, list of Component)."""
    labels, n = ndimage.label(prob > threshold)
    if n == 0:
        return labels, []
    spacing_kji = np.asarray(spacing, float)[::-1]
    pixel_area = float(np.prod(np.delete(spacing_kji, array_axis)))
    out = []
    # per component inside its bounding box (ndimage.maximum with labels sorts the whole volume: ~0.7 s per prompt)
    for lab, box in enumerate(ndimage.find_objects(labels), start=1):
        sub = labels[box] == lab
        values = prob[box][sub]
        peak, nvox = values.max(), sub.sum()
        per_slice = sub.sum(axis=tuple(a for a in range(3) if a != array_axis))
        n_slices = int((per_slice > 0).sum())
        contrast = shadow = float("inf")
        if image is not None:
            # each measure on a box grown only as far as it reads: the contrast's dilations cost with the box's size
            ring = _grow_box(box, labels.shape, spacing_kji, array_axis, RING_MM)
            contrast = region_contrast(image[ring], labels[ring] == lab, spacing_kji, array_axis)
            reach = _grow_box(box, labels.shape, spacing_kji, array_axis, REACH_MM)
            shadow = posterior_shadow(image[reach], labels[reach] == lab, spacing_kji, array_axis)
        out.append(Component(int(lab), int(nvox), float(peak), n_slices, n_slices * float(spacing_kji[array_axis]),
                             float(per_slice.max() * pixel_area), float(values.mean()), contrast, shadow))
    return labels, out


def _grow_box(box, shape, spacing_kji, array_axis: int, mm: float):
    """A bounding box (tuple of slices) grown in-plane by ``mm`` (+1 voxel), clipped to ``shape``."""
    out = []
    for a, (s, n) in enumerate(zip(box, shape)):
        g = 0 if a == array_axis else int(np.ceil(mm / float(spacing_kji[a]))) + 1
        out.append(slice(max(s.start - g, 0), min(s.stop + g, n)))
    return tuple(out)


# The criteria of the rule, in the order they are reported: (Component field, rule key, what failing it means).
CRITERIA = (("peak", "min_peak", "peak probability too low"),
            ("mean", "min_mean", "mean probability too low (a region the model only half believes)"),
            ("extent_mm", "min_extent_mm", "too thin along the slice axis"),
            ("max_area_mm2", "min_area_mm2", "cross-section too small"),
            ("contrast", "min_contrast", "stands out too little from its surrounding tissue (in units of that "
                                         "tissue's speckle spread)"),
            ("shadow", "min_shadow", "casts too little acoustic shadow below it (in units of the tissue's spread "
                                     "beside it)"))


def required(cfg: dict, volume_extent_mm) -> dict:
    """What the rule asks of a component, by rule key (``CRITERIA``). The extent asked is capped at the volume's own
    extent (``volume_extent_mm``: slices x slice spacing, a number or an array), so a 2D image can hold a finding.
    ``min_shadow`` 0 asks nothing (a shadow may be negative: enhancement behind a cyst)."""
    return {"min_peak": cfg["min_peak"], "min_mean": cfg.get("min_mean", 0.0),
            "min_extent_mm": np.minimum(float(cfg["min_extent_mm"]), volume_extent_mm) - 1e-6,
            "min_area_mm2": cfg["min_area_mm2"], "min_contrast": cfg.get("min_contrast", 0.0),
            "min_shadow": float(cfg.get("min_shadow", 0.0)) or -np.inf}  # 0: off (an enhancement is negative)


def keep(c, cfg: dict, volume_extent_mm):
    """The presence rule for one component (see module docstring): every criterion of ``CRITERIA`` met.

    ``c`` may also hold arrays in the Component fields (and ``volume_extent_mm`` an array): the calibration search
    then judges many components at once, with the same rule."""
    need = required(cfg, volume_extent_mm)
    ok = True
    for field, key, _ in CRITERIA:
        ok = ok & (getattr(c, field) >= need[key])
    return ok


def suppress_exclusive(probs: np.ndarray, findings, exclusive, judges=None) -> np.ndarray:
    """Voxel-wise competition of mutually exclusive findings, in place.

    probs: ``[P,K,J,I]`` probabilities of P prompts; findings: the trained finding each prompt was matched to (None:
    no match, never suppressed); exclusive: pairs of finding names that never share a voxel; judges: indices of the
    maps that act as the rival findings (default: every prompt with a finding). Each prompt's probability is set to 0
    where a judge of a finding exclusive with its own is strictly more probable (judged on the maps as given, not on
    each other's suppressed maps). The pipeline's judges are the model's own phrasings of the rival findings, so a
    prompt's mask never depends on the other prompts of a run. Returns ``probs``."""
    pairs = {frozenset(p) for p in exclusive}
    judges = [j for j, g in enumerate(findings) if g is not None] if judges is None else list(judges)
    losers = []
    for i, f in enumerate(findings):
        rivals = [j for j in judges if f is not None and findings[j] is not None
                  and frozenset((f, findings[j])) in pairs]
        if rivals:
            losers.append((i, probs[i] < np.max(probs[rivals], axis=0)))
    for i, lose in losers:
        probs[i][lose] = 0.0
    return probs


def with_rivals(prompts: list[str], findings: list, canonical: dict, exclusive) -> tuple[list, list, list]:
    """The prompts to predict so that each matched finding meets its exclusive rivals, phrased the model's way.

    prompts: the user's; findings: the trained finding each was matched to (None: none); canonical: finding -> the
    phrasing that stands for it (the first of its trained phrasings). -> (prompts + added rival prompts, their
    findings, judges: the indices of the rival phrasings among them, for ``suppress_exclusive``). A rival already
    asked in exactly that phrasing is not predicted twice."""
    prompts, findings = list(prompts), list(findings)
    judges = []
    pairs = [tuple(p) for p in exclusive]
    for f in [f for f in dict.fromkeys(findings) if f is not None]:
        for a, b in pairs + [p[::-1] for p in pairs]:
            if a != f or b not in canonical:
                continue
            text = canonical[b]
            j = next((j for j, (p, g) in enumerate(zip(prompts, findings)) if p == text and g == b), None)
            if j is None:
                prompts.append(text)
                findings.append(b)
                j = len(prompts) - 1
            if j not in judges:
                judges.append(j)
    return prompts, findings, judges


def slice_vote(prob: np.ndarray, array_axis: int, window: int = 3) -> np.ndarray:
    """Neighbouring slices vote: probability ``[K,J,I]`` -> its median over ``window`` slices along ``array_axis``
    (0=K, 1=J, 2=I), 0 beyond the volume's ends. At any threshold a voxel is then above it where most of the
    window's slices are (the median is the majority vote), so a blob on one stray slice goes (at the ends too) while
    a finding spanning ``window // 2 + 1`` slices stays; a volume of one slice is unchanged."""
    if window <= 1 or prob.shape[array_axis] == 1:
        return prob
    size = [1, 1, 1]
    size[array_axis] = int(window)
    return ndimage.median_filter(prob, size=size, mode="constant", cval=0.0)


def volume_extent_mm(shape, spacing, array_axis: int) -> float:
    """Extent in mm of a ``[K,J,I]`` array along ``array_axis`` (0=K, 1=J, 2=I); ``spacing`` mm along (I, J, K)."""
    return shape[array_axis] * float(np.asarray(spacing, float)[::-1][array_axis])


def fill_holes(mask: np.ndarray) -> None:
    """Fill enclosed cavities of ``mask`` in place, working only in its bounding box grown by one voxel: everything
    outside is background connected to the array border, so the result equals filling the whole array."""
    box = ndimage.find_objects(mask.astype(np.uint8))
    if not box:
        return
    grown = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(box[0], mask.shape))
    mask[grown] = ndimage.binary_fill_holes(mask[grown])


# How far below a rule's threshold a component may fall and still be reported as "uncertain" rather than dropped
# (a spec's ``presence.uncertain_margin`` overrides): probabilities in absolute units, area and contrast as a fraction
# of the required value, extent in slices. A decision this close to its threshold is one the user must see.
UNCERTAIN_MARGIN = {"peak": 0.02, "mean": 0.01, "area": 0.1, "extent_slices": 0, "contrast": 0.1, "shadow": 0.1}

def failed_criteria(c: Component, cfg: dict, volume_extent: float) -> list[tuple[str, float, float]]:
    """The criteria of the rule one component fails: [(rule key, component's value, required value)]."""
    need = required(cfg, volume_extent)
    return [(key, float(getattr(c, field)), float(need[key])) for field, key, _ in CRITERIA
            if getattr(c, field) < need[key]]


def narrowly_failed(failures, margin: dict, slice_mm: float) -> bool:
    """Whether every failed criterion misses its threshold by less than ``margin`` (see ``UNCERTAIN_MARGIN``)."""
    room = {"min_peak": margin["peak"], "min_mean": margin["mean"], "min_extent_mm": margin["extent_slices"] * slice_mm}
    relative = {"min_area_mm2": margin["area"], "min_contrast": margin.get("contrast", 0.0),  # fractions of the need
                "min_shadow": margin.get("shadow", 0.0)}
    for key, value, need in failures:
        gap = room[key] if key in room else relative[key] * need
        if value < need - gap - 1e-9:
            return False
    return bool(failures)


def evidence(c: Component) -> dict:
    """One component's inputs to the rule, JSON-safe and rounded (``contrast``, ``shadow`` None when not measured)."""
    return {"voxels": c.voxels, "peak": round(c.peak, 4), "mean": round(c.mean, 4), "extent_mm": round(c.extent_mm, 3),
            "area_mm2": round(c.max_area_mm2, 3),
            "contrast": round(c.contrast, 3) if np.isfinite(c.contrast) else None,
            "shadow": round(c.shadow, 3) if np.isfinite(c.shadow) else None}


MAX_EVIDENCE = 5  # components reported per finding (largest first)


def growth_cells(labels: np.ndarray, prob: np.ndarray, low: float, spacing) -> np.ndarray:
    """Where each decided region may grow (hysteresis with a border between neighbours): ``labels`` ``[K,J,I]`` (the
    components of ``prob > threshold``, as ``components`` labels them), ``spacing`` mm along (I, J, K) -> int
    ``[K,J,I]``: each voxel of a connected region (3D, face-connected) of ``prob > low`` that holds components
    carries the label of the one of them nearest to it in mm, 0 elsewhere; of that cell, only the part connected to
    its component is kept (a component's own voxels keep its label). So a soft edge shared by a region a rule keeps
    and one it drops is split between them, the dropped region's own edge stays out, and a grown mask stays connected
    to what was decided."""
    cells = np.zeros(labels.shape, labels.dtype)
    wide, _ = ndimage.label(prob > low)
    held = np.unique(wide[labels > 0])
    boxes = ndimage.find_objects(wide)
    sampling = np.asarray(spacing, float)[::-1]
    shared = []  # components that share their soft region: only their cells can be cut off from them
    for r in held[held > 0]:  # each soft region in its own bounding box, its own components the only sites
        box = boxes[r - 1]
        inside = wide[box] == r
        sites = np.where(inside, labels[box], 0)
        owners = np.unique(sites[sites > 0])
        if len(owners) == 1:  # one component: the whole region is its (no distance map, the usual case)
            cells[box][inside] = owners[0]
            continue
        shared.extend(owners.tolist())
        nearest = ndimage.distance_transform_edt(sites == 0, sampling=sampling, return_distances=False,
                                                 return_indices=True)
        cells[box] = np.where(inside, sites[tuple(nearest)], cells[box])
    cell_boxes = ndimage.find_objects(cells)
    for lab in shared:
        box = cell_boxes[lab - 1]
        cell = cells[box] == lab
        parts, n = ndimage.label(cell)
        if n > 1:  # a straight line to its component may cross another's cell: keep the part joined to it
            joined = np.unique(parts[labels[box] == lab])
            cells[box][cell & ~np.isin(parts, joined[joined > 0])] = 0
    return cells


def decide(prob: np.ndarray, spacing, array_axis: int, cfg: dict | None = None,
           image: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Probability ``[K,J,I]``, ``spacing`` mm along (I, J, K), slices along ``array_axis`` (0=K, 1=J, 2=I) ->
    (bool mask ``[K,J,I]``, info). ``image``: the ``[K,J,I]`` intensities ``prob`` was predicted from; without it
    no component's contrast or shadow is measured and a rule's ``min_contrast`` and ``min_shadow`` are not applied.

    info: ``status`` 'found' (components pass the rule), 'uncertain' (none passes, but some miss it only narrowly,
    ``UNCERTAIN_MARGIN``: they are kept in the mask so the user can judge) or 'not found' (empty mask); ``found``
    (the mask is not empty), ``score`` (highest peak probability of the kept components, else of the whole map),
    ``mean`` (mean probability of the kept voxels), ``components``, ``voxels``, ``dropped_components``,
    ``rejected``: {rule key: number of dropped components failing it}, ``closest_miss``: for the dropped component
    nearest to passing, [(rule key, value, required)], ``threshold``, ``required`` (what the rule asked: rule key ->
    value), ``evidence``: the inputs of the kept components, or of the nearest miss, (``evidence``, at most
    ``MAX_EVIDENCE``, largest first) and, when the rule grows a found mask (``grow_threshold``, ``growth_cells``; the
    dropped components' cells stay out, but for what the decision's own filled mask holds), ``grow_threshold`` and
    ``grown_voxels`` (voxels the growth added; ``voxels`` counts them, ``components``, ``mean`` and ``evidence`` are
    those of the decision)."""
    cfg = {**DEFAULT_PRESENCE, **(cfg or {})}
    if image is None:
        cfg["min_contrast"] = cfg["min_shadow"] = 0.0
    margin = {**UNCERTAIN_MARGIN, **(cfg.get("uncertain_margin") or {})}
    labels, comps = components(prob, spacing, array_axis, cfg["threshold"], image)
    extent = volume_extent_mm(prob.shape, spacing, array_axis)
    slice_mm = float(np.asarray(spacing, float)[::-1][array_axis])
    failures = {c.label: failed_criteria(c, cfg, extent) for c in comps}
    kept = [c for c in comps if not failures[c.label]]
    status = "found" if kept else "not found"
    if not kept:
        kept = [c for c in comps if narrowly_failed(failures[c.label], margin, slice_mm)]
        status = "uncertain" if kept else status
    mask = np.isin(labels, [c.label for c in kept]) if kept else np.zeros(prob.shape, bool)
    decided = mask
    low = cfg.get("grow_threshold")
    if status == "found" and low is not None and low < cfg["threshold"]:
        cells = growth_cells(labels, prob, float(low), spacing)
        mask = np.isin(cells, [c.label for c in kept])
        excluded = (cells > 0) & ~mask  # the cells of the regions the rule dropped
    if kept:
        fill_holes(mask)
        if decided is not mask:  # grown: the decision's own mask, filled as it would be without growth
            fill_holes(decided)
            # a dropped region's cell the growth enclosed is a hole the filling must not close, unless the
            # decision's own filled mask holds it (never less than without growth)
            mask &= ~excluded | decided
    dropped = [c for c in comps if c not in kept]
    rejected: dict[str, int] = {}
    for c in dropped:
        for key, _, _ in failures[c.label]:
            rejected[key] = rejected.get(key, 0) + 1
    # the dropped component nearest to passing: fewest failed criteria, then the largest
    closest = min(dropped, key=lambda c: (len(failures[c.label]), -c.voxels), default=None)
    info = {
        "status": status,
        "found": bool(kept),
        "score": max((c.peak for c in kept), default=float(prob.max(initial=0.0))),
        "mean": float(prob[decided].mean()) if kept else None,
        "components": len(kept),
        "dropped_components": len(dropped),
        "voxels": int(mask.sum()),
        "threshold": float(cfg["threshold"]),
        "rejected": rejected,
        "closest_miss": ([[k, round(v, 4), round(n, 4)] for k, v, n in failures[closest.label]]
                         if closest is not None else []) if status != "found" else [],
    }
    if decided is not mask:
        info["grow_threshold"] = float(low)
        info["grown_voxels"] = int(mask.sum() - decided.sum())
    need = required(cfg, extent)
    info["required"] = {k: round(float(v), 4) if np.isfinite(v) else None for k, v in need.items()}  # None: not asked
    shown = sorted(kept, key=lambda c: -c.voxels) if kept else ([closest] if closest is not None else [])
    info["evidence"] = [evidence(c) for c in shown[:MAX_EVIDENCE]]
    if status == "uncertain":
        info["closest_miss"] = [[k, round(v, 4), round(n, 4)] for c in kept for k, v, n in failures[c.label]][:4]
    return mask, info
