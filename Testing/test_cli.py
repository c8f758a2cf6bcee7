"""`clipseg segment` end to end on files, with a tiny random-weight model: outputs, geometry, errors, exit codes."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import slicerio

from CLIPSegLib.cli import main
from CLIPSegLib.models import DEFAULT_MODEL

from conftest import assert_no_partial_files

# With the tiny random model masks are arbitrary: these tests check files, names, geometry and errors.


def run(args, capsys=None):
    code = main([str(a) for a in args])
    out = capsys.readouterr() if capsys else None
    return code, out


def test_segment_writes_one_segment_per_prompt_with_the_input_geometry(phantom_file, tiny_model, tmp_path, capsys):
    path, ph, geometry = phantom_file
    out = tmp_path / "out.seg.nrrd"
    probs = tmp_path / "probs.nrrd"
    code, io = run(["segment", path, "--prompt", "thyroid nodule", "--prompt", "anechoic cyst", "--output", out,
                    "--model", tiny_model, "--device", "cpu", "--probabilities", probs, "--progress", "none"], capsys)
    assert code == 0, io.err
    seg = slicerio.read_segmentation(str(out))
    assert [s["name"] for s in seg["segments"]] == ["thyroid nodule", "anechoic cyst"]
    np.testing.assert_allclose(seg["ijkToLPS"], geometry.ijk_to_lps(), atol=1e-5)
    assert seg["voxels"].shape[-3:] == ph.image.shape[::-1]
    import SimpleITK as sitk

    p = sitk.ReadImage(str(probs))
    assert p.GetNumberOfComponentsPerPixel() == 2 and p.GetSize() == ph.image.shape[::-1]
    np.testing.assert_allclose(p.GetDirection(), geometry.direction_matrix.flatten(), atol=1e-6)
    assert "'thyroid nodule'" in io.err and "'anechoic cyst'" in io.err


def test_json_progress_is_machine_readable(phantom_file, tiny_model, tmp_path, capsys):
    path, _, _ = phantom_file
    code, io = run(["segment", path, "--prompt", "cyst", "--output", tmp_path / "o.nii.gz", "--model", tiny_model,
                    "--device", "cpu", "--progress", "json"], capsys)
    assert code == 0
    events = [json.loads(line) for line in io.out.splitlines()]
    kinds = [e["event"] for e in events]
    assert "progress" in kinds and kinds[-1] == "done"
    last = [e for e in events if e["event"] == "progress"][-1]
    assert last["done"] == last["total"] == 6
    assert any(e["event"] == "message" and "cyst" in e["text"] for e in events)
    (finding,) = events[-1]["findings"]  # the decision's inputs and outcome, per finding
    assert finding["status"] in ("found", "uncertain", "not found")
    assert set(finding["required"]) == {"min_peak", "min_mean", "min_extent_mm", "min_area_mm2", "min_contrast",
                                        "min_shadow"}
    assert finding["required"]["min_shadow"] is None  # the tiny model's rule asks no shadow
    for e in finding["evidence"]:
        assert {"voxels", "peak", "mean", "extent_mm", "area_mm2", "contrast", "shadow"} <= set(e)


@pytest.mark.parametrize("case,code,match", [
    ("blank prompt", 2, "empty prompt"),
    ("missing input", 2, "does not exist"),
    ("no folder", 2, "output folder"),
    ("bad model", 3, "unknown model"),
    ("corrupt model", 3, "SHA-256"),
    ("bad engine", 2, "unknown engine"),
    ("nan", 2, "NaN"),
])
def test_bad_input_exits_nonzero_with_a_clear_message_and_no_output(phantom_file, tiny_model, tmp_path, capsys,
                                                                    case, code, match):
    path, ph, geometry = phantom_file
    out = tmp_path / "out.seg.nrrd"
    args = ["segment", path, "--prompt", "cyst", "--output", out, "--model", tiny_model, "--device", "cpu",
            "--progress", "none"]
    if case == "blank prompt":
        args[3] = "   "
    elif case == "missing input":
        args[1] = tmp_path / "nope.nrrd"
    elif case == "no folder":
        args[5] = tmp_path / "missing" / "out.seg.nrrd"
    elif case == "bad model":
        args[7] = "cliptnseg-phantom-smal"
    elif case == "corrupt model":
        corrupt = tmp_path / "m"
        corrupt.mkdir()
        for p in Path(tiny_model).parent.iterdir():
            (corrupt / p.name).write_bytes(p.read_bytes())
        w = next(corrupt.glob("*.safetensors"))
        w.write_bytes(w.read_bytes()[:-4] + b"oops")
        args[7] = corrupt / Path(tiny_model).name
    elif case == "bad engine":
        args += ["--engine", "medclip"]
    elif case == "nan":
        from CLIPSegLib.io.outputs import write_volume

        img = ph.image.copy()
        img[0, 0, 0] = np.inf
        args[1] = write_volume(tmp_path / "nan.nrrd", img, geometry)
    got, io = run(args, capsys)
    assert got == code
    assert match in io.err and "Traceback" not in io.err
    assert not out.exists()
    assert_no_partial_files(tmp_path)


def test_output_that_is_the_input_is_refused_and_the_input_kept(phantom_file, tiny_model, tmp_path, capsys):
    path, _, _ = phantom_file
    before = Path(path).read_bytes()
    code, io = run(["segment", path, "--prompt", "cyst", "--output", path, "--model", tiny_model, "--device", "cpu",
                    "--progress", "none"], capsys)
    assert code == 2 and "is the input image" in io.err
    assert Path(path).read_bytes() == before


def test_a_late_failure_keeps_the_files_that_were_there_and_exits_70(phantom_file, tiny_model, tmp_path, capsys,
                                                                     monkeypatch):
    import CLIPSegLib.inference.segment_file as sf

    def broken_write(*args, **kwargs):
        raise RuntimeError("simulated failure while writing probabilities")

    monkeypatch.setattr(sf, "write_probabilities", broken_write)
    path, _, _ = phantom_file
    out, probs = tmp_path / "out.seg.nrrd", tmp_path / "probs.nrrd"
    out.write_bytes(b"earlier segmentation")
    probs.write_bytes(b"earlier probabilities")
    code, io = run(["segment", path, "--prompt", "cyst", "--output", out, "--probabilities", probs, "--model",
                    tiny_model, "--device", "cpu", "--progress", "json"], capsys)
    assert code == 70
    error = json.loads(io.out.strip().splitlines()[-1])
    assert error["event"] == "error" and error["exit_code"] == 70 and "simulated failure" in error["message"]
    assert "internal error" in io.err and "Traceback" in io.err
    assert out.read_bytes() == b"earlier segmentation" and probs.read_bytes() == b"earlier probabilities"
    assert_no_partial_files(tmp_path)


def test_a_full_disk_is_a_clear_error_not_a_bug(phantom_file, tiny_model, tmp_path, capsys, monkeypatch):
    import errno

    import CLIPSegLib.inference.segment_file as sf

    def full_disk(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(sf, "write_segmentation", full_disk)
    path, _, _ = phantom_file
    out = tmp_path / "out.seg.nrrd"
    code, io = run(["segment", path, "--prompt", "cyst", "--output", out, "--model", tiny_model, "--device", "cpu",
                    "--progress", "none"], capsys)
    assert code == 1 and "No space left on device" in io.err and "free disk space" in io.err
    assert "Traceback" not in io.err and not out.exists()
    assert_no_partial_files(tmp_path)


def test_cuda_without_gpu_is_a_clear_error(phantom_file, tiny_model, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    path, _, _ = phantom_file
    code, io = run(["segment", path, "--prompt", "cyst", "--output", tmp_path / "o.seg.nrrd", "--model", tiny_model,
                    "--device", "cuda"], capsys)
    assert code == 4 and "no CUDA GPU" in io.err and "--device cpu" in io.err


def test_installed_command_runs_and_reports_errors(tmp_path):
    exe = Path(sys.executable).parent / "clipseg"
    if not exe.exists():
        pytest.skip("clipseg console script not installed (run through `make test`)")
    r = subprocess.run([str(exe), "segment", str(tmp_path / "none.nii.gz"), "--prompt", "cyst", "--output",
                        str(tmp_path / "o.seg.nrrd")], capture_output=True, text=True,
                       env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_models_list_shows_embedded_present_and_public_not_downloaded(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CLIPSEG_HOME", str(tmp_path))
    code, io = run(["models", "list"], capsys)
    assert code == 0
    rows = io.out.splitlines()[1:]
    lines = {line.split()[0]: line for line in rows}
    assert "embedded" in lines["cliptnseg-phantom-small"] and "MB" in lines["cliptnseg-phantom-small"]
    assert rows[0].split()[0] == DEFAULT_MODEL and f"(default model: {DEFAULT_MODEL};" in io.out
    assert "not downloaded" in lines["sam-vit-h"] and "~2.4 GB" in lines["sam-vit-h"]
    code, io = run(["models", "verify", "cliptnseg-phantom-small"], capsys)
    assert code == 0 and "present" in io.out
    code, io = run(["models", "fetch", "medsam-vit-b"], capsys)
    assert code == 3 and "models import medsam-vit-b" in io.err


def test_evaluate_refuses_a_bad_report_name_before_any_work(tmp_path, capsys):
    code, io = run(["evaluate", "--phantoms", "40", "--report", tmp_path / "figures.txt", "--progress", "none"], capsys)
    assert code == 2 and "use a .json, .csv or .md file name" in io.err
    assert list(tmp_path.iterdir()) == []


def _write_format(folder: Path, fmt: str) -> tuple[Path, Path]:
    """One small image of ``fmt`` -> (path to give clipseg, the file to cut)."""
    import SimpleITK as sitk
    from PIL import Image

    rng = np.random.default_rng(1)
    volume = rng.integers(0, 1000, (6, 40, 48)).astype(np.int16)
    picture = (rng.random((60, 70)) * 255).astype(np.uint8)
    if fmt == "dicom":
        dicom = folder / "series"
        dicom.mkdir()
        for k in range(3):
            image = sitk.GetImageFromArray(volume[k])
            for tag, value in (("0020|000e", "1.2.826.0.1.3680043.2.1125.9"), ("0020|0013", str(k + 1)),
                               ("0008|0060", "US"), ("0020|0032", f"0\\0\\{k}"), ("0020|0037", "1\\0\\0\\0\\1\\0")):
                image.SetMetaData(tag, value)
            writer = sitk.ImageFileWriter()
            writer.KeepOriginalImageUIDOn()
            writer.SetFileName(str(dicom / f"slice{k}.dcm"))
            writer.Execute(image)
        return dicom, dicom / "slice1.dcm"
    name, compress = {"nii": ("in.nii", False), "nii.gz": ("in.nii.gz", True), "raw nrrd": ("in.nrrd", False),
                      "gzip nrrd": ("in.nrrd", True), "raw mha": ("in.mha", False), "zlib mha": ("in.mha", True),
                      "png": ("in.png", False), "jpeg": ("in.jpg", False)}[fmt]
    path = folder / name
    if fmt in ("png", "jpeg"):
        Image.fromarray(picture).save(path)
    else:
        sitk.WriteImage(sitk.GetImageFromArray(volume), str(path), useCompression=compress)
    return path, path


@pytest.mark.parametrize("fmt", ["nii", "nii.gz", "raw nrrd", "gzip nrrd", "raw mha", "zlib mha", "png", "jpeg",
                                 "dicom"])
def test_a_truncated_file_is_an_error_naming_it_not_zeros(tiny_model, tmp_path, capsys, fmt):
    source, cut = _write_format(tmp_path, fmt)
    data = cut.read_bytes()
    out = tmp_path / "out.seg.nrrd"
    args = ["segment", source, "--prompt", "cyst", "--output", out, "--model", tiny_model, "--device", "cpu",
            "--progress", "none"]
    code, io = run(args, capsys)
    assert code == 0, io.err  # the whole file is read
    out.unlink()
    for size in (len(data) // 10, len(data) // 2, len(data) * 9 // 10, len(data) - 1):
        cut.write_bytes(data[:size])
        code, io = run(args, capsys)
        assert code == 1, (size, io.err)
        assert cut.name in io.err and "cannot be read" in io.err and "Traceback" not in io.err, (size, io.err)
        assert not out.exists()
    assert_no_partial_files(tmp_path)


def _unwritable_folder(tmp_path, kind):
    """A folder this process cannot create files in: chmod 0o555 (root ignores it: skipped), or /sys, which the
    kernel keeps read-only even for root (skipped where it is writable or absent)."""
    import tempfile

    if kind == "read-only folder":
        if os.geteuid() == 0:
            pytest.skip("root writes into a 0o555 folder; the /sys case covers root")
        folder = tmp_path / "locked"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    try:
        fd, probe = tempfile.mkstemp(dir="/sys")
    except OSError:
        return Path("/sys")
    os.close(fd)
    os.unlink(probe)
    pytest.skip("/sys is writable here")


@pytest.mark.parametrize("kind", ["read-only folder", "system folder"])
@pytest.mark.parametrize("option,name", [("--output", "out.nii.gz"), ("--output", "out.seg.nrrd"),
                                         ("--probabilities", "probs.nrrd")])
def test_an_unwritable_output_folder_is_refused_before_the_model_runs(phantom_file, tiny_model, tmp_path, capsys,
                                                                      monkeypatch, kind, option, name):
    import CLIPSegLib.inference.segment_file as sf

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(sf, "load_engine", no_model)
    folder = _unwritable_folder(tmp_path, kind)
    path, _, _ = phantom_file
    args = {"--output": tmp_path / "out.seg.nrrd", "--probabilities": None, option: folder / name}
    argv = ["segment", path, "--prompt", "cyst", "--output", args["--output"], "--model", tiny_model, "--device",
            "cpu", "--progress", "none"] + (["--probabilities", args["--probabilities"]] if args["--probabilities"]
                                             else [])
    code, io = run(argv, capsys)
    assert code == 1, io.err
    assert f"cannot write the {option} in folder {folder}" in io.err and "Traceback" not in io.err
    assert not (tmp_path / "out.seg.nrrd").exists()


def test_output_given_as_a_folder_says_a_file_name_is_expected(phantom_file, tiny_model, tmp_path, capsys):
    path, _, _ = phantom_file
    for option in ("--output", "--probabilities"):
        argv = ["segment", path, "--prompt", "cyst", "--output", tmp_path / "o.seg.nrrd", "--model", tiny_model,
                "--progress", "none", option, tmp_path]
        code, io = run(argv, capsys)
        assert code == 2 and f"{option} {tmp_path} is a folder; give a file name" in io.err


def test_a_pictures_dpi_is_not_its_pixel_size_and_spacing_sets_it(tiny_model, tmp_path, capsys):
    from PIL import Image

    from CLIPSegLib.io.read import read_image

    picture = Image.fromarray((np.random.default_rng(2).random((40, 48)) * 255).astype(np.uint8))
    for dpi in (300, 72):
        picture.save(tmp_path / f"us{dpi}.jpg", dpi=(dpi, dpi), quality=95)
    (a300, g300), (a72, g72) = read_image(tmp_path / "us300.jpg"), read_image(tmp_path / "us72.jpg")
    assert g300.spacing == g72.spacing == (1.0, 1.0, 1.0) and np.array_equal(a300, a72)
    assert read_image(tmp_path / "us300.jpg", spacing="0.25")[1].spacing == (0.25, 0.25, 1.0)

    base = ["segment", tmp_path / "us300.jpg", "--prompt", "cyst", "--model", tiny_model, "--device", "cpu",
            "--progress", "none"]
    code, io = run(base + ["--output", tmp_path / "a.seg.nrrd"], capsys)
    assert code == 0 and "us300.jpg is a picture" in io.err and "taken as 1.0 mm" in io.err and "--spacing" in io.err
    assert np.diag(slicerio.read_segmentation(str(tmp_path / "a.seg.nrrd"))["ijkToLPS"])[:2] == pytest.approx(1.0)
    code, io = run(base + ["--output", tmp_path / "b.seg.nrrd", "--spacing", "0.25"], capsys)
    assert code == 0 and "set by --spacing to 0.25, 0.25, 1 mm" in io.err
    assert np.diag(slicerio.read_segmentation(str(tmp_path / "b.seg.nrrd"))["ijkToLPS"])[:2] == pytest.approx(0.25)


def test_spacing_overrides_a_volume_header_and_bad_values_are_refused(phantom_file, tiny_model, tmp_path, capsys):
    path, _, geometry = phantom_file
    base = ["segment", path, "--prompt", "cyst", "--model", tiny_model, "--device", "cpu", "--progress", "none"]
    code, io = run(base + ["--output", tmp_path / "o.seg.nrrd", "--spacing", "0.5,0.5,2"], capsys)
    assert code == 0, io.err
    ijk_to_lps = slicerio.read_segmentation(str(tmp_path / "o.seg.nrrd"))["ijkToLPS"]
    np.testing.assert_allclose(np.linalg.norm(ijk_to_lps[:3, :3], axis=0), (0.5, 0.5, 2.0))
    np.testing.assert_allclose(ijk_to_lps[:3, 3], geometry.origin)  # origin and direction stay the file's
    for bad in ("0", "-1", "a", "1,2", "1,nan,1"):
        code, io = run(base + ["--output", tmp_path / "x.seg.nrrd", "--spacing", bad], capsys)
        assert code == 2 and "--spacing" in io.err and "positive size in mm" in io.err
    assert not (tmp_path / "x.seg.nrrd").exists()


def _strict_json(line):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(line, parse_constant=refuse)


def test_json_output_is_strict_nan_and_infinity_become_null(tmp_path, capsys):
    from CLIPSegLib.evaluation.reports import write_report
    from CLIPSegLib.progress import Progress

    Progress("json").done(score=float("nan"), per_finding={"cyst": [np.float32("inf"), 0.5]}, dice=np.nan)
    event = _strict_json(capsys.readouterr().out)
    assert event == {"event": "done", "score": None, "per_finding": {"cyst": [None, 0.5]}, "dice": None}
    write_report(tmp_path / "r.json", {"hd95_mm": float("nan"), "cases": [{"dice": 1.0, "nsd": -np.inf}]})
    assert _strict_json((tmp_path / "r.json").read_text(encoding="utf-8")) == {"hd95_mm": None, "cases": [{"dice": 1.0, "nsd": None}]}


def test_an_interrupted_run_reports_a_json_error_event_and_exits_130(phantom_file, tiny_model, tmp_path, capsys,
                                                                     monkeypatch):
    import CLIPSegLib.inference.segment_file as sf

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sf, "segment_volume", interrupted)
    path, _, _ = phantom_file
    out = tmp_path / "out.seg.nrrd"
    code, io = run(["segment", path, "--prompt", "cyst", "--output", out, "--model", tiny_model, "--device", "cpu",
                    "--progress", "json"], capsys)
    assert code == 130 and not out.exists()
    event = _strict_json(io.out.strip().splitlines()[-1])
    assert event["event"] == "error" and event["exit_code"] == 130 and event["message"].startswith("interrupted")
    assert "Traceback" not in io.err


def test_a_folder_where_a_file_is_expected_says_what_is_expected(phantom_file, tiny_model, tmp_path, capsys):
    from CLIPSegLib.io.outputs import write_volume

    path, ph, geometry = phantom_file
    base = ["segment", path, "--prompt", "cyst", "--output", tmp_path / "o.seg.nrrd", "--device", "cpu",
            "--progress", "none"]
    code, io = run(base + ["--model", Path(tiny_model).parent], capsys)
    assert code == 3 and f"is a folder; give a model's .json file (e.g. {tiny_model})" in io.err
    images = tmp_path / "images"
    images.mkdir()
    write_volume(images / "case1.nii.gz", ph.image, geometry)
    base[1] = images
    code, io = run(base + ["--model", tiny_model], capsys)
    assert code == 2 and "holds no DICOM series but image files (case1.nii.gz): give one of them" in io.err
    assert "case1.labels" not in io.err
    (tmp_path / "map.json").mkdir()
    code, io = run(["evaluate", "--data", images, "--prompt-map", tmp_path / "map.json", "--progress", "none"], capsys)
    assert code == 2 and "map.json" in io.err and "give a file, not a folder" in io.err
    assert "free disk space" not in io.err


def test_every_option_an_error_message_suggests_exists():
    """Each ``--option`` named in a string in CLIPSegLib (messages suggest options to fix things) is one the
    command line knows."""
    import argparse
    import ast

    from CLIPSegLib.cli import build_parser

    def options(parser):
        found = set()
        for action in parser._actions:
            found.update(action.option_strings)
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    found |= options(sub)
        return found

    known = options(build_parser())
    mentioned = {}
    for source in (Path(__file__).resolve().parents[1] / "CLIPSeg" / "CLIPSegLib").rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for option in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", node.value):
                    mentioned.setdefault(option, set()).add(source.name)
    assert len(mentioned) > 20  # the scan finds the messages
    unknown = {o: sorted(files) for o, files in mentioned.items() if o not in known}
    assert not unknown, f"messages suggest options the parser does not have: {unknown}"


def test_an_unwritable_report_folder_is_refused_before_the_evaluation(tmp_path, capsys):
    folder = _unwritable_folder(tmp_path, "system folder")
    code, io = run(["evaluate", "--phantoms", "40", "--report", folder / "r.json", "--progress", "none"], capsys)
    assert code == 1 and f"cannot write the --report in folder {folder}" in io.err


@pytest.mark.parametrize("args, message", [
    (["--rival-weight", "-1"], "--rival-weight -1.0: must be at least 0"),
    (["--rival-weight", "nan"], "--rival-weight nan: give a number"),
    (["--foreground-weight", "-0.5"], "--foreground-weight -0.5: must be at least 0"),
    (["--engine", "tgcnet", "--rival-weight", "1"], "presence head: --rival-weight does not apply; drop it"),
    (["--engine", "medclipsam", "--rival-weight", "1"], "phantoms only: --rival-weight does not apply; drop it"),
    (["--engine", "tgcnet", "--foreground-weight", "1", "--family", "B"],
     "presence head: --family, --foreground-weight do not apply; drop them"),
    (["--engine", "medclipsam", "--foreground-weight", "1", "--presence-head"],
     "phantoms only: --foreground-weight, --presence-head do not apply; drop them"),
    (["--engine", "tgcnet", "--dataset", "thyroid", "--report-wording", "varied"],
     "--dataset thyroid has no report lines: --report-wording does not apply; drop it"),
    (["--report-wording", "varied"], "not report lines: --report-wording does not apply; drop it"),
    (["--engine", "tgcnet", "--dataset", "thyroid", "--location-support"],
     "--dataset thyroid has no report lines: --location-support does not apply; drop it"),
    (["--engine", "medclipsam", "--location-support"], "phantoms only: --location-support does not apply; drop it"),
    (["--max-grad-norm", "-1"], "--max-grad-norm -1: give a finite limit above 0"),
    (["--max-grad-norm", "inf"], "--max-grad-norm inf: give a finite limit above 0"),
    (["--stages", "calibrate,export", "--max-grad-norm", "1"],
     "--stages calibrate,export trains no segmenter: --max-grad-norm does not apply; drop it"),
    (["--engine", "medclipsam", "--pseudo-labels", "x", "--max-grad-norm", "1"],
     "held-out quarter of it: --max-grad-norm does not apply; drop it"),
    (["--engine", "medclipsam", "--max-grad-norm", "1"], "phantoms only: --max-grad-norm does not apply; drop it"),
    (["--engine", "medclipsam", "--pseudo-labels", "x", "--slice-vote", "3"],
     "held-out quarter of it: --slice-vote does not apply; drop it"),
    (["--engine", "tgcnet", "--max-grad-norm", "0"], "--max-grad-norm 0: give a finite limit above 0"),
    (["--engine", "tgcnet", "--max-grad-norm", "nan"], "--max-grad-norm nan: give a finite limit above 0"),
    (["--engine", "tgcnet", "--stages", "clip", "--max-grad-norm", "1"],
     "--stages clip trains no segmenter: --max-grad-norm does not apply; drop it"),
])
def test_train_refuses_a_loss_weight_it_cannot_use_before_any_work(args, message, tmp_path, capsys):
    code, io = run(["train", "--output-dir", tmp_path / "m", "--work-dir", tmp_path / "w", "--progress", "none"]
                   + args, capsys)
    assert code == 2 and message in io.err
    assert list(tmp_path.iterdir()) == []
