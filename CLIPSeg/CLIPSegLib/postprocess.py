"""From a probability volume to a mask, with a per-finding decision: is the finding there at all?

A finding is reported only through connected components (3D, face-connected) of ``probability > threshold`` that
  - reach a peak probability of at least ``min_peak``,
  - span at least ``min_slices`` neighbouring slices along the slice axis (when the volume has that many), and
  - have a largest cross-section of at least ``min_area_mm2`` (in-plane area in mm^2).
Components failing any test are dropped; if none is left the segment is empty and the finding "not found".
The thresholds belong to a model (its spec's ``presence`` entry), calibrated on phantom volumes it was not trained on
(``CLIPSegLib.calibration``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

DEFAULT_PRESENCE = {"threshold": 0.5, "min_peak": 0.8, "min_slices": 2, "min_area_mm2": 1.0}


@dataclass
class Component:
    """One connected component: voxel count, peak probability, slices spanned, largest cross-section (mm^2)."""

    label: int
    voxels: int
    peak: float
    n_slices: int
    max_area_mm2: float


def components(prob: np.ndarray, spacing, slice_axis: int, threshold: float):
    """Label ``prob > threshold`` (``[K,J,I]``). spacing: mm along (I, J, K); slice_axis: array axis (0=K, 1=J, 2=I).

    Returns (label array, list of Component)."""
    labels, n = ndimage.label(prob > threshold)
    if n == 0:
        return labels, []
    idx = np.arange(1, n + 1)
    peaks = ndimage.maximum(prob, labels, idx)
    voxels = ndimage.sum_labels(np.ones_like(labels), labels, idx)
    spacing_kji = np.asarray(spacing, float)[::-1]
    pixel_area = float(np.prod(np.delete(spacing_kji, slice_axis)))
    out = []
    for lab, box, peak, nvox in zip(idx, ndimage.find_objects(labels), peaks, voxels):
        sub = labels[box] == lab
        per_slice = sub.sum(axis=tuple(a for a in range(3) if a != slice_axis))
        out.append(Component(int(lab), int(nvox), float(peak), int((per_slice > 0).sum()),
                             float(per_slice.max() * pixel_area)))
    return labels, out


def keep(c: Component, cfg: dict, n_slices_total: int) -> bool:
    """The presence rule for one component (see module docstring)."""
    need_slices = min(int(cfg["min_slices"]), n_slices_total)
    return c.peak >= cfg["min_peak"] and c.n_slices >= need_slices and c.max_area_mm2 >= cfg["min_area_mm2"]


def decide(prob: np.ndarray, spacing, slice_axis: int, cfg: dict | None = None) -> tuple[np.ndarray, dict]:
    """Probability ``[K,J,I]`` -> (bool mask ``[K,J,I]``, info dict with found, score, kept and dropped counts)."""
    cfg = {**DEFAULT_PRESENCE, **(cfg or {})}
    labels, comps = components(prob, spacing, slice_axis, cfg["threshold"])
    kept = [c for c in comps if keep(c, cfg, prob.shape[slice_axis])]
    mask = np.isin(labels, [c.label for c in kept]) if kept else np.zeros(prob.shape, bool)
    if kept:
        mask = ndimage.binary_fill_holes(mask)
    info = {
        "found": bool(kept),
        "score": max((c.peak for c in kept), default=float(prob.max(initial=0.0))),
        "components": len(kept),
        "dropped_components": len(comps) - len(kept),
        "voxels": int(mask.sum()),
    }
    return mask, info
