"""The presence calibration's search on hand-made components: what it keeps, what it drops, and which gate wins."""

import pytest

from CLIPSegLib.training.calibration import (THRESHOLD_MARGIN, THRESHOLD_MIN_PRESENT, case_outcomes, case_table,
                                             evaluate_rule, search_gate_and_rule, search_rule,
                                             search_threshold_gate_and_rule)
from CLIPSegLib.inference.postprocess import Component


def _c(label, voxels, peak, extent_mm, area, mean=0.95):
    return Component(label, voxels, peak, n_slices=max(1, int(extent_mm)), extent_mm=extent_mm, max_area_mm2=area,
                     mean=mean)


def _cases(fp_peak):
    """Two volumes with a nodule (a big true component + a small stray one) and two without (one stray blob each)."""
    return [
        ("nodule", 1000, [(_c(1, 1000, 0.99, 8.0, 60.0), 1000), (_c(2, 30, 0.9, 1.0, 3.0), 0)], 20.0),
        ("nodule", 800, [(_c(1, 900, 0.97, 6.0, 50.0), 800)], 20.0),
        ("nodule", 0, [(_c(1, 40, fp_peak, 1.0, 4.0), 0)], 20.0),
        ("nodule", 0, [], 20.0),
    ]


def test_rule_figures_are_counted_per_case():
    keep_all = {"threshold": 0.5, "min_peak": 0.5, "min_extent_mm": 0.0, "min_area_mm2": 0.0}
    empty, dice = evaluate_rule(_cases(0.9), keep_all)
    assert empty == 0.5  # one of the two absent cases has a stray blob
    assert abs(dice["nodule"] - (2 * 1000 / 2030 + 2 * 800 / 1700) / 2) < 1e-9


def test_case_outcomes_say_what_a_rule_does_to_each_case():
    strict = {"threshold": 0.5, "min_peak": 0.95, "min_extent_mm": 0.0, "min_area_mm2": 0.0}
    left_empty, dice = case_outcomes(case_table(_cases(0.9)), strict)
    # the stray blob of the first absent case (peak 0.9) is dropped; both nodules keep their true component only
    assert left_empty.tolist() == [False, False, True, True]
    assert abs(dice[0] - 2 * 1000 / 2000) < 1e-9 and abs(dice[1] - 2 * 800 / 1700) < 1e-9
    assert dice[2] == 0.0 and dice[3] == 0.0


def test_search_drops_stray_blobs_and_keeps_the_findings():
    rule = search_rule(_cases(0.9))
    assert rule["calibration"]["absent_empty_rate"] == 1.0
    assert rule["calibration"]["mean_dice"]["nodule"] > 0.97  # both true components kept, the stray one dropped
    assert rule["slice_gate"] == 1.0 and rule["calibration"]["score"] > 2.9


def test_a_finding_absent_from_every_calibration_case_gets_a_rule_that_leaves_it_empty():
    """No present case, so no Dice to weigh: the rule that empties the absent cases wins, not the least demanding."""
    absent_only = [c for c in _cases(0.9) if not c[1]] + [("nodule", 0, [(_c(1, 60, 0.8, 2.0, 6.0), 0)], 20.0)]
    rule = search_rule(absent_only)
    assert rule["calibration"]["absent_empty_rate"] == 1.0  # (the keep-all rule empties 1 of the 3)
    assert rule["calibration"]["score"] == 2.0


def test_the_gate_whose_cases_score_best_is_chosen():
    by_gate = {1.0: [c for c in _cases(0.9) if c[1]] + [("nodule", 0, [(_c(1, 900, 0.99, 8.0, 60.0), 0)], 20.0)],
               0.5: _cases(0.9)}
    best = search_gate_and_rule(by_gate, "nodule")
    assert best["slice_gate"] == 0.5 and best["calibration"]["absent_empty_rate"] == 1.0


def test_a_lower_threshold_wins_only_when_it_scores_clearly_better_on_enough_present_cases():
    """A hazy finding: at 0.5 only its core passes (a third of it), at 0.3 the whole of it; the absent case's stray
    blob is dropped by its peak at both. 0.3 is kept; a gain under the margin, or shown by too few cases holding the
    finding, leaves the default 0.5."""
    def at(voxels, overlap, present=THRESHOLD_MIN_PRESENT):
        return {1.0: [("haze", 900, [(_c(1, voxels, 0.99, 8.0, 60.0, mean=0.95), overlap)], 20.0)] * present
                + [("haze", 0, [(_c(1, 40, 0.6, 1.0, 4.0), 0)], 20.0)]}

    rule = search_threshold_gate_and_rule({0.5: at(300, 300), 0.3: at(900, 900)}, "haze")
    assert rule["threshold"] == 0.3 and rule["calibration"]["mean_dice"]["haze"] == 1.0
    assert rule["calibration"]["absent_empty_rate"] == 1.0
    # 0.3 better by less than the margin (its score is higher by 1 - Dice at 0.5 = 1 - 2*890/1790): 0.5 stays
    close = search_threshold_gate_and_rule({0.5: at(890, 890), 0.3: at(900, 900)}, "haze")
    assert 1.0 - 2 * 890 / 1790 < THRESHOLD_MARGIN and close["threshold"] == 0.5
    # the same clear gain shown by one case less than the least: 0.5 stays
    few = THRESHOLD_MIN_PRESENT - 1
    assert search_threshold_gate_and_rule({0.5: at(300, 300, few), 0.3: at(900, 900, few)}, "haze")["threshold"] == 0.5


def test_a_large_half_believed_component_is_dropped_by_its_mean_probability():
    """The false cyst on a dark nodule: as large and as peaked as the true cysts, but of middling probability
    throughout. Only the mean probability tells them apart, and the search finds that test."""
    cases = [
        ("cyst", 2000, [(_c(1, 2000, 0.99, 8.0, 60.0, mean=0.96), 2000)], 20.0),
        ("cyst", 1500, [(_c(1, 1500, 0.99, 7.0, 50.0, mean=0.95), 1500)], 20.0),
        ("cyst", 0, [(_c(1, 3000, 0.99, 9.0, 70.0, mean=0.88), 0)], 20.0),
        ("cyst", 0, [], 20.0),
    ]
    rule = search_rule(cases)
    assert 0.88 < rule["min_mean"] <= 0.95
    assert rule["calibration"]["absent_empty_rate"] == 1.0 and rule["calibration"]["mean_dice"]["cyst"] == 1.0
    empty, _ = evaluate_rule(cases, {**rule, "min_mean": 0.0})
    assert empty == 0.5  # without the mean test the false cyst stays


def test_a_phrase_outside_the_phantom_findings_trains_and_calibrates(tmp_path):
    """A user's own phrase ('bright disc'), from a CSV table: the segmenter trains on it and the calibration makes it
    a rule of its own, with no phantom finding involved."""
    import numpy as np
    import torch

    from CLIPSegLib.training.calibration import calibrate_presence
    from CLIPSegLib.training.datasets import FolderTriples
    from CLIPSegLib.engines.cliptnseg.network import build_network
    from CLIPSegLib.io.geometry import Geometry
    from CLIPSegLib.io.outputs import write_volume
    from CLIPSegLib.training.cliptnseg_recipe import train_segmenter

    from conftest import TINY_SPEC

    rng = np.random.default_rng(0)
    rows = ["image,mask,phrase"]
    for n in range(6):
        image = rng.normal(100, 5, (2, 32, 32)).astype(np.float32)
        mask = np.zeros(image.shape, np.uint8)
        if n % 3:  # every third image has no disc: the phrase is absent there
            yy, xx = np.mgrid[0:32, 0:32]
            disc = (yy - 8 - 2 * n) ** 2 + (xx - 12) ** 2 < 30
            image[:, disc] = 200
            mask[:, disc] = 1
        geometry = Geometry.axis_aligned((2.0, 1.0, 1.0))
        write_volume(tmp_path / f"i{n}.nrrd", image, geometry)
        write_volume(tmp_path / f"m{n}.nrrd", mask, geometry)
        rows.append(f"i{n}.nrrd,m{n}.nrrd,bright disc")
    (tmp_path / "table.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    torch.manual_seed(0)
    net = build_network(TINY_SPEC)
    losses = train_segmenter(net, FolderTriples(tmp_path / "table.csv", 32), steps=3, ckpt=tmp_path / "s.pt",
                             batch_size=4)
    assert len(losses) == 3
    rule = calibrate_presence(net, table_csv=tmp_path / "table.csv")
    assert list(rule["per_finding"]) == ["bright disc"]
    disc = rule["per_finding"]["bright disc"]
    assert disc["phrases"] == ["bright disc"] and {"min_peak", "min_mean", "min_area_mm2"} <= set(disc)
    assert rule["calibration"]["volumes"] == 6 and rule["exclusive"] == []
    assert 0.0 <= disc["calibration"]["absent_empty_rate"] <= 1.0


def test_recalibration_rewrites_the_phantom_rules_and_keeps_a_fine_tuned_phrase(tiny_model, tmp_path):
    import json

    import pytest

    from CLIPSegLib.errors import InputError
    from CLIPSegLib.synthetic.phantoms import FINDINGS
    from CLIPSegLib.training.recalibrate import recalibrate_model

    spec = json.loads(tiny_model.read_text())
    own = {"threshold": 0.4, "min_peak": 0.6, "min_mean": 0.5, "min_extent_mm": 1.0, "min_area_mm2": 2.0,
           "phrases": ["bright disc"], "calibration": {"method": "held-out split"}}
    spec["presence"] = {**spec["presence"], "per_finding": {"bright disc": own}}
    tuned = tiny_model.parent / "tuned.json"
    tuned.write_text(json.dumps(spec), encoding="utf-8")
    out = recalibrate_model(str(tuned), tmp_path / "elsewhere" / "re.json", 1, family="A", command="cmd")
    new = json.loads(out.read_text(encoding="utf-8"))
    per = new["presence"]["per_finding"]
    assert per["bright disc"] == own  # the user's phrase keeps the rule calibrated on their slices
    assert set(FINDINGS) <= set(per) and new["presence"]["calibration"]["family"] == "A"
    assert new["presence"]["calibration"]["volumes"] == 1 and new["presence"]["calibration"]["command"] == "cmd"
    assert all((out.parent / f["name"]).is_file() for f in new["files"])  # weights copied beside the new spec
    with pytest.raises(InputError, match="exists"):
        recalibrate_model(str(tuned), out, 1, family="A")


@pytest.mark.parametrize("engine, given, searched", [("cliptnseg", None, (0.5,)),
                                                    ("tgcnet", None, (0.5, 0.3, 0.4, 0.6, 0.7)),
                                                    ("cliptnseg", (0.5, 0.6, 0.7), (0.5, 0.6, 0.7))])
def test_recalibration_searches_the_engines_thresholds_or_those_asked(tiny_model, tmp_path, monkeypatch,
                                                                            engine, given, searched):
    """A tgcnet model's phantom rules may take another probability threshold than 0.5 (as its training calibrates
    them); a cliptnseg model's keep 0.5 (the search cost absent findings under a family shift) unless
    ``clipseg calibrate --thresholds`` asks for others; the rule records what was searched."""
    import json
    import shutil
    from types import SimpleNamespace

    import CLIPSegLib.inference.segment_file as segment_file
    import CLIPSegLib.training.calibration as calibration
    import CLIPSegLib.training.recalibrate as recalibrate

    spec = {**json.loads(tiny_model.read_text()), "engine": engine}
    path = tmp_path / "src" / f"as-{engine}.json"  # not beside the shared tiny model: other tests list that folder
    path.parent.mkdir()
    for f in spec["files"]:
        shutil.copy2(tiny_model.parent / f["name"], path.parent / f["name"])
    path.write_text(json.dumps(spec), encoding="utf-8")
    asked = []

    def fake_rules(*args, thresholds=(0.5,), **kw):
        asked.append(tuple(thresholds))
        return {"calibration": {}, "per_finding": {}}

    monkeypatch.setattr(segment_file, "load_engine", lambda model, device="cpu": SimpleNamespace(name=engine))
    monkeypatch.setattr(calibration, "calibrate_rules", fake_rules)
    out = recalibrate.recalibrate_model(str(path), tmp_path / "re.json", 1, family="A", thresholds=given)
    assert asked == [searched]
    assert json.loads(out.read_text())["presence"]["calibration"]["thresholds"] == list(searched)


@pytest.mark.parametrize("text, bad", [("0.5,1", "'1'"), ("0.5,0.5", "'0.5'"), ("0.5,x", "'x'"), ("nan", "'nan'"),
                                       ("0.5,", "''")])
def test_calibrate_refuses_thresholds_that_are_not_distinct_probabilities(tiny_model, tmp_path, capsys, text, bad):
    from CLIPSegLib.cli import main

    out = tmp_path / "re.json"
    code = main(["calibrate", "--model", str(tiny_model), "--output", str(out), "--phantoms", "1",
                 "--thresholds", text, "--progress", "none"])
    err = capsys.readouterr().err
    assert code == 2 and f"--thresholds {text}: {bad} is not a new probability between 0 and 1" in err
    assert not out.exists()


def test_calibrate_thresholds_are_searched_and_recorded_with_the_command(tiny_model, tmp_path, capsys):
    import json

    from CLIPSegLib.cli import main

    out = tmp_path / "re.json"
    assert main(["calibrate", "--model", str(tiny_model), "--output", str(out), "--phantoms", "1", "--family", "A",
                 "--thresholds", "0.5, 0.65", "--progress", "none"]) == 0
    calibration = json.loads(out.read_text())["presence"]["calibration"]
    assert calibration["thresholds"] == [0.5, 0.65] and calibration["slice_vote"] == 1
    assert calibration["command"] == (f"clipseg calibrate --output {out} --phantoms 1 --seed 20000000 --family A "
                                      f"--model {tiny_model} --thresholds 0.5,0.65 --force")


def test_thresholds_are_refused_for_a_model_that_searches_its_own(tiny_medclipsam, tiny_tgcnet, tmp_path):
    import json
    import shutil

    from CLIPSegLib.errors import InputError
    from CLIPSegLib.training.recalibrate import recalibrate_model

    report = tmp_path / "src" / "report.json"  # a tgcnet model trained on report lines
    report.parent.mkdir()
    spec = {**json.loads(tiny_tgcnet.read_text()), "training": {"dataset": "report"}}
    for f in spec["files"]:
        shutil.copy2(tiny_tgcnet.parent / f["name"], report.parent / f["name"])
    report.write_text(json.dumps(spec), encoding="utf-8")
    for model in (tiny_medclipsam, report):
        with pytest.raises(InputError, match="--thresholds applies to the phantom rules of cliptnseg and thyroid"):
            recalibrate_model(str(model), tmp_path / "re.json", 1, thresholds=(0.5, 0.6))
    for bad, message in (((0.5, 2), "'2' is not a new probability"), ("0.5", "give one or more probabilities")):
        with pytest.raises(InputError, match=message):  # the Python API checks them too, before any volume
            recalibrate_model(str(report), tmp_path / "re.json", 1, thresholds=bad)
    assert not (tmp_path / "re.json").exists()


def test_recalibrating_a_medclipsam_model_uses_its_own_search(tiny_medclipsam, tmp_path, monkeypatch):
    """``clipseg calibrate`` on a MedCLIP-SAM model goes to ``medclipsam_calibration`` (slice-presence and SAM IoU
    floors searched with the component rule; its own test covers the search) with the volumes, seeds and family
    asked, and writes the rule it returns with how it was made."""
    import json

    from CLIPSegLib.cli import main
    from CLIPSegLib.training import recalibrate

    calls = []

    def search(engine, n_volumes, seed_base, progress, family):
        calls.append((engine.name, n_volumes, seed_base, family))
        return {"min_slice_presence": 0.7, "min_sam_iou": 0.3, "neutral": ["x"], "calibration": {}}

    monkeypatch.setattr(recalibrate, "calibrate_medclipsam", search)
    out = tmp_path / "re.json"
    assert main(["calibrate", "--model", str(tiny_medclipsam), "--output", str(out), "--phantoms", "3", "--seed",
                 "20000005", "--family", "B", "--progress", "none"]) == 0
    assert calls == [("medclipsam", 3, 20000005, "B")]
    presence = json.loads(out.read_text(encoding="utf-8"))["presence"]
    assert presence["min_slice_presence"] == 0.7 and presence["min_sam_iou"] == 0.3
    assert presence["calibration"]["volumes"] == 3 and "clipseg calibrate" in presence["calibration"]["command"]


@pytest.mark.parametrize("vote, slices", [(1, [[2], [5, 6, 7]]), (3, [[5, 6, 7]])])
def test_the_calibration_judges_the_maps_after_the_models_slice_vote(monkeypatch, vote, slices):
    """A model whose spec asks neighbouring slices to vote (``inference.slice_vote``) is calibrated on voted maps,
    as the pipeline judges them: a blob on one stray slice is no candidate, a finding over three slices is."""
    from types import SimpleNamespace

    import numpy as np

    import CLIPSegLib.training.calibration as calibration

    prob = np.zeros((1, 10, 16, 16), np.float32)
    prob[0, 2, 2:6, 2:6] = 0.9  # one stray slice
    prob[0, 5:8, 8:14, 8:14] = 0.95  # the finding
    monkeypatch.setattr(calibration, "predict_patient_frame", lambda engine, image, geometry, state, axis, **kw:
                        (prob.copy(), None))
    engine = SimpleNamespace(spec={"inference": {"slice_vote": vote}}, encode_prompts=lambda prompts: prompts)
    truth = prob[0] > 0.9
    case = calibration.CalibrationCase(np.random.default_rng(0).normal(size=prob.shape[1:]).astype(np.float32),
                                       (1.0, 1.0, 2.0), {"nodule": truth}, {"nodule": "nodule"})
    out = calibration.collect_cases(engine, [case], {"nodule": ["nodule"]})
    (finding, truth_voxels, comps, extent_mm, _), = out[0.5][1.0]
    assert finding == "nodule" and truth_voxels == 108 and extent_mm == 20.0
    assert sorted(c.n_slices for c, _ in comps) == sorted(len(s) for s in slices)
    assert [overlap for c, overlap in comps if c.n_slices == 3] == [108]


def test_the_calibration_keeps_a_one_sided_prompt_to_its_side_as_the_pipeline_does(monkeypatch):
    """A model that reads the patient's sides (``inference.patient_sides``) is calibrated on the maps the pipeline
    judges: a prompt naming the patient's left loses what its map lights on the right (``side_regions_of``)."""
    from types import SimpleNamespace

    import numpy as np

    import CLIPSegLib.training.calibration as calibration
    from CLIPSegLib.engines.contract import PromptReading, PromptState

    prob = np.zeros((1, 4, 16, 16), np.float32)
    prob[0, :, 4:10, 2:5] = 0.95  # the image's left: the patient's right (identity LPS directions)
    prob[0, :, 4:10, 11:15] = 0.95  # the patient's left
    monkeypatch.setattr(calibration, "predict_patient_frame", lambda engine, image, geometry, state, axis, **kw:
                        (prob.copy(), None))
    engine = SimpleNamespace(spec={"inference": {"patient_sides": {"margin_mm": 1.0}}},
                             encode_prompts=lambda prompts: PromptState(prompts, None,
                                                                        [PromptReading(p, side=1) for p in prompts]))
    image = np.full(prob.shape[1:], 5.0, np.float32)
    image[:, :, 0] = image[:, :, 15] = 0.0  # a body over columns 1..14: midline x = 7.5 mm
    truth = np.zeros(prob.shape[1:], bool)
    truth[:, 4:10, 11:15] = True
    case = calibration.CalibrationCase(image, (1.0, 1.0, 1.0), {"mass": truth}, {"mass": "mass in the left lung"})
    (_, _, comps, _, _), = calibration.collect_cases(engine, [case], {"mass": ["mass"]})[0.5][1.0]
    assert [(c.voxels, overlap) for c, overlap in comps] == [(96, 96)]  # the right-side blob is gone
    engine.spec = {"inference": {}}
    (_, _, comps, _, _), = calibration.collect_cases(engine, [case], {"mass": ["mass"]})[0.5][1.0]
    assert sorted(c.voxels for c, _ in comps) == [72, 96]


def test_flip_choice_gives_each_finding_the_flip_setting_that_scores_better(monkeypatch):
    """``calibrate_rules(flip_choice=True)`` predicts each case once with every prompt asked twice, the second time
    averaged with the mirror, and each finding's rule keeps the setting that scores clearly better on its cases: a
    finding whose own maps paint absent cases takes the mirror's average, one that the average blurs keeps its own."""
    from types import SimpleNamespace

    import numpy as np

    import CLIPSegLib.training.calibration as calibration
    from CLIPSegLib.engines.contract import PromptReading, PromptState

    asked = []

    def predict(engine, image, geometry, state, axis, flip_average=None, **kw):
        flip_average = [flip_average] * len(state) if isinstance(flip_average, bool) else list(flip_average)
        asked.append((list(state.prompts), flip_average))
        present = image.max() > 1  # the case holds both findings
        maps = np.zeros((len(state), *image.shape), np.float32)
        for row, (prompt, flip) in enumerate(zip(state.prompts, flip_average)):
            if prompt == "stray":  # its own map paints every case; the mirror does not confirm a stray blob
                maps[row, :, 2:8, 2:8] = 0.9 if present or not flip else 0.4
            elif present:  # "sharp": right where it is; the average halves half of it
                maps[row, :, 2:8, 2:8] = 0.9
                maps[row, :, 2:8, 5:8] = 0.4 if flip else 0.9
        return maps, None

    monkeypatch.setattr(calibration, "predict_patient_frame", predict)
    engine = SimpleNamespace(spec={}, encode_prompts=lambda p: PromptState(list(p), None,
                                                                          [PromptReading(t) for t in p]))
    cases = []
    for present in [True] * 5 + [False] * 4:  # 5: enough present cases to choose (searches_thresholds)
        truth = np.zeros((2, 10, 10), bool)
        truth[:, 2:8, 2:8] = present
        image = np.full((2, 10, 10), 5.0 if present else 0.5, np.float32)
        cases.append(calibration.CalibrationCase(image, (1.0, 1.0, 1.0), {"stray": truth, "sharp": truth.copy()},
                                                 {"stray": "stray", "sharp": "sharp"}))
    rule = calibration.calibrate_rules(engine, cases, {"stray": ["stray"], "sharp": ["sharp"]}, flip_choice=True)
    assert asked[0] == (["stray", "sharp", "stray", "sharp"], [False, False, True, True])
    stray, sharp = rule["per_finding"]["stray"], rule["per_finding"]["sharp"]
    assert stray["flip_average"] is True
    assert {k: stray["calibration"][k] for k in ("absent_empty_rate", "mean_dice")} == {"absent_empty_rate": 1.0,
                                                                                       "mean_dice": 1.0}
    assert stray["calibration"]["flip_choice"] == {  # both settings' figures, so a user sees why
        "without_mirror": {"score": 2.0, "absent_empty_rate": 1.0, "mean_dice": 0.0},
        "with_mirror": {"score": 3.0, "absent_empty_rate": 1.0, "mean_dice": 1.0}}
    assert sharp["flip_average"] is False and sharp["calibration"]["mean_dice"] == 1.0
    asked.clear()
    plain = calibration.calibrate_rules(engine, cases, {"stray": ["stray"], "sharp": ["sharp"]})
    assert asked[0] == (["stray", "sharp"], [False, False]) and "flip_average" not in plain["per_finding"]["stray"]
    # its own maps alone: no rule tells the stray blob from the finding, so the best one reports nothing
    assert {k: plain["per_finding"]["stray"]["calibration"][k] for k in ("absent_empty_rate", "mean_dice")} == {
        "absent_empty_rate": 1.0, "mean_dice": 0.0}
    # findings that compete voxel-wise keep the model's setting (their rivals are judged with theirs), and so does
    # a finding held by too few cases to tell
    paired = calibration.calibrate_rules(engine, cases, {"stray": ["stray"], "sharp": ["sharp"]},
                                         exclusive=[("stray", "sharp")], flip_choice=True)
    assert paired["per_finding"]["stray"]["flip_average"] is False
    assert "flip_choice" not in paired["per_finding"]["stray"]["calibration"]
    few = calibration.calibrate_rules(engine, cases[1:], {"stray": ["stray"], "sharp": ["sharp"]}, flip_choice=True)
    assert few["per_finding"]["stray"]["flip_average"] is False


def test_flip_choice_is_refused_for_a_medclipsam_model_and_recorded_for_others(tiny_medclipsam, tiny_model,
                                                                                tmp_path, capsys):
    import json

    from CLIPSegLib.cli import main

    out = tmp_path / "re.json"
    assert main(["calibrate", "--model", str(tiny_medclipsam), "--output", str(out), "--phantoms", "1",
                 "--flip-choice", "--progress", "none"]) == 2
    assert "--flip-choice applies to cliptnseg and tgcnet models" in capsys.readouterr().err and not out.exists()
    import shutil

    sided = tmp_path / "src" / "sided.json"  # a cliptnseg model that reads the patient's sides
    sided.parent.mkdir()
    spec = json.loads(tiny_model.read_text())
    spec["inference"] = {**spec.get("inference", {}), "patient_sides": {"margin_mm": 10.0}}
    for f in spec["files"]:
        shutil.copy2(tiny_model.parent / f["name"], sided.parent / f["name"])
    sided.write_text(json.dumps(spec), encoding="utf-8")
    assert main(["calibrate", "--model", str(sided), "--output", str(out), "--phantoms", "1", "--flip-choice",
                 "--progress", "none"]) == 2
    assert "only the tgcnet engine asks a mirrored slice" in capsys.readouterr().err and not out.exists()
    assert main(["calibrate", "--model", str(tiny_model), "--output", str(out), "--phantoms", "1", "--family", "A",
                 "--flip-choice", "--progress", "none"]) == 0
    presence = json.loads(out.read_text())["presence"]
    assert presence["calibration"]["flip_choice"] is True and "--flip-choice --force" in presence["calibration"][
        "command"]
    assert presence["per_finding"] and all(isinstance(r["flip_average"], bool)
                                           for r in presence["per_finding"].values())
