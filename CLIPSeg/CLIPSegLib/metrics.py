"""Overlap metrics on boolean masks, computed with MONAI (foreground only, never averaged with background)."""

from __future__ import annotations

import numpy as np


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Foreground Dice of two bool masks of equal shape; 1.0 when both are empty (MONAI ``compute_dice``)."""
    import torch
    from monai.metrics import compute_dice

    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction has shape {pred.shape}, truth has {truth.shape}")
    p = torch.from_numpy(pred)[None, None].float()
    t = torch.from_numpy(truth)[None, None].float()
    return float(compute_dice(p, t, include_background=True, ignore_empty=False)[0, 0])
