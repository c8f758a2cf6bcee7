"""A found mask grown to the map's soft edge (``postprocess.growth_cells``, a rule's ``grow_threshold``) and how the
calibration chooses it (``calibration.with_growth``)."""
import numpy as np
import pytest
from scipy import ndimage

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


def test_a_region_the_rule_dropped_and_the_soft_edge_nearer_to_it_stay_out_of_the_grown_mask():
    prob = _finding_with_rim(stray=0.0)
    prob[1:5, 4:6, 14:20] = 0.35  # a bridge of soft edge from the rim ...
    prob[1:5, 4:8, 20:24] = 0.6  # ... to a weak region the rule drops (peak 0.6 < 0.9)
    mask, info = decide(prob, SPACING, 0, {**RULE, "grow_threshold": 0.3})
    assert info["status"] == "found" and info["dropped_components"] == 1 and info["components"] == 1
    assert mask[1:5, 4:14, 4:14].all()  # the rim joins ...
    assert not mask[1:5, 4:8, 20:24].any()  # ... the dropped region does not ...
    # ... and the bridge is split where it is as far from the core (columns 6-11) as from the dropped region (20-23)
    assert mask[1:5, 4:6, 14:16].all() and not mask[1:5, 4:6, 17:20].any()
    # where the growth encloses a dropped region: its own soft edge stays out with it, no ring around a gap
    enclosed = _finding_with_rim(stray=0.0)
    enclosed[0:6, 14:22, 4:12] = 0.35
    enclosed[2:4, 16:20, 6:10] = 0.6
    mask, info = decide(enclosed, SPACING, 0, {**RULE, "grow_threshold": 0.3})
    assert info["dropped_components"] == 1 and mask[1:5, 4:14, 4:14].all()
    assert not mask[0:6, 15:22, 4:12].any()  # that soft edge is nearer the dropped region ...
    assert ndimage.label(mask)[1] == 1  # ... and what joins the core is connected to it
    np.testing.assert_array_equal(decide(enclosed, SPACING, 0, RULE)[0], enclosed > 0.9)  # without growth: the core
    # a finding that only narrowly misses its rule is kept UNCERTAIN at its own size
    unsure = {**RULE, "min_peak": 0.96, "grow_threshold": 0.3}
    mask, info = decide(prob, SPACING, 0, unsure)
    assert info["status"] == "uncertain" and mask.sum() == 4 * 36 and "grown_voxels" not in info


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
    prob, truth, _ = cases[1]  # one more with a dropped region inside the grown one (it must stay out of both)
    prob = prob.copy()
    prob[1:5, 4:6, 14:20] = 0.35
    prob[1:5, 4:8, 20:24] = 0.6
    truth = truth.copy()
    truth[1:5, 4:8, 20:24] = True
    cases.append((prob, truth, calibration._entry("nodule", prob, truth, SPACING, 0,
                                                  grow=calibration.GROW_THRESHOLDS)))
    prob, truth = prob.copy(), truth.copy()  # and one where that dropped region is enclosed by the growth
    prob[0:6, 14:22, 4:12] = 0.35
    prob[2:4, 16:20, 6:10] = 0.6
    truth[0:6, 14:22, 4:12] = True
    cases.append((prob, truth, calibration._entry("nodule", prob, truth, SPACING, 0,
                                                  grow=calibration.GROW_THRESHOLDS)))
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


def test_the_pipeline_follows_a_findings_growth_and_a_users_threshold_turns_it_off():
    import torch

    from CLIPSegLib.inference.pipeline import segment_volume
    from CLIPSegLib.io.geometry import Geometry
    from test_pipeline import _MapEngine

    cyst = torch.zeros(16, 16)
    cyst[4:12, 4:12] = 0.35
    cyst[6:10, 6:10] = 0.95
    engine = _MapEngine({"nodule": torch.zeros(16, 16), "cyst": cyst, "calcification": torch.zeros(16, 16)})
    engine.spec["presence"]["per_finding"]["cyst"]["grow_threshold"] = 0.3
    vol = np.random.default_rng(0).random((3, 16, 16)).astype(np.float32)
    run = lambda **kw: segment_volume(engine, vol, Geometry.axis_aligned((1.0, 1.0, 1.0)), ["cyst"], axis=2,  # noqa
                                      **kw).findings[0]
    grown = run()
    assert grown.mask.sum() == 3 * 64 and grown.info["grown_voxels"] == 3 * 48
    assert grown.event()["grow_threshold"] == 0.3
    plain = run(presence={"threshold": 0.5})  # --threshold: the mask the user's threshold draws
    assert plain.mask.sum() == 3 * 16 and "grown_voxels" not in plain.info


def test_calibrate_rules_writes_each_findings_growth(monkeypatch):
    from types import SimpleNamespace

    from CLIPSegLib.engines.contract import PromptReading, PromptState

    def predict(engine, image, geometry, state, axis, flip_average=None, **kw):
        maps = np.zeros((len(state), *image.shape), np.float32)
        if image.max() > 1:  # present: a sure core in a soft rim, both in the truth
            maps[:, :, 2:8, 2:8] = 0.35
            maps[:, :, 3:7, 3:7] = 0.95
        return maps, None

    monkeypatch.setattr(calibration, "predict_patient_frame", predict)
    engine = SimpleNamespace(spec={}, encode_prompts=lambda p: PromptState(list(p), None,
                                                                          [PromptReading(t) for t in p]))
    cases = []
    for present in [True] * 5 + [False] * 3:
        truth = np.zeros((2, 10, 10), bool)
        truth[:, 2:8, 2:8] = present
        cases.append(calibration.CalibrationCase(np.full((2, 10, 10), 5.0 if present else 0.5, np.float32),
                                                 (1.0, 1.0, 1.0), {"mass": truth}, {"mass": "mass"}))
    rule = calibration.calibrate_rules(engine, cases, {"mass": ["mass"]})
    mass = rule["per_finding"]["mass"]
    # 0.2 and 0.3 both take the whole rim: the least growth is kept
    assert mass["grow_threshold"] == 0.3 and mass["calibration"]["mean_dice"] == 1.0
    assert mass["calibration"]["grow"]["none"] == pytest.approx(32 / 52, abs=1e-4)  # the core's 16 of 36 voxels
    assert rule["grow_threshold"] is None  # the global rule, for prompts matching no finding, does not grow


def test_cells_are_drawn_within_each_soft_region_in_mm_and_growth_never_takes_away():
    from CLIPSegLib.inference.postprocess import components, growth_cells

    # a row: core A (kept), its soft edge, a gap under the grow threshold, B's soft edge, core B (dropped: weak peak)
    prob = np.zeros((1, 1, 16), np.float32)
    prob[0, 0, 0:2], prob[0, 0, 2:10], prob[0, 0, 11], prob[0, 0, 12:14] = 0.95, 0.35, 0.35, 0.6
    mask, _ = decide(prob, SPACING, 0, {**RULE, "grow_threshold": 0.3})
    assert mask[0, 0].tolist() == [True] * 10 + [False] * 6  # A's soft edge is A's, however near B lies past the gap
    # spacing along (I, J, K): 1 mm columns, 3 mm slices. The voxel at slice 2, column 3 is 6 mm from core A
    # (slice 0, column 3) and 3 mm from core B (slice 2, column 0): it is B's
    prob = np.zeros((3, 1, 4), np.float32)
    prob[:, 0, 1:] = 0.35
    prob[0, 0, 3], prob[2, 0, 0] = 0.95, 0.95
    labels, _ = components(prob, (1.0, 1.0, 3.0), 0, 0.5)
    cells = growth_cells(labels, prob, 0.3, (1.0, 1.0, 3.0))
    assert cells[2, 0, 3] == labels[2, 0, 0] and cells[1, 0, 3] == labels[0, 0, 3]
    # a dropped region in a hole of a kept one: the growth may leave it out, never more than the decision filled
    prob = np.zeros((5, 12, 12), np.float32)
    prob[:, 2:10, 2:10] = 0.95
    prob[1:4, 4:8, 4:8] = 0.35
    prob[2, 5:7, 5:7] = 0.6
    plain, _ = decide(prob, SPACING, 0, RULE)
    grown, info = decide(prob, SPACING, 0, {**RULE, "grow_threshold": 0.3})
    assert plain[1:4, 4:8, 4:8].all() and (grown == plain).all() and info["grown_voxels"] == 0
