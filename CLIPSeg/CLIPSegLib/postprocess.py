"""From a probability volume to a mask, with a per-finding decision: is the finding there at all?

A finding is reported only through connected components (3D, face-connected) of ``probability > threshold`` that
  - reach a peak probability of at least ``min_peak``,
  - have a mean probability over their voxels of at least ``min_mean`` (a region the model is sure of throughout,
    not one it only half believes: a dark solid nodule asked as "cyst" comes out as a large component of middling
    probability, a true cyst as one of high probability everywhere),
  - extend at least ``min_extent_mm`` along the slice axis (slices spanned x slice spacing; capped at the volume's
    own extent, so a 2D image or a thin stack can still hold a finding), and
  - have a largest cross-section of at least ``min_area_mm2`` (in-plane area in mm^2).
Components failing any test are dropped; if none is left the segment is empty and the finding "not found".
Before that, findings the model knows to be mutually exclusive (a solid nodule and a cyst never share a voxel) compete
voxel by voxel: a prompt keeps a voxel only where no exclusive finding is more probable (``suppress_exclusive``), as
in multi-class segmentation. A dark solid nodule asked as "cyst" is then left to the nodule if the model finds the
nodule surer there.
The thresholds belong to a model (its spec's ``presence`` entry), calibrated on phantom volumes it was not trained on
(``CLIPSegLib.calibration``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# slice_gate: how the slice presence probability scales each slice (pipeline.apply_presence), calibrated with the rest.
DEFAULT_PRESENCE = {"threshold": 0.5, "min_peak": 0.8, "min_mean": 0.0, "min_extent_mm": 1.0, "min_area_mm2": 1.0,
                    "slice_gate": 1.0}


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


def components(prob: np.ndarray, spacing, slice_axis: int, threshold: float):
    """Label ``prob > threshold`` (``[K,J,I]``). spacing: mm along (I, J, K); slice_axis: array axis (0=K, 1=J, 2=I).

    Returns (label array, list of Component)."""
    labels, n = ndimage.label(prob > threshold)
    if n == 0:
        return labels, []
    spacing_kji = np.asarray(spacing, float)[::-1]
    pixel_area = float(np.prod(np.delete(spacing_kji, slice_axis)))
    out = []
    # per component inside its bounding box (ndimage.maximum with labels sorts the whole volume: ~0.7 s per prompt)
    for lab, box in enumerate(ndimage.find_objects(labels), start=1):
        sub = labels[box] == lab
        values = prob[box][sub]
        peak, nvox = values.max(), sub.sum()
        per_slice = sub.sum(axis=tuple(a for a in range(3) if a != slice_axis))
        n_slices = int((per_slice > 0).sum())
        out.append(Component(int(lab), int(nvox), float(peak), n_slices, n_slices * float(spacing_kji[slice_axis]),
                             float(per_slice.max() * pixel_area), float(values.mean())))
    return labels, out


def keep(c, cfg: dict, volume_extent_mm):
    """The presence rule for one component (see module docstring). volume_extent_mm: slices x slice spacing.

    ``c`` may also hold arrays in the Component fields (and ``volume_extent_mm`` an array): the calibration search
    then judges many components at once, with the same rule."""
    need_mm = np.minimum(float(cfg["min_extent_mm"]), volume_extent_mm)
    return ((c.peak >= cfg["min_peak"]) & (c.mean >= cfg.get("min_mean", 0.0)) & (c.extent_mm >= need_mm - 1e-6)
            & (c.max_area_mm2 >= cfg["min_area_mm2"]))


def suppress_exclusive(probs: np.ndarray, findings, exclusive) -> np.ndarray:
    """Voxel-wise competition of mutually exclusive findings, in place.

    probs: ``[P,K,J,I]`` probabilities of P prompts; findings: the trained finding each prompt was matched to (None:
    no match, never suppressed); exclusive: pairs of finding names that never share a voxel. Each prompt's
    probability is set to 0 where a prompt of a finding exclusive with its own is strictly more probable (judged on
    the maps as given, not on each other's suppressed maps). Returns ``probs``."""
    pairs = {frozenset(p) for p in exclusive}
    losers = []
    for i, f in enumerate(findings):
        rivals = [j for j, g in enumerate(findings) if f is not None and g is not None and frozenset((f, g)) in pairs]
        if rivals:
            losers.append((i, probs[i] < np.max(probs[rivals], axis=0)))
    for i, lose in losers:
        probs[i][lose] = 0.0
    return probs


def volume_extent_mm(shape, spacing, slice_axis: int) -> float:
    """Extent of a ``[K,J,I]`` array along array axis ``slice_axis`` in mm; spacing in mm along (I, J, K)."""
    return shape[slice_axis] * float(np.asarray(spacing, float)[::-1][slice_axis])


def fill_holes(mask: np.ndarray) -> None:
    """Fill enclosed cavities of ``mask`` in place, working only in its bounding box grown by one voxel: everything
    outside is background connected to the array border, so the result equals filling the whole array."""
    box = ndimage.find_objects(mask.astype(np.uint8))
    if not box:
        return
    grown = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(box[0], mask.shape))
    mask[grown] = ndimage.binary_fill_holes(mask[grown])


def decide(prob: np.ndarray, spacing, slice_axis: int, cfg: dict | None = None) -> tuple[np.ndarray, dict]:
    """Probability ``[K,J,I]`` -> (bool mask ``[K,J,I]``, info dict with found, score, kept and dropped counts)."""
    cfg = {**DEFAULT_PRESENCE, **(cfg or {})}
    labels, comps = components(prob, spacing, slice_axis, cfg["threshold"])
    extent = volume_extent_mm(prob.shape, spacing, slice_axis)
    kept = [c for c in comps if keep(c, cfg, extent)]
    mask = np.isin(labels, [c.label for c in kept]) if kept else np.zeros(prob.shape, bool)
    if kept:
        fill_holes(mask)
    info = {
        "found": bool(kept),
        "score": max((c.peak for c in kept), default=float(prob.max(initial=0.0))),
        "components": len(kept),
        "dropped_components": len(comps) - len(kept),
        "voxels": int(mask.sum()),
    }
    return mask, info
