"""Training on the user's own segments from the scene (TrainRun) on real MRML nodes (slicer-core): the training table
and masks it writes, the `clipseg finetune` contract (a stand-in command), the model landing in the catalogue, cancel,
and the errors that stop it before anything runs."""

import csv
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is installed by `make test`; CI always has it")

import slicer_fakes  # noqa: E402
from CLIPSegLib.errors import Cancelled, ClipSegError, InputError  # noqa: E402
from CLIPSegLib.io.read import read_image  # noqa: E402
from CLIPSegLib.models import DEFAULT_MODEL, catalogue  # noqa: E402
from CLIPSegLib.slicer.background import finetune_command  # noqa: E402
from CLIPSegLib.slicer.mrml_bridge import (ensure_segmentation_support, masks_to_segmentation,  # noqa: E402
                                           volume_to_array)
from CLIPSegLib.slicer.train_run import TrainRun  # noqa: E402

SHAPE = (6, 8, 10)  # K, J, I
OBLIQUE_RAS = ((0.0, -1.0, 0.0), (1.0, 0.0, 0.0), (0.0, 0.0, 1.0))


def _volume(scene, name="t1", seed=0):
    import vtk

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetSpacing(0.6, 0.7, 1.5)
    node.SetOrigin(10.0, -20.0, 5.0)
    m = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            m.SetElement(r, c, OBLIQUE_RAS[r][c])
    node.SetIJKToRASDirectionMatrix(m)
    slicer.util.updateVolumeFromArray(node, np.random.default_rng(seed).random(SHAPE, dtype=np.float32))
    return node


def _painted():
    """White matter painted on slices 1 and 4, grey matter on slice 4 only."""
    white, grey = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    white[1, 2:5, 3:7] = True
    white[4, 1:3, 1:4] = True
    grey[4, 5:7, 6:9] = True
    return {"white matter": white, "grey matter": grey}


@pytest.fixture
def scene(monkeypatch, tmp_path):
    """A scene with a volume (oblique direction) and a segmentation of two segments painted on 2 of its 6 slices;
    the model cache in tmp_path."""
    monkeypatch.setenv("CLIPSEG_HOME", str(tmp_path / "home"))
    s = slicer.vtkMRMLScene()
    ensure_segmentation_support(s)
    volume = _volume(s)
    seg = s.AddNewNodeByClass("vtkMRMLSegmentationNode", "my labels")
    masks_to_segmentation(seg, volume, _painted())
    return s, volume, seg


@pytest.fixture
def fake(tmp_path, tiny_model):
    return slicer_fakes.fake_finetune(tmp_path, tiny_model)


def _segments(seg):
    segmentation = seg.GetSegmentation()
    return [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]


def _table(record):
    with open(record / "data" / "data.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _kept(record, path):
    """A file the command was given, as it kept it (the run's own folder is gone by now)."""
    return read_image(record / "data" / Path(path).name)


def test_painted_slices_become_the_training_table_and_the_model_joins_the_catalogue(scene, fake):
    s, volume, seg = scene
    script, record = fake
    n_nodes = s.GetNumberOfNodes()
    run = TrainRun([(volume, seg)], model_id="my-brain", device="cpu", steps=5, inputSize=256, python=script).start()
    folder = run.tmp
    assert run.finish(timeout=60) == "my-brain"
    argv = json.loads((record / "argv.json").read_text())
    assert argv[:3] == ["-m", "CLIPSegLib.cli", "finetune"] and "--from" not in argv  # the default model
    assert argv[argv.index("--model-id") + 1] == "my-brain" and argv[argv.index("--progress") + 1] == "json"
    assert argv[argv.index("--device") + 1] == "cpu" and argv[argv.index("--steps") + 1] == "5"
    assert argv[argv.index("--input-size") + 1] == "256"
    rows = _table(record)
    assert [r["phrase"] for r in rows] == ["white matter", "grey matter"]
    # a slice painted for one structure is labelled for both: grey matter is a true negative on slice 1
    assert [r["slices"] for r in rows] == ["1;4", "1;4"]
    assert rows[0]["image"] == rows[1]["image"]
    image, image_geometry = _kept(record, rows[0]["image"])
    array, geometry = volume_to_array(volume)
    np.testing.assert_allclose(image, array)
    np.testing.assert_allclose(image_geometry.ijk_to_ras(), geometry.ijk_to_ras(), atol=1e-6)
    for row, (phrase, painted) in zip(rows, _painted().items()):
        mask, mask_geometry = _kept(record, row["mask"])
        assert np.array_equal(mask > 0, painted), phrase  # on the volume's grid, voxel for voxel
        np.testing.assert_allclose(mask_geometry.ijk_to_ras(), geometry.ijk_to_ras(), atol=1e-6)
    assert "trained on 2 masks" in run.messages
    assert "my-brain" in [m.id for m in catalogue.segmentation_models()]
    ref = catalogue.resolve("my-brain")
    assert ref.source == "imported" and ref.spec_path.is_file()
    assert not folder.exists()  # temporary files removed
    assert s.GetNumberOfNodes() == n_nodes and _segments(seg) == ["white matter", "grey matter"]


def test_the_model_name_defaults_to_the_phrases_and_a_taken_name_is_replaced_only_when_asked(scene, fake):
    _, volume, seg = scene
    script, _ = fake
    assert TrainRun((volume, seg), python=script).start().finish(60) == "finetuned-white-matter-grey-matter"
    assert TrainRun((volume, seg), python=script).start().finish(60) == "finetuned-white-matter-grey-matter-2"
    with pytest.raises(InputError, match="was trained or imported before; give the new model another name, or "
                                         "replace that one"):
        TrainRun((volume, seg), model_id="finetuned-white-matter-grey-matter", python=script).start()
    assert TrainRun((volume, seg), model_id="finetuned-white-matter-grey-matter", replace=True,
                    python=script).start().finish(60) == "finetuned-white-matter-grey-matter"
    with pytest.raises(InputError, match="taken by a model embedded in CLIPSeg"):
        TrainRun((volume, seg), model_id=DEFAULT_MODEL, replace=True, python=script).start()


def test_several_pairs_one_file_per_volume_and_segments_of_one_name_joined(scene, fake):
    s, volume, seg = scene
    script, record = fake
    other = s.AddNewNodeByClass("vtkMRMLSegmentationNode", "more labels")
    cyst_a, cyst_b, unused = (np.zeros(SHAPE, bool) for _ in range(3))
    cyst_a[2, 0, 0] = True
    cyst_b[3, 1, 1] = True
    grey = np.zeros(SHAPE, bool)
    masks_to_segmentation(other, volume, {"Cyst": cyst_a, "cyst ": cyst_b, "never painted": unused,
                                          "Grey  Matter": grey})
    run = TrainRun([(volume, seg), (volume, other), (volume, seg)], model_id="two", python=script).start()
    run.finish(60)
    rows = _table(record)
    assert [(r["phrase"], r["slices"]) for r in rows] == [("white matter", "1;4"), ("grey matter", "1;4"),
                                                          ("Cyst", "2;3"), ("grey matter", "2;3")]
    assert len({r["image"] for r in rows}) == 1
    assert np.array_equal(_kept(record, rows[2]["mask"])[0] > 0, cyst_a | cyst_b)
    assert any("'never painted' is empty on every painted slice" in m for m in run.messages)
    assert run.describe().startswith(
        f"Training two from the default model ({DEFAULT_MODEL}) on white matter, grey matter, Cyst")


def test_cancel_kills_the_command_and_leaves_nothing_behind(scene, tmp_path, tiny_model):
    s, volume, seg = scene
    script, record = slicer_fakes.fake_finetune(tmp_path, tiny_model, mode="hang")
    run = TrainRun([(volume, seg)], model_id="never", python=script).start()
    folder = run.tmp
    deadline = time.time() + 30
    while not (record / "pid").exists() and time.time() < deadline:
        run.poll()
        time.sleep(0.05)
    run.poll()
    assert run.running and run.run.state.stage == "fine-tuning"
    run.cancel()
    assert run.run.proc.poll() is not None and not run.running
    with pytest.raises(ProcessLookupError):
        os.kill(int((record / "pid").read_text()), 0)
    assert not folder.exists()
    with pytest.raises(Cancelled):
        run.finish(5)
    assert "never" not in [m.id for m in catalogue.segmentation_models()]


def test_a_failing_command_shows_its_own_message_and_adds_no_model(scene, tmp_path, tiny_model):
    _, volume, seg = scene
    script, _ = slicer_fakes.fake_finetune(tmp_path, tiny_model, mode="fail")
    run = TrainRun([(volume, seg)], model_id="broken", python=script).start()
    folder = run.tmp
    with pytest.raises(ClipSegError, match="only empty masks"):
        run.finish(60)
    assert not folder.exists() and "broken" not in [m.id for m in catalogue.segmentation_models()]


def test_bad_input_is_refused_before_anything_runs(scene, fake, tmp_path, monkeypatch):
    import tempfile

    s, volume, seg = scene
    script, record = fake
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()

    def refused(pairs, match, **kwargs):
        with pytest.raises(InputError, match=match):
            TrainRun(pairs, python=script, **kwargs).start()

    refused([], "no training pair: give at least one")
    refused([(volume, None)], "pair 1 has no segmentation node")
    refused([(seg, volume)], "pair 1 has no scalar volume")
    refused([("t1.nrrd", seg)], "pair 1 has no scalar volume")
    empty = s.AddNewNodeByClass("vtkMRMLSegmentationNode", "nothing yet")
    empty.GetSegmentation().AddEmptySegment("", "white matter")
    refused([(volume, seg), (volume, empty)], "'nothing yet' has no painted voxel on volume 't1': paint")
    transform = s.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    volume.SetAndObserveTransformNodeID(transform.GetID())
    refused([(volume, seg)], "volume 't1' is under the transform 'moved'; harden")
    volume.SetAndObserveTransformNodeID(None)
    seg.GetSegmentation().GetNthSegment(1).SetName("  ")
    refused([(volume, seg)], "segment 2 of 'my labels' has no name; name it with the words of the finding")
    seg.GetSegmentation().GetNthSegment(1).SetName("grey matter")
    elsewhere = slicer.vtkMRMLScene()
    refused([(_volume(elsewhere), seg)], "are not in the same scene")
    refused([(volume, seg)], r"model name 'my model/1' must be a plain name", model_id="my model/1")
    refused([(volume, seg)], r"unknown training option 'step' \(did you mean 'steps'", step=3)
    refused([(volume, seg)], "steps 0 must be a whole number", steps=0)
    refused([(volume, seg)], "unknown device", device="gpu")
    refused([(volume, seg)], "input size 100 must be a whole number of pixels, a multiple of 32", inputSize=100)
    assert not (record / "argv.json").exists()  # the command never ran
    assert list((tmp_path / "tmp").iterdir()) == []  # and no temporary folder is left
    assert _segments(seg) == ["white matter", "grey matter"]


def test_the_argv_is_what_the_finetune_command_parses(tmp_path):
    """The contract, against the real parser once `clipseg finetune` is in this branch."""
    from CLIPSegLib.cli import build_parser

    argv = finetune_command(tmp_path / "data.csv", tmp_path / "out", "my-model", "base.json", device="cpu", steps=7,
                            force=True, input_size=256, precision="bf16")
    assert argv[1:] == ["-m", "CLIPSegLib.cli", "finetune", "--data", str(tmp_path / "data.csv"), "--output-dir",
                        str(tmp_path / "out"), "--model-id", "my-model", "--progress", "json", "--from", "base.json",
                        "--device", "cpu", "--precision", "bf16", "--steps", "7", "--input-size", "256", "--force"]
    try:
        args = build_parser().parse_args(argv[3:])
    except SystemExit:
        pytest.skip("`clipseg finetune` is not in this branch yet")
    assert (args.model_id, args.steps, args.force, args.precision) == ("my-model", 7, True, "bf16")
    assert "--precision" not in finetune_command(tmp_path / "d.csv", tmp_path / "o", "m")  # fp32: the default
