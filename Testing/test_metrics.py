"""Each metric against values computed by hand on tiny masks."""

import numpy as np
import pytest

from CLIPSegLib.evaluation.metrics import case_metrics, dice, false_positive_volume, hd95, iou, nsd, summarize


def masks():
    truth = np.zeros((1, 4, 4), bool)
    truth[0, 0, 0:4] = True  # 4 voxels
    pred = np.zeros_like(truth)
    pred[0, 0, 2:4] = True
    pred[0, 1, 2:4] = True  # 4 voxels, 2 overlap
    return pred, truth


def test_dice_and_iou_by_hand():
    pred, truth = masks()
    assert dice(pred, truth) == pytest.approx(2 * 2 / (4 + 4))
    assert iou(pred, truth) == pytest.approx(2 / 6)
    empty = np.zeros_like(truth)
    assert dice(empty, empty) == 1.0 and dice(pred, empty) == 0.0


def test_hd95_uses_mm_spacing():
    a = np.zeros((1, 1, 8), bool)
    b = np.zeros_like(a)
    a[0, 0, 0] = True
    b[0, 0, 3] = True
    assert hd95(a, b, spacing=(1.0, 1.0, 2.0)) == pytest.approx(6.0)  # 3 voxels x 2 mm
    assert np.isnan(hd95(a, np.zeros_like(a), spacing=(1, 1, 1)))


def test_nsd_counts_surface_within_tolerance():
    a = np.zeros((1, 1, 8), bool)
    b = np.zeros_like(a)
    a[0, 0, 0] = True
    b[0, 0, 3] = True
    assert nsd(a, b, (1, 1, 1), tolerance_mm=3.5) == pytest.approx(1.0)
    assert nsd(a, b, (1, 1, 1), tolerance_mm=2.5) == pytest.approx(0.0)
    assert nsd(a, a, (1, 1, 1), tolerance_mm=0.5) == pytest.approx(1.0)


def test_empty_truth_is_scored_by_false_positive_volume():
    pred = np.zeros((2, 2, 2), bool)
    pred[0, 0, :] = True
    pred[1, 1, 1] = True
    truth = np.zeros_like(pred)
    assert false_positive_volume(pred, truth, spacing=(3.0, 2.0, 1.0)) == pytest.approx(3 * 6.0)
    m = case_metrics(pred, truth, (3.0, 2.0, 1.0))
    assert m["dice"] == 0.0 and m["false_positive_mm3"] == pytest.approx(18.0) and "hd95_mm" not in m


def test_summary_mean_median_and_bootstrap_ci():
    s = summarize([0.2, 0.4, 0.5, 0.6, 0.8, float("nan"), None])
    assert s["n"] == 5 and s["mean"] == pytest.approx(0.5) and s["median"] == pytest.approx(0.5)
    lo, hi = s["ci95"]
    assert 0.2 <= lo < 0.5 < hi <= 0.8
    assert summarize([])["mean"] is None and summarize([])["ci95"] is None


def test_too_few_cases_give_no_interval_but_say_why():
    from CLIPSegLib.evaluation.metrics import MIN_CI_CASES, format_mean_ci

    s = summarize([0.913, 0.950])  # was reported as 0.931 [0.931, 0.931]
    assert s["ci95"] is None and s["ci95_reason"] == f"n too small for an interval: 2 < {MIN_CI_CASES}"
    assert format_mean_ci(s) == f"0.931 (n too small for an interval: 2 < {MIN_CI_CASES})"
    assert summarize([0.9] * (MIN_CI_CASES - 1))["ci95"] is None
    assert summarize([0.9] * MIN_CI_CASES)["ci95"] == [pytest.approx(0.9)] * 2  # all equal: zero width, honestly
    assert format_mean_ci(summarize([0.2, 0.4, 0.5, 0.6, 0.8])).startswith("0.500 [0.")
    assert format_mean_ci(summarize([])) == "n/a"


def test_prompt_swap_figures_separate_shared_voxels_from_real_confusion():
    from CLIPSegLib.evaluation.metrics import swap_dice

    nodule = np.zeros((1, 10, 10), bool)
    nodule[0, 2:8, 2:8] = True  # 36 voxels
    calc = np.zeros_like(nodule)
    calc[0, 4:6, 4:6] = True  # 4 voxels, inside the nodule: they belong to both findings
    perfect = swap_dice(nodule, nodule, calc)
    assert perfect["dice"] == pytest.approx(2 * 4 / 40) and perfect["floor"] == perfect["dice"]
    assert perfect["unshared"] == 0.0  # nothing of the calcification lies outside the nodule
    cyst = np.zeros_like(nodule)
    cyst[0, 8:10, 0:10] = True  # 20 voxels beside the nodule
    leaking = nodule | cyst  # the nodule's segment swallows the cyst
    confused = swap_dice(leaking, nodule, cyst)
    assert confused["floor"] == 0.0 and confused["unshared"] == pytest.approx(2 * 20 / (56 + 20))
