"""The MRML bridge on real MRML nodes from the slicer-core wheel (no Slicer app, no Qt)."""

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is installed by `make test`; CI always has it")

from CLIPSegLib.errors import InputError  # noqa: E402
from CLIPSegLib.slicer.mrml_bridge import (ensure_segmentation_support, masks_to_segmentation, segment_to_array,
                                           volume_to_array)

OBLIQUE_RAS = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])


@pytest.fixture
def scene():
    s = slicer.vtkMRMLScene()
    ensure_segmentation_support(s)
    return s


def _volume(scene, array, spacing=(0.6, 0.7, 1.5), origin=(10.0, -20.0, 5.0), directions=OBLIQUE_RAS):
    import vtk

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "us")
    node.SetSpacing(*spacing)
    node.SetOrigin(*origin)
    m = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            m.SetElement(r, c, directions[r][c])
    node.SetIJKToRASDirectionMatrix(m)
    slicer.util.updateVolumeFromArray(node, array)
    return node


def test_volume_to_array_keeps_voxels_and_geometry(scene):
    arr = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    node = _volume(scene, arr)
    got, g = volume_to_array(node)
    assert got.dtype == np.float32 and np.array_equal(got, arr)
    assert g.spacing == pytest.approx((0.6, 0.7, 1.5))
    ras = g.ijk_to_ras()
    np.testing.assert_allclose(ras[:3, 3], (10.0, -20.0, 5.0))
    np.testing.assert_allclose(ras[:3, :3], OBLIQUE_RAS * np.array([0.6, 0.7, 1.5]))
    # the same voxel lands at the same RAS point through MRML and through our geometry
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    assert m.MultiplyPoint((2, 3, 1, 1))[:3] == pytest.approx(tuple((ras @ [2, 3, 1, 1])[:3]))


def test_masks_become_segments_existing_ones_kept_and_rerun_replaces_only_its_segment(scene):
    node = _volume(scene, np.zeros((4, 5, 6), np.float32))
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    seg.GetSegmentation().AddEmptySegment("mine", "my manual segment")
    a = np.zeros((4, 5, 6), bool)
    a[1:3, 2:4, 1:5] = True
    b = np.zeros_like(a)
    b[0, 0, 0] = True
    ids = masks_to_segmentation(seg, node, {"thyroid nodule": a, "cyst": b})
    segmentation = seg.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 3
    assert segmentation.GetSegment("mine") is not None
    assert np.array_equal(segment_to_array(seg, ids["thyroid nodule"], node), a)
    assert np.array_equal(segment_to_array(seg, ids["cyst"], node), b)
    assert seg.GetNodeReference(seg.GetReferenceImageGeometryReferenceRole()).GetID() == node.GetID()
    # re-run one prompt: only that segment changes, same id, nothing added
    a2 = np.zeros_like(a)
    a2[3, 4, 5] = True
    ids2 = masks_to_segmentation(seg, node, {"thyroid nodule": a2})
    assert ids2["thyroid nodule"] == ids["thyroid nodule"] and segmentation.GetNumberOfSegments() == 3
    assert np.array_equal(segment_to_array(seg, ids["thyroid nodule"], node), a2)
    assert np.array_equal(segment_to_array(seg, ids["cyst"], node), b)


def test_a_users_own_segment_named_like_a_prompt_is_never_replaced(scene):
    node = _volume(scene, np.zeros((2, 3, 4), np.float32))
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    mine = seg.GetSegmentation().AddEmptySegment("", "cyst")  # drawn by hand, empty
    found = np.zeros((2, 3, 4), bool)
    found[1, 1, 1:3] = True
    ids = masks_to_segmentation(seg, node, {"cyst": found})
    segmentation = seg.GetSegmentation()
    assert ids["cyst"] != mine and segmentation.GetSegment(ids["cyst"]).GetName() == "cyst (CLIPSeg)"
    assert not segment_to_array(seg, mine, node).any()
    again = masks_to_segmentation(seg, node, {"cyst": ~found})  # a re-run replaces CLIPSeg's segment only
    assert again == ids and segmentation.GetNumberOfSegments() == 2
    assert np.array_equal(segment_to_array(seg, ids["cyst"], node), ~found)
    assert not segment_to_array(seg, mine, node).any()


def test_a_segmentation_made_from_a_surface_model_takes_the_masks_and_keeps_its_segment(scene):
    """A segmentation imported from a model/STL has closed surface as source representation, which refuses labelmap
    writes: it is converted to binary labelmap, the user's segment kept."""
    import vtk

    node = _volume(scene, np.zeros((20, 20, 20), np.float32), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                   directions=np.eye(3))
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "from STL")
    seg.SetSourceRepresentationToClosedSurface()
    sphere = vtk.vtkSphereSource()
    sphere.SetCenter(10.0, 10.0, 10.0)
    sphere.SetRadius(4.0)
    sphere.SetThetaResolution(24)
    sphere.SetPhiResolution(24)
    sphere.Update()
    mine = seg.AddSegmentFromClosedSurfaceRepresentation(sphere.GetOutput(), "organ model")
    assert seg.GetSegmentation().GetSourceRepresentationName() == "Closed surface"
    cyst = np.zeros((20, 20, 20), bool)
    cyst[2:5, 3:6, 4:8] = True
    ids = masks_to_segmentation(seg, node, {"cyst": cyst})
    segmentation = seg.GetSegmentation()
    assert segmentation.GetSourceRepresentationName() == "Binary labelmap"
    assert segmentation.GetNumberOfSegments() == 2 and segmentation.GetSegment(mine).GetName() == "organ model"
    assert np.array_equal(segment_to_array(seg, ids["cyst"], node), cyst)
    organ = segment_to_array(seg, mine, node)
    # the sphere (radius 4 mm at voxel 10,10,10 of a 1 mm grid) as voxels: its centre in, its corners out
    assert organ[10, 10, 10] and not organ[10, 10, 15] and 180 < organ.sum() < 340
    assert not (organ & cyst).any()


def test_probability_volumes_show_with_window_level_0_to_1_and_a_heat_map(scene):
    from CLIPSegLib.slicer.mrml_bridge import array_to_volume_node, show_as_probability

    colors = slicer.vtkMRMLColorLogic()  # adds the colour tables the Slicer app has (kept alive while used)
    colors.SetMRMLScene(scene)
    like = _volume(scene, np.zeros((2, 3, 4), np.float32))
    node = array_to_volume_node(scene, np.full((2, 3, 4), 0.25, np.float32), like, "p(cyst)")
    show_as_probability(node)
    display = node.GetDisplayNode()
    assert display is not None and not display.GetAutoWindowLevel()
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == (0.0, 1.0)
    assert display.GetColorNode().GetName() == "PET-Heat"
    bare = slicer.vtkMRMLScene()  # no colour tables: window/level still set, the colour left as it is
    like = _volume(bare, np.zeros((2, 3, 4), np.float32))
    node = array_to_volume_node(bare, np.zeros((2, 3, 4), np.float32), like, "p")
    show_as_probability(node)
    assert node.GetDisplayNode().GetWindowLevelMax() == 1.0


def test_empty_mask_gives_an_empty_segment(scene):
    node = _volume(scene, np.zeros((2, 3, 4), np.float32))
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    ids = masks_to_segmentation(seg, node, {"calcification": np.zeros((2, 3, 4), bool)})
    assert seg.GetSegmentation().GetSegment(ids["calcification"]).GetName() == "calcification"
    assert not segment_to_array(seg, ids["calcification"], node).any()


def test_bad_nodes_are_refused_with_what_to_do(scene):
    lab = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    slicer.util.updateVolumeFromArray(lab, np.zeros((2, 3, 4), np.uint8))
    with pytest.raises(InputError, match="label map"):
        volume_to_array(lab)
    node = _volume(scene, np.zeros((2, 3, 4), np.float32))
    t = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "probe pose")
    node.SetAndObserveTransformNodeID(t.GetID())
    with pytest.raises(InputError, match="harden the transform"):
        volume_to_array(node)
    with pytest.raises(InputError, match="select a volume"):
        volume_to_array(None)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    node.SetAndObserveTransformNodeID(None)
    with pytest.raises(InputError, match="shape"):
        masks_to_segmentation(seg, node, {"x": np.zeros((9, 9, 9), bool)})


def test_pipeline_result_lands_in_the_scene_with_the_cli_geometry(scene, tiny_model, tmp_path):
    """Same volume through the file path (CLI writer) and the MRML path gives the same voxels and RAS placement."""
    import slicerio

    from CLIPSegLib.io.outputs import write_segmentation
    from CLIPSegLib.inference.pipeline import segment_volume
    from CLIPSegLib.inference.segment_file import load_engine

    rng = np.random.default_rng(0)
    node = _volume(scene, rng.random((3, 32, 32)).astype(np.float32))
    volume, geometry = volume_to_array(node)
    engine = load_engine(str(tiny_model), device="cpu")
    # the random model's probabilities sit in a narrow band: cut at their median so the mask is about half the volume
    median = float(np.median(segment_volume(engine, volume, geometry, ["cyst"], keep_probabilities=True).probabilities))
    result = segment_volume(engine, volume, geometry, ["cyst"], presence={
        "threshold": median, "min_peak": 0.0, "min_mean": 0.0, "min_extent_mm": 0.0, "min_area_mm2": 0.0})
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    ids = masks_to_segmentation(seg, node, result.masks)
    mask = result.masks["cyst"]
    assert 0 < mask.sum() < mask.size, "the comparison below needs a mask that is neither empty nor full"
    assert np.array_equal(segment_to_array(seg, ids["cyst"], node), mask)
    out = write_segmentation(tmp_path / "r.seg.nrrd", result.masks, geometry)
    ijk_to_lps = slicerio.read_segmentation(str(out))["ijkToLPS"]
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    node_ijk_to_ras = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
    np.testing.assert_allclose(np.diag([-1, -1, 1, 1]) @ ijk_to_lps, node_ijk_to_ras, atol=1e-6)


def test_reading_a_segment_leaves_the_scene_as_it_was(scene):
    """The temporary label map and what its export adds (display node, colour table) do not stay in the user's scene."""
    node = _volume(scene, np.zeros((2, 3, 4), np.float32))
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    mask = np.zeros((2, 3, 4), bool)
    mask[1, 2, 3] = True
    seg_id = masks_to_segmentation(seg, node, {"cyst": mask})["cyst"]
    nodes = [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]
    assert np.array_equal(segment_to_array(seg, seg_id, node), mask)
    assert [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())] == nodes
