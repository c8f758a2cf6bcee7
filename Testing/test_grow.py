"""A found mask grown to the map's soft edge (``postprocess.grow``, a rule's ``grow_threshold``) and how the
calibration chooses it (``calibration.with_growth``)."""
import numpy as np
import pytest

from CLIPSegLib.evaluation.metrics import dice
from CLIPSegLib.inference.pipeline import FindingResult
from CLIPSegLib.inference.postprocess import decide
from CLIPSegLib.training import calibration

SPACING = (1.0, 1.0, 1.0)
RULE = {"threshold": 0.5, "min_peak": 0.9, "min_extent_mm": 1.0, "min_area_mm2": 1.0}


def _finding_with_rim(rim: float = 0.35, stray: float = 0.35):
    """[6,24,24]: a sure core (0.95) in a rim of ``rim``, and a separate blob of ``stray`` it does not touch."""
    prob = np.zeros((6, 24, 24), np.float32)
    prob[1:5, 4:14, 4:14] = rim
    prob[1:5, 6:12, 6:12] = 0.95
    prob[1:5, 18:22, 18:22] = stray
    return prob


def test_the_found_mask_grows_to_the_soft_edge_it_touches_and_nothing_else():
    prob = _finding_with_rim()
    plain, info = decide(prob, SPACING, 0, RULE)
    assert info["status"] == "found" and plain.sum() == 4 * 36 and "grow_threshold" not in info
    grown, ginfo = decide(prob, SPACING, 0, {**RULE, "grow_threshold": 0.3})
    rim = np.zeros(prob.shape, bool)
    rim[1:5, 4:14, 4:14] = True
    np.testing.assert_array_equal(grown, rim)  # core and rim; the stray blob above 0.3 is not joined
    assert ginfo["grow_threshold"] == 0.3 and ginfo["grown_voxels"] == 4 * (100 - 36) and ginfo["voxels"] == 400
    # the decision and its evidence are the core's, as without growth
    assert ginfo["mean"] == pytest.approx(info["mean"]) and ginfo["evidence"] == info["evidence"]
    assert "400 voxels, 256 of them joined at probability > 0.30" in FindingResult("nodule", grown, ginfo).message()
    # a grow threshold above the rim's probability, or not below the decision's threshold, changes nothing
    for low in (0.4, 0.5, 0.6):
        np.testing.assert_array_equal(decide(prob, SPACING, 0, {**RULE, "grow_threshold": low})[0], plain)


def test_growth_never_makes_an_absent_finding_found():
    prob = _finding_with_rim()
    prob[prob > 0.9] = 0.45  # nothing above the decision threshold: the 0.35 rim must not become a finding
    mask, info = decide(prob, SPACING, 0, {**RULE, "grow_threshold": 0.2})
    assert info["status"] == "not found" and not mask.any() and "grown_voxels" not in info


def _cases(n_present: int, rim_in_truth: bool, n_absent: int = 3):
    cases = []
    for k in range(n_present + n_absent):
        prob = _finding_with_rim(rim=0.35 if k % 2 else 0.25)
        truth = np.zeros(prob.shape, bool)
        if k < n_present:
            truth[1:5, 4:14, 4:14] = True
            if not rim_in_truth:
                truth[1:5, 4:14, 4:14] = prob[1:5, 4:14, 4:14] > 0.9
        else:
            prob[prob > 0.9] = 0.0  # absent: only the rim and the stray blob, below the decision threshold
        cases.append((prob, truth, calibration._entry("nodule", prob, truth, SPACING, 0,
                                                      grow=calibration.GROW_THRESHOLDS)))
    return cases


def test_the_calibrations_grown_dice_is_the_dice_of_the_pipelines_grown_mask():
    cases = _cases(4, rim_in_truth=True)
    for low in calibration.GROW_THRESHOLDS:
        expected = [dice(decide(prob, SPACING, 0, {**RULE, "grow_threshold": low})[0], truth)
                    for prob, truth, _ in cases if truth.any()]
        got = calibration.grown_dice([e for *_, e in cases], {**calibration.DEFAULT_PRESENCE, **RULE}, low)
        np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_the_calibration_grows_a_finding_only_where_its_truth_holds_the_soft_edge():
    rule = {**calibration.DEFAULT_PRESENCE, **RULE, "calibration": {"mean_dice": 0.36}}
    # rims of 0.25 and 0.35 both in the truth: 0.2 takes both (the higher 0.3 only half)
    grown = calibration.with_growth(rule, [e for *_, e in _cases(6, rim_in_truth=True)], "nodule")
    assert grown["grow_threshold"] == 0.2 and grown["calibration"]["mean_dice"] == 1.0
    assert grown["calibration"]["grow"]["none"] == pytest.approx(0.5294, abs=1e-4)  # core 36 of 100 voxels
    # the rim outside the truth: growing only costs Dice, so none is taken
    kept = calibration.with_growth(rule, [e for *_, e in _cases(6, rim_in_truth=False)], "nodule")
    assert kept["grow_threshold"] is None and kept["calibration"]["mean_dice"] == 1.0
    assert kept["calibration"]["grow"]["0.2"] < 1.0
    # too few present cases to tell: no growth, nothing searched
    few = calibration.with_growth(rule, [e for *_, e in _cases(4, rim_in_truth=True)], "nodule")
    assert few["grow_threshold"] is None and "grow" not in few["calibration"]
