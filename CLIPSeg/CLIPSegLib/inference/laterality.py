"""The patient's sides, for models that read them ("... in the left lung"): spec ``inference.patient_sides``
(``{"margin_mm": M}``; absent: off, as for ultrasound models, whose sweeps have no patient frame).

1. The network sees every slice with the patient's left on the image's right, as a chest radiograph or an axial CT
   slice is displayed (the frame TGC-Net's location cue and the report phantoms use): a volume whose slice columns
   point to the patient's right (NIfTI's usual RAS storage) is mirrored before the network and its maps mirrored
   back (``mirror_axis``); a slice whose rows run toward the head (a coronal slice of a volume stored head-first:
   its rows are the volume's slices, which usually climb) is turned upright the same way, so "upper" and "lower"
   mean the patient's (``feet_axis``). Both together: ``frame_flips``.
2. A prompt that names one side keeps its segment on that side of the body, decided in physical space from the
   volume's geometry rather than learnt from the words (``side_regions``): LPS x grows toward the patient's left
   (``io.geometry``). The midline is the middle of the body's left-right extent (the largest bright region after an
   Otsu threshold: soft tissue against air in CT and MRI, the chest against the background of a radiograph), so a
   patient off-centre in the field of view is followed; the segment may reach ``margin_mm`` past it (a
   paramediastinal finding, a midline estimated a few mm off).
"""

from __future__ import annotations

import math

import numpy as np

from ..io.geometry import Geometry

SIDE_MARGIN_MM = 10.0  # report models' margin: a lung's medial border lies 14-30 mm from the midline in the report
# phantoms, so 10 mm spares a paramediastinal opacity and the midline's few mm of error
SIDE_NAMES = {1: "left", -1: "right"}  # the sign of a side cue (``engines.contract.PromptReading.side``)
MAX_BODY_VOXELS = 4_000_000  # the body is found on a strided copy of larger volumes (a midline to ~1 voxel)


def patient_sides_of(spec: dict | None) -> float | None:
    """The model's side margin in mm (spec ``inference.patient_sides.margin_mm``), or None: the model does not read
    the patient's sides. ModelError when the entry is malformed. (Flip averaging, ``inference.flip_average``, asks
    the mirrored slice the prompt with its sides swapped: ``Engine.mirror_prompts``.)"""
    inference = (spec or {}).get("inference") or {}
    entry = inference.get("patient_sides")
    if entry is None:
        return None
    from ..errors import ModelError

    margin = entry.get("margin_mm") if isinstance(entry, dict) else None
    if not isinstance(margin, (int, float)) or isinstance(margin, bool) or not math.isfinite(margin) or margin < 0:
        raise ModelError(f"model {(spec or {}).get('id')!r}: inference.patient_sides must be {{\"margin_mm\": M}} with "
                         f"M >= 0 mm (how far past the body's midline a one-sided segment may reach), not {entry!r}")
    return float(margin)


def mirror_axis(geometry: Geometry, slice_axis: int) -> int | None:
    """The ``[K,J,I]`` array axis to mirror so that slices along ``slice_axis`` (voxel axis, 0 = I) have their
    columns toward the patient's left, or None when they already do. Columns: voxel axis I, or J for slices along
    I; rows: J, or K for slices along I or J. None too when the rows run more left-right than the columns (a slice
    stored rotated a quarter turn): mirroring cannot put the left on the right there."""
    column, row = (1 if slice_axis == 0 else 0), (1 if slice_axis == 2 else 2)
    x = geometry.direction_matrix[0]
    return 2 - column if x[column] < 0 and abs(x[column]) >= abs(x[row]) else None


def feet_axis(geometry: Geometry, slice_axis: int) -> int | None:
    """The ``[K,J,I]`` array axis to reverse so that the rows of slices along ``slice_axis`` run toward the patient's
    feet, as a chest radiograph is displayed (the frame of TGC-Net's zone cue: "upper" is the top rows), or None:
    they already do, or the rows do not run mostly head-feet (an axial slice: its upper and lower zones are other
    slices, not rows; a 2D image stored without a real direction, whose rows are read in display order). Rows: voxel
    axis J, or K for slices along I or J; LPS z grows toward the head."""
    row = 1 if slice_axis == 2 else 2
    d = np.asarray(geometry.direction_matrix, dtype=float)[:, row]
    return 2 - row if d[2] > 0 and abs(d[2]) >= max(abs(d[0]), abs(d[1])) else None


def frame_flips(geometry: Geometry, slice_axis: int) -> tuple[int, ...]:
    """The ``[K,J,I]`` array axes to reverse so that slices along ``slice_axis`` reach a model that reads the
    patient's sides in its frame (``mirror_axis``: columns toward the patient's left; ``feet_axis``: rows toward the
    feet); () when they already are."""
    return tuple(a for a in (mirror_axis(geometry, slice_axis), feet_axis(geometry, slice_axis)) if a is not None)


def mirrored_along(geometry: Geometry, array_axis: int, n: int) -> Geometry:
    """The geometry of a ``[K,J,I]`` grid stored with its array axis ``array_axis`` (0 = K) of ``n`` voxels reversed
    (``np.flip(array, array_axis)``): the same voxels in physical space."""
    axis = 2 - array_axis  # voxel axis: 0 = I
    d = np.array(geometry.direction_matrix, dtype=float)
    origin = np.asarray(geometry.origin) + d[:, axis] * geometry.spacing[axis] * (n - 1)
    d[:, axis] *= -1
    return Geometry(geometry.spacing, tuple(float(v) for v in origin), tuple(map(tuple, d)))


def mirrored_along_i(geometry: Geometry, n_i: int) -> Geometry:
    """The geometry of a ``[K,J,I]`` grid of ``n_i`` columns stored with its I axis reversed (``array[..., ::-1]``):
    the same voxels in physical space."""
    return mirrored_along(geometry, 2, n_i)


def _plane_and_step(shape_kji, geometry: Geometry, stride: int = 1):
    """(LPS x in mm of the k = 0 plane's voxels, every ``stride``-th along J and I, ``[J',I']`` float64; x step in mm
    from one k to the next)."""
    _, nj, ni = shape_kji
    step = geometry.direction_matrix[0] * np.asarray(geometry.spacing)  # mm of x per voxel along I, J, K
    i, j = np.arange(0, ni, stride), np.arange(0, nj, stride)
    return geometry.origin[0] + step[0] * i[None, :] + step[1] * j[:, None], float(step[2])


def lps_x_mm(shape_kji, geometry: Geometry, stride: int = 1) -> np.ndarray:
    """LPS x (mm; + toward the patient's left) of the voxel centres of a ``[K,J,I]`` grid (every ``stride``-th voxel
    along each axis), ``float32 [K',J',I']``."""
    plane, step_k = _plane_and_step(shape_kji, geometry, stride)
    k = np.arange(0, shape_kji[0], stride, dtype=np.float64)
    return (plane[None] + step_k * k[:, None, None]).astype(np.float32)


def body_midline_mm(volume: np.ndarray, geometry: Geometry) -> float:
    """LPS x (mm) of the middle of the body's left-right extent in ``volume`` ``[K,J,I]`` (raw intensities): the
    largest connected region above the volume's Otsu threshold, found on every n-th voxel of a large volume
    (``MAX_BODY_VOXELS``). A constant volume, or none above the threshold: the middle of the grid."""
    import SimpleITK as sitk

    stride = max(1, int(np.ceil((volume.size / MAX_BODY_VOXELS) ** (1 / 3))))
    x = lps_x_mm(volume.shape, geometry, stride)
    small = np.ascontiguousarray(volume[::stride, ::stride, ::stride], dtype=np.float32)
    middle = float((x.min() + x.max()) / 2)
    if float(small.max()) - float(small.min()) <= 1e-6:
        return middle
    otsu = sitk.OtsuThresholdImageFilter()
    otsu.Execute(sitk.GetImageFromArray(small))
    bright = sitk.GetImageFromArray((small > otsu.GetThreshold()).astype(np.uint8))
    largest = sitk.GetArrayFromImage(sitk.RelabelComponent(sitk.ConnectedComponent(bright))) == 1
    if not largest.any():
        return middle
    xs = x[largest]
    return float((xs.min() + xs.max()) / 2)


def side_region(shape_kji, geometry: Geometry, midline_mm: float, side: int, margin_mm: float) -> np.ndarray:
    """Where a segment of the patient's ``side`` (+1 left, -1 right) may lie in a ``[K,J,I]`` grid: bool, the voxels
    on that side of the midline (LPS x, mm) or less than ``margin_mm`` past it; built a slice at a time."""
    plane, step_k = _plane_and_step(shape_kji, geometry)
    out = np.empty(tuple(shape_kji), dtype=bool)
    for k in range(shape_kji[0]):
        x = plane + step_k * k
        out[k] = (x >= midline_mm - margin_mm) if side > 0 else (x <= midline_mm + margin_mm)
    return out


def side_regions(volume: np.ndarray, geometry: Geometry, sides, margin_mm: float):
    """-> (one region per prompt: ``side_region`` for a prompt naming one side, None for the others; the midline in
    mm, or None when no prompt names a side). ``sides``: each prompt's side cue (+1 left, -1 right, 0 none)."""
    if not any(sides):
        return [None] * len(sides), None
    midline = body_midline_mm(volume, geometry)
    regions = {s: side_region(volume.shape, geometry, midline, s, margin_mm) for s in set(sides) if s}
    return [regions[s] if s else None for s in sides], midline


__all__ = ["SIDE_MARGIN_MM", "SIDE_NAMES", "body_midline_mm", "feet_axis", "frame_flips",
           "lps_x_mm", "mirror_axis", "mirrored_along", "mirrored_along_i", "patient_sides_of", "side_region",
           "side_regions"]
