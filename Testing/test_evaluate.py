"""`clipseg evaluate` on a folder of NIfTI images + label maps and on a CSV, with the tiny random model."""

import csv
import json

import numpy as np
import pytest

from CLIPSegLib.cli import main
from CLIPSegLib.io.geometry import Geometry
from CLIPSegLib.io.outputs import write_volume
from CLIPSegLib.evaluation.metrics import dice
from CLIPSegLib.synthetic.phantoms import make_phantom

G = Geometry((0.5, 0.5, 1.0), (0.0, 0.0, 0.0), ((1, 0, 0), (0, 1, 0), (0, 0, 1)))


def _folder(tmp_path):
    (tmp_path / "images").mkdir(parents=True)
    (tmp_path / "labels").mkdir()
    for seed, findings in ((1, ("nodule", "cyst")), (2, ("cyst",))):
        ph = make_phantom((3, 96, 96), spacing=(1.0, 0.5, 0.5), seed=seed, findings=findings)
        assert set(ph.masks) == set(findings)
        labels = np.zeros(ph.image.shape, np.uint8)
        for value, f in ((1, "nodule"), (2, "cyst")):
            if f in ph.masks:
                labels[ph.masks[f]] = value
        write_volume(tmp_path / "images" / f"case{seed}.nii.gz", ph.image, G)
        write_volume(tmp_path / "labels" / f"case{seed}.nii.gz", labels, G)
    return tmp_path


def test_folder_evaluation_scores_every_case_and_finding(tmp_path, tiny_model, capsys):
    data = _folder(tmp_path / "data")
    for ext in ("json", "csv", "md"):
        code = main(["evaluate", "--data", str(data), "--prompt-map", '{"1": "thyroid nodule", "2": "cyst"}',
                     "--model", str(tiny_model), "--device", "cpu", "--progress", "none",
                     "--report", str(tmp_path / f"r.{ext}")])
        assert code == 0
    report = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    rows = report["cases"]
    assert {(r["case"], r["prompt"]) for r in rows} == {(c, p) for c in ("case1.nii.gz", "case2.nii.gz")
                                                       for p in ("thyroid nodule", "cyst")}
    absent = [r for r in rows if r["case"] == "case2.nii.gz" and r["prompt"] == "thyroid nodule"][0]
    assert absent["present"] is False and absent["truth_voxels"] == 0 and "false_positive_mm3" in absent
    assert report["summary"]["thyroid nodule"]["absent_cases"] == 1
    assert report["summary"]["cyst"]["dice"]["n"] == 2
    assert report["selectivity"]["pairs"] == 2  # case1: nodule->cyst truth and cyst->nodule truth
    assert report["selectivity"]["swap_floor_max"] == 0.0  # the folder's nodule and cyst do not touch
    assert {r["status"] for r in rows} <= {"found", "uncertain", "not found"}
    statuses = [r["status"] for r in rows if r["prompt"] == "thyroid nodule" and not r["present"]]
    assert report["summary"]["thyroid nodule"]["absent_uncertain_rate"] == statuses.count("uncertain")
    with open(tmp_path / "r.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    md = (tmp_path / "r.md").read_text(encoding="utf-8")
    assert "| cyst | 2 |" in md and "Foreground Dice" in md


def test_csv_data_and_bad_arguments(tmp_path, tiny_model, capsys):
    data = _folder(tmp_path / "data")
    table = tmp_path / "data" / "table.csv"
    import SimpleITK as sitk

    lab = sitk.ReadImage(str(data / "labels" / "case1.nii.gz"))
    sitk.WriteImage(sitk.Cast(lab == 2, sitk.sitkUInt8), str(data / "cyst1.nii.gz"))
    table.write_text("image,mask,phrase\nimages/case1.nii.gz,cyst1.nii.gz,anechoic cyst\n")
    assert main(["evaluate", "--data", str(table), "--model", str(tiny_model), "--device", "cpu",
                 "--progress", "none"]) == 0
    assert "anechoic cyst" in capsys.readouterr().out
    assert main(["evaluate", "--data", str(data), "--model", str(tiny_model), "--progress", "none"]) == 2
    assert "--prompt-map" in capsys.readouterr().err


def test_phantom_evaluation_reports_dice_hd95_nsd_absence_and_swap(tmp_path, tiny_model, capsys):
    import json

    from CLIPSegLib.synthetic.phantoms import random_volume_phantom

    report_path = tmp_path / "heldout.json"
    assert main(["evaluate", "--phantoms", "2", "--seed", "1000", "--model", str(tiny_model), "--device", "cpu",
                 "--progress", "none", "--tolerance-mm", "1.5", "--report", str(report_path)]) == 0
    report = json.loads(report_path.read_text(encoding="utf-8"))
    s, cases = report["summary"], report["cases"]
    assert [c["seed"] for c in cases] == [1000, 1001]
    present = {f: [c for c in cases if f in c["present"]] for f in s["dice_cases"]}
    for f, cs in present.items():
        assert s["dice_cases"][f] == len(cs) == s["dice"][f]["n"]
        assert all(f"hd95_mm_{f}" in c and f"nsd_1.5mm_{f}" in c for c in cs)
        if cs:
            assert abs(s["dice_mean"][f] - sum(c[f"dice_{f}"] for c in cs) / len(cs)) < 1e-9
    truth = {c["seed"]: random_volume_phantom(c["seed"]).findings for c in cases}
    assert all(c["present"] == truth[c["seed"]] for c in cases)
    assert s["absent_cases"] == sum(3 - len(c["present"]) for c in cases)
    assert s["swap_pairs"] == sum(len(c["present"]) * (len(c["present"]) - 1) for c in cases)
    masks = [random_volume_phantom(c["seed"]).masks for c in cases]
    floors = [dice(m[a], m[b]) for m in masks for a in m for b in m if a != b]
    assert s["swap_floor_max"] == pytest.approx(max(floors))  # what the truth itself scores
    for f in s["dice"]:  # two volumes: too few for a bootstrap interval, and the report says so
        assert s["dice"][f]["ci95"] is None and s["dice"][f]["ci95_reason"].startswith(("n too small", "no cases"))
    out = capsys.readouterr().out
    assert "held-out phantom volumes: 2 (seeds 1000..1001)" in out and "absent finding -> empty segment" in out
    assert "wrote" not in out and "case.seg.nrrd" not in out  # the per-volume `clipseg segment` runs are quiet
    assert out.rstrip().endswith(f"report: {report_path}")
    dice_rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| finding")]
    assert dice_rows and all("n too small for an interval" in r or "never present" in r for r in dice_rows)


def test_the_model_is_loaded_once_and_every_volume_is_segmented_in_memory_with_the_options(tmp_path, tiny_model,
                                                                                          capsys, monkeypatch):
    import CLIPSegLib.io.outputs as imageio
    import CLIPSegLib.inference.pipeline as pipeline
    import CLIPSegLib.inference.segment_file as segment_file

    def no_files(*args, **kwargs):
        raise AssertionError("the evaluation wrote a file")

    for module, name in ((imageio, "write_volume"), (imageio, "write_segmentation"),
                         (segment_file, "write_segmentation")):  # no temporary volumes or segmentations any more
        monkeypatch.setattr(module, name, no_files)
    loads, calls = [], []
    load_engine, segment_volume = segment_file.load_engine, pipeline.segment_volume
    monkeypatch.setattr(segment_file, "load_engine", lambda *a, **k: loads.append(k) or load_engine(*a, **k))
    monkeypatch.setattr(pipeline, "segment_volume", lambda *a, **k: calls.append(k) or segment_volume(*a, **k))
    assert main(["evaluate", "--phantoms", "2", "--model", str(tiny_model), "--device", "cpu", "--threshold", "0.4",
                 "--batch-size", "3", "--axis", "2", "--progress", "none"]) == 0
    assert len(loads) == 1 and loads[0]["model"] == str(tiny_model) and loads[0]["device"] == "cpu"
    assert len(calls) == 2 and all(k["presence"] == {"threshold": 0.4} and k["batch_size"] == 3 and k["axis"] == "2"
                                   for k in calls)
    assert main(["evaluate", "--phantoms", "1", "--model", str(tiny_model), "--precision", "fp16",
                 "--progress", "none"]) == 2
    assert "precision 'fp16' is not one of fp32, bf16" in capsys.readouterr().err


def test_phantom_markdown_report_is_a_table(tmp_path, tiny_model, capsys):
    report_path = tmp_path / "heldout.md"
    assert main(["evaluate", "--phantoms", "1", "--seed", "1000", "--model", str(tiny_model), "--device", "cpu",
                 "--progress", "none", "--report", str(report_path)]) == 0
    rows = [line for line in report_path.read_text(encoding="utf-8").splitlines() if line.startswith("|")]
    assert rows[0].startswith("| finding | n | Dice mean [95% CI] |") and set(rows[1]) <= {"|", "-"}
    assert [r.split("|")[1].strip() for r in rows[2:]] == ["nodule", "cyst", "calcification"]
    assert all(r.count("|") == rows[0].count("|") for r in rows)
    out = capsys.readouterr()
    assert "not found in this image" not in out.err  # messages of the temporary runs are not shown either


@pytest.mark.parametrize("args", [["--phantoms", "0"], ["--phantoms", "-3"], ["--tolerance-mm", "0"]])
def test_phantom_count_and_tolerance_must_be_positive(tmp_path, tiny_model, capsys, args):
    assert main(["evaluate", *args, "--model", str(tiny_model), "--device", "cpu", "--progress", "none"]) == 2
    err = capsys.readouterr().err
    assert args[0] in err and "Traceback" not in err


@pytest.mark.parametrize("prompt_map, message", [
    ("{'1': 'nodule'}", "not valid JSON: Expecting property name enclosed in double quotes at line 1 column 2"),
    ('{"1": "nodule",}', "not valid JSON: Expecting property name enclosed in double quotes at line 1 column 16"),
    ('["nodule"]', "must be a non-empty JSON object"),
    ('{"nodule": "1"}', "key 'nodule' is not a label value"),
    ('{"1": "cyst", "2": "cyst"}', "labels 1 and 2 both map to 'cyst'"),
    ("missing-map.json", "file missing-map.json does not exist"),
])
def test_malformed_prompt_map_is_an_input_error_with_an_example(tmp_path, tiny_model, capsys, prompt_map, message):
    data = _folder(tmp_path / "data")
    code = main(["evaluate", "--data", str(data), "--prompt-map", prompt_map, "--model", str(tiny_model),
                 "--device", "cpu", "--progress", "none"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    if "JSON" in message or "object" in message or "label value" in message:
        assert '{"1": "thyroid nodule", "2": "cyst"}' in err  # an example to copy


def test_prompt_map_from_a_file(tmp_path):
    from CLIPSegLib.evaluation.evaluator import parse_prompt_map

    (tmp_path / "map.json").write_text('{"1": " thyroid nodule ", "2": "cyst"}')
    assert parse_prompt_map(str(tmp_path / "map.json")) == {"1": "thyroid nodule", "2": "cyst"}


def test_in_memory_phantom_cases_give_the_masks_of_a_clipseg_segment_file_round_trip(tmp_path, capsys, monkeypatch):
    """The evaluator segments phantom volumes in memory; before, each went through `clipseg segment` on NRRD files
    and the .seg.nrrd was read back. With the embedded model both give the same masks and decisions, so the same
    figures."""
    import CLIPSegLib.inference.pipeline as pipeline
    from CLIPSegLib.evaluation.evaluator import PhantomCases, score_case
    from CLIPSegLib.io.outputs import read_segment_masks
    from CLIPSegLib.evaluation.metrics import case_metrics
    from CLIPSegLib.options import SegmentOptions
    from CLIPSegLib.inference.segment_file import load_engine

    results = []
    segment_volume = pipeline.segment_volume
    monkeypatch.setattr(pipeline, "segment_volume", lambda *a, **k: results.append(segment_volume(*a, **k))
                        or results[-1])
    engine = load_engine(None, device="cpu")
    cases = list(PhantomCases(2, 1000))
    assert [c.info["seed"] for c in cases] == [1000, 1001]
    for case in cases:
        scored = score_case(case, engine, SegmentOptions(), 2.0)
        prompts = list(case.prompts.values())
        volume = write_volume(tmp_path / "case.nrrd", case.image, case.geometry)
        out = tmp_path / "case.seg.nrrd"
        argv = ["segment", str(volume), "--output", str(out), "--device", "cpu", "--progress", "json"]
        assert main(argv + [a for p in prompts for a in ("--prompt", p)]) == 0
        done = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        from_file = read_segment_masks(out, prompts)
        in_memory = results[-1]
        assert [f.prompt for f in in_memory.findings] == prompts
        for name, finding in zip(case.prompts, in_memory.findings):
            assert np.array_equal(finding.mask, from_file[finding.prompt]), (case.id, name)
            assert finding.status == done["status"][finding.prompt] == scored.rows[name]["status"]
            metrics = case_metrics(from_file[finding.prompt], case.truth[name], case.geometry.spacing[::-1])
            assert {k: scored.rows[name][k] for k in metrics} == pytest.approx(metrics, nan_ok=True)
    assert any(f.found for r in results for f in r.findings)  # the comparison is not between empty masks


def test_phantom_family_b_is_evaluated_end_to_end_and_the_report_names_the_family(tmp_path, tiny_model, capsys):
    from CLIPSegLib.cli import build_parser
    from CLIPSegLib.synthetic.scatter_phantoms import random_scatter_volume

    argv = ["evaluate", "--phantoms", "2", "--seed", "1000", "--family", "B", "--model", str(tiny_model),
            "--device", "cpu", "--progress", "none"]
    assert build_parser().parse_args(argv).family == "B"
    assert main(argv + ["--report", str(tmp_path / "b.json")]) == 0
    report = json.loads((tmp_path / "b.json").read_text(encoding="utf-8"))
    s, cases = report["summary"], report["cases"]
    assert s["family"] == "B" and "scatterers" in s["family_model"] and s["seeds"] == [1000, 1001]
    assert [c["present"] for c in cases] == [random_scatter_volume(seed).findings for seed in (1000, 1001)]
    assert s["absent_cases"] == sum(3 - len(c["present"]) for c in cases)
    assert "held-out phantom volumes: 2 (seeds 1000..1001), phantom family B" in capsys.readouterr().out


def test_phantom_family_a_stays_the_default_and_family_needs_phantoms(tmp_path, tiny_model, capsys):
    from CLIPSegLib.evaluation.evaluator import PhantomCases
    from CLIPSegLib.synthetic.phantoms import random_volume_phantom

    case = next(iter(PhantomCases(1, 1000)))  # no family given: family A, the same volumes as before
    assert case.id == "phantom seed 1000" and np.array_equal(case.image, random_volume_phantom(1000).image)
    data = _folder(tmp_path / "data")
    assert main(["evaluate", "--data", str(data), "--prompt-map", '{"1": "nodule"}', "--family", "B",
                 "--model", str(tiny_model), "--progress", "none"]) == 2
    assert "--family B chooses phantoms" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate", "--family", "C", "--model", str(tiny_model)])
