"""MRML bridge (no Qt, no Slicer app): volume node -> array + geometry; masks -> segments of a segmentation node.

Uses only MRML / vtkSegmentationCore API present both in the Slicer app and in the ``slicer-core`` wheel.
Arrays are ``[K,J,I]`` (``slicer.util.arrayFromVolume`` order); geometry comes from the node's IJKToRAS matrix and is
converted to LPS by ``io.geometry.Geometry``. The scene's segmentations module logic (or at least its converter rules)
must be set up before segments are added: ``ensure_segmentation_support(scene)`` does it outside the app.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..io.outputs import SEGMENT_COLORS
from ..io.geometry import Geometry, check_volume


_LOGICS = []  # keep the logic objects alive for the scene's lifetime


def ensure_segmentation_support(scene) -> None:
    """Register the segmentation converter rules through the Segmentations module logic (needed with slicer-core;
    harmless in the Slicer app, where the module has done it already)."""
    import slicer

    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    _LOGICS.append(logic)


def _ijk_to_ras(node) -> np.ndarray:
    import slicer
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return slicer.util.arrayFromVTKMatrix(m)


def check_untransformed(node, what: str) -> None:
    """InputError when ``node`` (a ``what``: volume, segmentation) is under a transform: its voxels would not be where
    the scene shows them."""
    transform = node.GetParentTransformNode()
    if transform is not None:
        raise InputError(f"{what} {node.GetName()!r} is under the transform {transform.GetName()!r}; harden the "
                         f"transform (Transforms module: 'Harden transform') or remove it, then run again")


def volume_to_array(volume_node) -> tuple[np.ndarray, Geometry]:
    """A scalar volume node -> (float32 copy ``[K,J,I]``, Geometry). Refuses label maps, vector volumes and
    volumes under a transform, saying what to do."""
    import slicer.util

    if volume_node is None:
        raise InputError("no input volume: select a volume first")
    if volume_node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputError(f"{volume_node.GetName()!r} is a label map; select a scalar (grey-level) volume")
    if volume_node.IsA("vtkMRMLVectorVolumeNode") or not volume_node.IsA("vtkMRMLScalarVolumeNode"):
        raise InputError(f"{volume_node.GetName()!r} is not a scalar volume (colour/vector?); convert it with the "
                         f"'Vector to Scalar Volume' module first")
    if volume_node.GetImageData() is None:
        raise InputError(f"volume {volume_node.GetName()!r} has no image data; load the image again")
    check_untransformed(volume_node, "volume")
    array = np.array(slicer.util.arrayFromVolume(volume_node), dtype=np.float32, copy=True)
    if array.ndim == 2:
        array = array[None]
    return check_volume(array, f"volume {volume_node.GetName()!r}"), Geometry.from_ijk_to_ras(_ijk_to_ras(volume_node))


def array_to_volume_node(scene, array: np.ndarray, like_node, name: str):
    """A new scalar volume node holding ``array`` ``[K,J,I]`` on ``like_node``'s grid (same IJKToRAS)."""
    import slicer.util

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.CopyOrientation(like_node)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array))
    return node


def show_as_probability(node) -> None:
    """Give a probability volume (values in [0,1]) a display node, so it shows when added: window/level fixed to 0..1
    and the PET heat colour map where the scene has it (the Slicer app adds it; a bare MRML scene may not)."""
    import slicer

    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, 1.0)
    heat = slicer.vtkMRMLColorLogic.GetPETColorNodeID(slicer.vtkMRMLPETProceduralColorNode.PETheat)
    if node.GetScene().GetNodeByID(heat) is not None:
        display.SetAndObserveColorNodeID(heat)


def _oriented_image(mask: np.ndarray, ijk_to_ras: np.ndarray):
    """bool ``[K,J,I]`` -> vtkOrientedImageData (unsigned char) with the given IJK-to-RAS matrix."""
    import slicer
    import vtk
    from vtk.util import numpy_support

    k, j, i = mask.shape
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(i, j, k)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(k, j, i)[:] = mask.astype(np.uint8)
    image.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(np.asarray(ijk_to_ras, float)))
    return image


PROMPT_TAG = "CLIPSeg.Prompt"  # segment tag: the prompt a segment was made for


def _segment_made_for(segmentation, prompt: str) -> str:
    """Id of the segment CLIPSeg made for ``prompt`` in this segmentation, or ''."""
    import vtk

    for i in range(segmentation.GetNumberOfSegments()):
        value = vtk.mutable("")
        if segmentation.GetNthSegment(i).GetTag(PROMPT_TAG, value) and str(value) == prompt:
            return segmentation.GetNthSegmentID(i)
    return ""


def use_labelmap_source(segmentation_node) -> bool:
    """Make binary labelmap the source representation, converting the segments to it (a segmentation made from a
    model or STL file has closed surface as source, which refuses labelmap writes). Every segment is kept, now as
    voxels on the reference geometry (the extent grows to fit each surface). Returns True if it converted."""
    import slicer

    segmentation = segmentation_node.GetSegmentation()
    source = segmentation.GetSourceRepresentationName()
    if source == slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName():
        return False
    if not segmentation_node.CreateBinaryLabelmapRepresentation():
        raise InputError(f"the segments of {segmentation_node.GetName()!r} ({source}) cannot be converted to a "
                         f"binary labelmap; pick another output segmentation or 'Create new segmentation'")
    segmentation_node.SetSourceRepresentationToBinaryLabelmap()
    return True


def masks_to_segmentation(segmentation_node, volume_node, masks: dict[str, np.ndarray]) -> dict[str, str]:
    """Write masks (segment name -> bool ``[K,J,I]`` on the volume's grid) into a segmentation node.

    The reference geometry becomes ``volume_node``. Segments made here carry the tag ``CLIPSeg.Prompt`` = their
    mask's name; re-running a name replaces only the segment tagged with it. Every other segment is kept, including
    a user's own segment of the same name: the new one is then named ``"<name> (CLIPSeg)"``. A segmentation whose
    source representation is closed surface is first converted to binary labelmap (``use_labelmap_source``).
    Returns mask name -> segment id."""
    import slicer

    if not masks:
        return {}
    shape = tuple(slicer.util.arrayFromVolume(volume_node).shape)
    shape = shape if len(shape) == 3 else (1,) + shape
    for name, m in masks.items():
        if np.asarray(m).shape != shape:
            raise InputError(f"mask for {name!r} has shape {np.asarray(m).shape}, the volume has {shape} (K,J,I)")
    ijk_to_ras = _ijk_to_ras(volume_node)
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    segmentation_node.SetNodeReferenceID(segmentation_node.GetReferenceImageGeometryReferenceRole(),
                                         volume_node.GetID())
    if segmentation_node.GetDisplayNode() is None:
        segmentation_node.CreateDefaultDisplayNodes()
    use_labelmap_source(segmentation_node)
    segmentation = segmentation_node.GetSegmentation()
    ids = {}
    for name, mask in masks.items():
        seg_id = _segment_made_for(segmentation, name)
        if not seg_id:
            color = SEGMENT_COLORS[(segmentation.GetNumberOfSegments()) % len(SEGMENT_COLORS)]
            taken = bool(segmentation.GetSegmentIdBySegmentName(name))
            seg_id = segmentation.AddEmptySegment("", f"{name} (CLIPSeg)" if taken else name, color)
            segmentation.GetSegment(seg_id).SetTag(PROMPT_TAG, name)
        image = _oriented_image(np.asarray(mask, bool), ijk_to_ras)
        ok = slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
            image, segmentation_node, seg_id, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
        if not ok:
            raise RuntimeError(f"could not write segment {name!r}; call ensure_segmentation_support(scene) first")
        ids[name] = seg_id
    return ids


def _node_ids(scene) -> set:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def segment_to_array(segmentation_node, segment_id: str, volume_node) -> np.ndarray:
    """A segment resampled on ``volume_node``'s grid -> bool ``[K,J,I]`` (via a temporary label map node). The scene
    is left as it was: the label map and what the export adds with it (display node, colour table) are removed."""
    import slicer
    import vtk

    scene = segmentation_node.GetScene()
    before = _node_ids(scene)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    try:
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(segmentation_node, ids, labelmap,
                                                                             volume_node)
        arr = np.array(slicer.util.arrayFromVolume(labelmap)) > 0
        return arr if arr.ndim == 3 else arr[None]
    finally:
        for node_id in _node_ids(scene) - before:
            node = scene.GetNodeByID(node_id)
            if node is not None:
                scene.RemoveNode(node)
