"""The Slicer Logic's scene work on real MRML (slicer-core): export, background CLI, import, hierarchy placement."""

import json

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is installed by `make test`; CI always has it")

from CLIPSegLib.errors import ClipSegError, InputError  # noqa: E402
from CLIPSegLib.slicer.mrml_bridge import ensure_segmentation_support, segment_to_array  # noqa: E402
from CLIPSegLib.slicer.scene_run import SceneRun  # noqa: E402


@pytest.fixture
def scene_volume():
    from CLIPSegLib.synthetic.phantoms import make_phantom

    scene = slicer.vtkMRMLScene()
    ensure_segmentation_support(scene)
    ph = make_phantom((3, 40, 40), spacing=(1.0, 0.5, 0.5), seed=4, findings=("cyst",))
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "thyroid US")
    node.SetSpacing(0.5, 0.5, 1.0)
    node.SetOrigin(3.0, 4.0, 5.0)
    slicer.util.updateVolumeFromArray(node, ph.image)
    return scene, node


def test_run_loads_one_segment_per_prompt_and_keeps_the_users_segments(scene_volume, tiny_model):
    scene, volume = scene_volume
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "patient"), "study")
    if sh.GetItemByDataNode(volume):
        sh.SetItemParent(sh.GetItemByDataNode(volume), study)
    else:  # slicer-core has no subject hierarchy plugins that add items for new nodes
        sh.CreateItem(study, volume)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my work")
    seg.GetSegmentation().AddEmptySegment("manual", "manual outline")
    run = SceneRun(volume, ["cyst", "thyroid nodule"], seg, model=str(tiny_model), device="cpu", threshold=0.4,
                   keep_probabilities=True).start()
    assert "--threshold" in run.run.argv and "--probabilities" in run.run.argv
    tmp = run.tmp
    out = run.finish(timeout=180)
    assert out is seg
    segmentation = seg.GetSegmentation()
    names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
    assert names == ["manual outline", "cyst", "thyroid nodule"]
    assert seg.GetNodeReference(seg.GetReferenceImageGeometryReferenceRole()) is volume
    mask = segment_to_array(seg, segmentation.GetSegmentIdBySegmentName("cyst"), volume)
    assert mask.shape == (3, 40, 40)
    assert sh.GetItemParent(sh.GetItemByDataNode(seg)) == study
    assert any("cyst" in m for m in run.messages)
    import vtk

    for name in ("cyst", "thyroid nodule"):  # the decision travels with the segment
        segment = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(name))
        status, reading = vtk.mutable(""), vtk.mutable("")
        assert segment.GetTag("CLIPSeg.Status", status) and str(status) in ("found", "uncertain", "not found")
        assert segment.GetTag("CLIPSeg.Interpretation", reading) and str(reading).startswith(f"interpreted as '{name}'")
        decision = vtk.mutable("")  # why: what the rule asked and what it judged
        assert segment.GetTag("CLIPSeg.Decision", decision)
        decision = json.loads(str(decision))
        assert decision["status"] == str(status) and "min_contrast" in decision["required"]
        assert decision["kept_to_side"] is None  # an ultrasound model reads no side
        assert isinstance(decision["flip_average"], bool)  # whether the mirror's maps were averaged in
        assert decision["grown_voxels"] is None  # the run's --threshold turns the rules' growth off
        assert all("contrast" in e and "peak" in e for e in decision["evidence"])
    assert not tmp.exists()  # temporary files removed
    assert [n.GetName() for n in run.probability_nodes] == ["thyroid US p(cyst)", "thyroid US p(thyroid nodule)"]
    for node in run.probability_nodes:
        p = slicer.util.arrayFromVolume(node)
        assert p.shape == (3, 40, 40) and 0.0 <= p.min() and p.max() <= 1.0
        assert node.GetSpacing() == volume.GetSpacing() and node.GetOrigin() == volume.GetOrigin()
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == study
        display = node.GetDisplayNode()  # shown as soon as it is added
        assert display is not None and not display.GetAutoWindowLevel()
        assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == (0.0, 1.0)


def test_a_model_converted_from_clipseg_runs_in_the_background(scene_volume, converted_clipseg):
    """The Logic's background run with a CLIPSeg checkpoint converted by `clipseg models convert` (coarse only, no
    calibrated rule): one segment on the volume's grid, its decision read with the model's global rule."""
    import vtk

    scene, volume = scene_volume
    run = SceneRun(volume, ["anechoic cyst"], model=str(converted_clipseg), device="cpu").start()
    seg = run.finish(timeout=180)
    segmentation = seg.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 1
    segment_id = segmentation.GetSegmentIdBySegmentName("anechoic cyst")
    assert segment_to_array(seg, segment_id, volume).shape == (3, 40, 40)
    reading = vtk.mutable("")
    assert segmentation.GetSegment(segment_id).GetTag("CLIPSeg.Interpretation", reading)
    assert "global rule" in str(reading)


def test_failed_run_shows_the_cli_message_and_leaves_the_scene_alone(scene_volume, tmp_path):
    scene, volume = scene_volume
    n_nodes = scene.GetNumberOfNodes()
    run = SceneRun(volume, ["cyst"], model=str(tmp_path / "missing.json"), device="cpu").start()
    with pytest.raises(ClipSegError, match="does not exist"):
        run.finish(timeout=180)
    assert scene.GetNumberOfNodes() == n_nodes


def test_an_unreadable_result_file_leaves_the_scene_alone(scene_volume, tiny_model, monkeypatch):
    import CLIPSegLib.slicer.scene_run as scene_run

    def unreadable(*args, **kwargs):
        raise RuntimeError("probabilities.nrrd: truncated file")

    monkeypatch.setattr(scene_run, "read_probabilities", unreadable)
    scene, volume = scene_volume
    n_nodes = scene.GetNumberOfNodes()
    run = SceneRun(volume, ["cyst"], model=str(tiny_model), device="cpu", keep_probabilities=True).start()
    tmp = run.tmp
    with pytest.raises(RuntimeError, match="truncated"):
        run.finish(timeout=180)
    assert scene.GetNumberOfNodes() == n_nodes  # no segmentation node, no probability volumes
    assert not tmp.exists()


def test_bad_input_is_refused_before_starting(scene_volume):
    scene, volume = scene_volume
    with pytest.raises(InputError, match="empty prompt"):
        SceneRun(volume, ["  "])
    with pytest.raises(InputError, match="select a volume"):
        SceneRun(None, ["cyst"]).start()
    with pytest.raises(InputError, match="precision 'fp16' is not one of fp32, bf16"):
        SceneRun(volume, ["cyst"], precision="fp16")


def test_precision_reaches_the_command_line(tmp_path):
    from CLIPSegLib.slicer.background import segment_command
    from CLIPSegLib.cli import build_parser

    argv = segment_command(tmp_path / "in.nrrd", ["cyst"], tmp_path / "o.seg.nrrd", device="cpu", precision="bf16")
    assert build_parser().parse_args(argv[3:]).precision == "bf16"


def test_a_closed_surface_output_is_converted_and_the_user_is_told(scene_volume, monkeypatch, tmp_path):
    import vtk

    import CLIPSegLib.slicer.scene_run as scene_run

    scene, volume = scene_volume
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "from STL")
    seg.SetSourceRepresentationToClosedSurface()
    sphere = vtk.vtkSphereSource()
    sphere.SetCenter(10.0, 10.0, 6.0)
    sphere.SetRadius(3.0)
    sphere.Update()
    seg.AddSegmentFromClosedSurfaceRepresentation(sphere.GetOutput(), "organ")
    cyst = np.zeros((3, 40, 40), bool)
    cyst[1, 5:9, 5:9] = True
    monkeypatch.setattr(scene_run, "read_segment_masks", lambda path, prompts: {"cyst": cyst})
    run = SceneRun(volume, ["cyst"], seg)
    run.tmp = tmp_path  # as if the background process had written its result there
    assert run._load(tmp_path / "output.seg.nrrd") is seg
    segmentation = seg.GetSegmentation()
    assert [segmentation.GetNthSegment(i).GetName() for i in range(2)] == ["organ", "cyst"]
    assert np.array_equal(segment_to_array(seg, segmentation.GetSegmentIdBySegmentName("cyst"), volume), cyst)
    assert any("converted to binary labelmap" in m and "'from STL'" in m for m in run.messages)
