"""Saliency map -> SAM prompts: a binary mask, its connected components, a box (and points) per component.

MedCLIP-SAM refines the saliency with a dense CRF (pydensecrf) before this step; pydensecrf has no maintained wheel
that builds here, so that step is off and replaced by a 2-class split of the saliency values (Otsu's threshold,
``skimage.filters.threshold_otsu`` when scikit-image is installed, else the same computation in numpy) or a fixed
threshold, then ``scipy.ndimage`` connected components, the largest first.

Conventions (SAM's ``SamPredictor``): boxes XYXY in pixels of the saliency map, x = column, y = row, the last
row / column inclusive; points XY in pixels with labels 1 (positive, inside the finding) and 0 (negative).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from ...errors import InputError

SPLITS = ("otsu", "threshold")
FLAT = 1e-6  # a map whose values span less than this has no component (nothing stands out)


@dataclass
class Prompts:
    """SAM prompts of one saliency map: ``boxes`` [N,4] float32 XYXY (pixels, inclusive), ``points`` [N,K,2]
    float32 XY and ``labels`` [N,K] int64 (1 positive, 0 negative; K = 0 without points), ``scores`` [N] (mean
    saliency in each component), ``areas`` [N] (pixels), and the binary ``mask`` [H,W] the components came from."""

    boxes: np.ndarray
    points: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    areas: np.ndarray
    mask: np.ndarray = field(repr=False)

    def __len__(self) -> int:
        return len(self.boxes)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """The threshold splitting ``values`` into two classes of largest between-class variance (Otsu): values above
    it are the first class. ``skimage.filters.threshold_otsu`` when scikit-image is installed."""
    values = np.asarray(values, dtype=np.float64).ravel()
    try:
        from skimage.filters import threshold_otsu
    except ImportError:
        counts, edges = np.histogram(values, bins=bins)
        centres = (edges[:-1] + edges[1:]) / 2
        w0 = np.cumsum(counts)[:-1]  # pixels at or below each candidate threshold
        w1 = counts.sum() - w0
        m0 = np.cumsum(counts * centres)[:-1] / np.maximum(w0, 1)
        m1 = (np.sum(counts * centres) - np.cumsum(counts * centres)[:-1]) / np.maximum(w1, 1)
        return float(centres[:-1][np.argmax(w0 * w1 * (m0 - m1) ** 2)])
    return float(threshold_otsu(values, nbins=bins))


def binarize(saliency: np.ndarray, split: str = "otsu", threshold: float = 0.5) -> np.ndarray:
    """Saliency [H,W] -> bool [H,W]: above Otsu's threshold (``split="otsu"``) or above ``threshold``. A flat map
    (no value stands out) is all False."""
    if split not in SPLITS:
        raise InputError(f"saliency split {split!r} is not one of {', '.join(SPLITS)}")
    s = np.asarray(saliency, dtype=np.float32)
    if s.ndim != 2:
        raise InputError(f"a saliency map is [H,W], got shape {list(s.shape)}")
    if not np.isfinite(s).all() or float(s.max() - s.min()) < FLAT:
        return np.zeros(s.shape, dtype=bool)
    cut = otsu_threshold(s) if split == "otsu" else float(threshold)
    return s > cut


def saliency_to_prompts(saliency: np.ndarray, split: str = "otsu", threshold: float = 0.5, min_area: int = 16,
                        max_boxes: int = 1, positive_points: bool = False, negative_points: bool = False,
                        margin: int = 0) -> Prompts:
    """Saliency [H,W] (any range; higher = more likely the finding) -> ``Prompts`` for up to ``max_boxes``
    components of at least ``min_area`` pixels, the largest first (8-connected). Each box is the component's
    bounding box grown by ``margin`` pixels (clipped to the image). ``positive_points``: one point per box at the
    component's saliency peak; ``negative_points``: one at the lowest saliency inside the box but outside the
    component (skipped, label -1 and point (0, 0), when the component fills its box; SAM ignores label -1)."""
    s = np.asarray(saliency, dtype=np.float32)
    mask = binarize(s, split, threshold)
    labelled, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    areas = np.bincount(labelled.ravel(), minlength=n + 1)[1:]
    order = [i + 1 for i in np.argsort(-areas, kind="stable") if areas[i] >= min_area][:max(0, int(max_boxes))]
    h, w = s.shape
    boxes, points, labels, scores, kept = [], [], [], [], []
    for lab in order:
        comp = labelled == lab
        rows, cols = np.nonzero(comp)
        x0, y0 = max(0, cols.min() - margin), max(0, rows.min() - margin)
        x1, y1 = min(w - 1, cols.max() + margin), min(h - 1, rows.max() + margin)
        boxes.append([x0, y0, x1, y1])
        scores.append(float(s[comp].mean()))
        kept.append(int(comp.sum()))
        pts, labs = [], []
        if positive_points:
            r, c = np.unravel_index(np.argmax(np.where(comp, s, -np.inf)), s.shape)
            pts.append([c, r])
            labs.append(1)
        if negative_points:
            inside = np.zeros_like(comp)
            inside[y0:y1 + 1, x0:x1 + 1] = True
            inside &= ~comp
            if inside.any():
                r, c = np.unravel_index(np.argmin(np.where(inside, s, np.inf)), s.shape)
                pts.append([c, r])
                labs.append(0)
            else:
                pts.append([0, 0])
                labs.append(-1)
        points.append(pts)
        labels.append(labs)
    k = len(points[0]) if points else int(positive_points) + int(negative_points)
    return Prompts(np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                   np.asarray(points, dtype=np.float32).reshape(len(boxes), k, 2),
                   np.asarray(labels, dtype=np.int64).reshape(len(boxes), k),
                   np.asarray(scores, dtype=np.float32), np.asarray(kept, dtype=np.int64), mask)


__all__ = ["Prompts", "SPLITS", "binarize", "otsu_threshold", "saliency_to_prompts"]
