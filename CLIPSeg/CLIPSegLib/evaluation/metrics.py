"""Segmentation metrics on boolean masks, computed with MONAI; foreground only, never averaged with background.

Masks are ``[K,J,I]`` (or any 2D/3D shape); spacing is given in mm in the same axis order as the array.
Conventions (stated in every report): Dice and IoU of the foreground; HD95 = 95th percentile of the symmetric
surface distances in mm; NSD = normalised surface Dice at a tolerance in mm. A case whose truth is empty is scored by
its false-positive volume (mm^3), not dropped; Dice is 1 only if the prediction is empty too.
"""

from __future__ import annotations

import numpy as np


def _t(mask):
    import torch

    return torch.from_numpy(np.asarray(mask, bool))[None, None].float()


def _check(pred, truth):
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction has shape {pred.shape}, truth has {truth.shape}")
    return pred, truth


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Foreground Dice; 1.0 when both are empty (MONAI ``compute_dice``)."""
    from monai.metrics import compute_dice

    pred, truth = _check(pred, truth)
    return float(compute_dice(_t(pred), _t(truth), include_background=True, ignore_empty=False)[0, 0])


def swap_dice(pred_a: np.ndarray, truth_a: np.ndarray, truth_b: np.ndarray) -> dict[str, float]:
    """Prompt-swap figures of finding A's segment against another finding B in the same image (bool ``[K,J,I]``).

    ``dice``: Dice(A's segment, B's truth), the plain figure. ``floor``: Dice(A's truth, B's truth), what a perfect
    segment of A scores, above 0 when the findings share voxels (calcifications inside a nodule belong to both).
    ``unshared``: Dice(A's segment, the part of B's truth that is not A's), 0 for a perfect segment; 0 too when B lies
    wholly inside A."""
    truth_a, truth_b = np.asarray(truth_a, bool), np.asarray(truth_b, bool)
    own_b = truth_b & ~truth_a
    return {"dice": dice(pred_a, truth_b), "floor": dice(truth_a, truth_b),
            "unshared": dice(pred_a, own_b) if own_b.any() else 0.0}


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Foreground IoU (Jaccard); 1.0 when both are empty (MONAI ``compute_iou``)."""
    from monai.metrics import compute_iou

    pred, truth = _check(pred, truth)
    return float(compute_iou(_t(pred), _t(truth), include_background=True, ignore_empty=False)[0, 0])


def hd95(pred: np.ndarray, truth: np.ndarray, spacing) -> float:
    """95th-percentile Hausdorff distance in mm; NaN if either mask is empty (MONAI)."""
    from monai.metrics import compute_hausdorff_distance

    pred, truth = _check(pred, truth)
    if not pred.any() or not truth.any():
        return float("nan")
    return float(compute_hausdorff_distance(_t(pred), _t(truth), include_background=True, percentile=95,
                                            spacing=list(map(float, spacing)))[0, 0])


def nsd(pred: np.ndarray, truth: np.ndarray, spacing, tolerance_mm: float) -> float:
    """Normalised surface Dice at ``tolerance_mm``; NaN if either mask is empty (MONAI ``compute_surface_dice``)."""
    from monai.metrics import compute_surface_dice

    pred, truth = _check(pred, truth)
    if not pred.any() or not truth.any():
        return float("nan")
    return float(compute_surface_dice(_t(pred), _t(truth), class_thresholds=[tolerance_mm], include_background=True,
                                      spacing=list(map(float, spacing)))[0, 0])


def false_positive_volume(pred: np.ndarray, truth: np.ndarray, spacing) -> float:
    """Volume (mm^3) of predicted voxels outside the truth."""
    pred, truth = _check(pred, truth)
    return float((pred & ~truth).sum() * np.prod(list(map(float, spacing))))


def case_metrics(pred: np.ndarray, truth: np.ndarray, spacing, tolerance_mm: float = 2.0) -> dict:
    """All metrics of one (case, finding); spacing in mm in array axis order."""
    out = {"truth_voxels": int(np.asarray(truth, bool).sum()), "pred_voxels": int(np.asarray(pred, bool).sum()),
           "dice": dice(pred, truth), "iou": iou(pred, truth),
           "false_positive_mm3": false_positive_volume(pred, truth, spacing)}
    if out["truth_voxels"]:
        out["hd95_mm"] = hd95(pred, truth, spacing)
        out[f"nsd_{tolerance_mm:g}mm"] = nsd(pred, truth, spacing, tolerance_mm)
    return out


# Fewer cases than this get no confidence interval: a bootstrap of n values has at most C(2n-1, n) distinct resampled
# means (3 for n=2, 35 for n=4, 126 for n=5), so with 2 cases the "interval" collapses to about one value (0.931
# [0.931, 0.931] for cases 0.913 and 0.950) and says nothing about the uncertainty, which is then the largest.
MIN_CI_CASES = 5


def summarize(values, seed: int = 0) -> dict:
    """mean, median and a 95% bootstrap CI of the mean (scipy.stats.bootstrap, BCa) over the finite values.

    With fewer than ``MIN_CI_CASES`` values ``ci95`` is None and ``ci95_reason`` says why; values that are all equal
    give the zero-width interval [mean, mean]."""
    from scipy.stats import bootstrap

    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], float)
    out = {"n": int(v.size), "mean": float(v.mean()) if v.size else None,
           "median": float(np.median(v)) if v.size else None, "ci95": None}
    if v.size < MIN_CI_CASES:
        out["ci95_reason"] = (f"n too small for an interval: {v.size} < {MIN_CI_CASES}" if v.size
                              else "no cases")
    elif np.ptp(v) > 0:
        res = bootstrap((v,), np.mean, n_resamples=2000, confidence_level=0.95, random_state=seed, method="BCa")
        out["ci95"] = [float(res.confidence_interval.low), float(res.confidence_interval.high)]
    else:
        out["ci95"] = [float(v.mean()), float(v.mean())]
    return out


def format_mean_ci(s: dict, digits: int = 3) -> str:
    """A ``summarize`` result as ``0.852 [0.704, 0.919]``, ``0.931 (n too small for an interval: 2 < 5)`` or
    ``n/a``."""
    if s.get("mean") is None:
        return "n/a"
    text = f"{s['mean']:.{digits}f}"
    if s.get("ci95"):
        return f"{text} [{s['ci95'][0]:.{digits}f}, {s['ci95'][1]:.{digits}f}]"
    return f"{text} ({s['ci95_reason']})" if s.get("ci95_reason") else text
