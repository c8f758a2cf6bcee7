"""Posterior acoustic shadow: does a candidate region darken the tissue below it, as a calcification does?

In B-mode ultrasound a strongly reflecting and attenuating structure (a calcification, a stone) leaves a dark band
behind it along the beam, while a bright speckle grain or a point scatterer of the same brightness does not. This is
the sonographer's sign for a calcification, and it does not depend on the gain or the speckle level of the scanner.
The measure compares, on each of the region's slices, the tissue just below the region with the tissue at the same
depth beside it, in units of that tissue's spread.

Layout assumption (as in both phantom families and in 2D ultrasound frames stacked into a volume): the beam runs
down the image rows, i.e. along the array's J axis of ``[K, J, I]``; slices along K or I. With slices along J the
shadow is not measured (``inf``: no rule can fail on it).
"""

from __future__ import annotations

import numpy as np

DEPTH_AXIS = 1  # J: the beam runs down the rows
SHADOW_GAP_MM = 0.3  # the band starts this far below the region's lower border ...
SHADOW_DEPTH_MM = 3.0  # ... and reaches this much deeper
SIDE_MM = 1.5  # the reference: bands this wide on both sides of the region's columns, at the same depths
REACH_MM = SHADOW_GAP_MM + SHADOW_DEPTH_MM + SIDE_MM  # how far around a region the measure reads the image


def posterior_shadow(image: np.ndarray, region: np.ndarray, spacing_kji, array_axis: int) -> float:
    """``(mean(beside) - mean(below)) / std(beside)``: how much darker the tissue below ``region`` is than the tissue
    at the same depth beside it, in units of that tissue's spread. Positive: a shadow; negative: enhancement (as
    behind a cyst); about 0: neither (a bright speckle grain).

    ``image``, ``region``: ``[K,J,I]`` (raw intensities, bool) of the same box, grown by at least ``REACH_MM``
    around the region; ``spacing_kji``: mm in array order; slices along ``array_axis`` (0=K or 2=I). Below: for each
    column of the region on each of its slices, ``SHADOW_GAP_MM`` .. ``SHADOW_GAP_MM + SHADOW_DEPTH_MM`` under its
    lowest voxel. Beside: ``SIDE_MM`` bands left and right of the region's columns, over the same depths. Unchanged
    by any gain or offset of the image. ``inf`` when it cannot be measured: slices along J, or no tissue below the
    region (it touches the bottom of the image) or beside it; never ``-inf`` (the decision's JSON stays valid)."""
    if array_axis == DEPTH_AXIS:
        return float("inf")
    lateral_axis = 2 if array_axis == 0 else 0
    img = np.moveaxis(image, (array_axis, DEPTH_AXIS, lateral_axis), (0, 1, 2))
    reg = np.moveaxis(region, (array_axis, DEPTH_AXIS, lateral_axis), (0, 1, 2))
    sj, sl = float(spacing_kji[DEPTH_AXIS]), float(spacing_kji[lateral_axis])
    gap, depth = int(round(SHADOW_GAP_MM / sj)), max(1, int(round(SHADOW_DEPTH_MM / sj)))
    side = max(2, int(round(SIDE_MM / sl)))
    rows, cols = img.shape[1:]
    below, beside = [], []
    for k in np.flatnonzero(reg.any(axis=(1, 2))):
        plane = reg[k]
        columns = np.flatnonzero(plane.any(axis=0))
        lowest = rows - 1 - np.argmax(plane[::-1, columns], axis=0)  # the region's lowest row in each column
        start = lowest + 1 + gap
        band = start[:, None] + np.arange(depth)[None, :]  # [columns, depth] rows under each column
        inside = band < rows
        below.append(img[k][np.minimum(band, rows - 1), columns[:, None]][inside])
        r0, r1 = int(start.min()), min(int(start.max()) + depth, rows)
        if r0 >= rows:
            continue
        lo, hi = int(columns.min()), int(columns.max())
        beside.append(img[k, r0:r1, max(lo - 1 - side, 0):max(lo - 1, 0)].ravel())
        beside.append(img[k, r0:r1, min(hi + 2, cols):min(hi + 2 + side, cols)].ravel())
    under = np.concatenate(below).astype(np.float64) if below else np.zeros(0)
    ref = np.concatenate(beside).astype(np.float64) if beside else np.zeros(0)
    if under.size == 0 or ref.size < 4:
        return float("inf")
    diff = float(ref.mean() - under.mean())
    spread = float(ref.std())
    if spread <= 1e-12 * max(1.0, abs(float(ref.mean()))):
        return float("inf") if diff > 0 else 0.0  # flat tissue beside: darker below is all shadow, else none
    return diff / spread
