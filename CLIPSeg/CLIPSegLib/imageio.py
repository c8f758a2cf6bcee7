"""All image I/O and geometry conversions, in one place.

Internal layout (used everywhere in CLIPSegLib): a numpy array indexed ``[K, J, I]`` (slice, row, column; the
order ``SimpleITK.GetArrayFromImage`` returns), plus a ``Geometry``: spacing in mm along I, J, K, origin in mm
and a 3x3 direction matrix whose columns are the I, J, K axes. Geometry is stored in LPS (DICOM/ITK convention);
Slicer's scene uses RAS, which differs by flipping x and y (``LPS_TO_RAS``). A 2D image is a volume with K = 1.

Reading: NIfTI, NRRD, MHA/MHD, a DICOM folder, PNG/JPEG/BMP/TIFF (colour screenshots become grey).
Writing: ``.seg.nrrd`` through slicerio (one segment per prompt, Slicer-readable), or a label map (NIfTI, NRRD,
MHA) through SimpleITK. Every write goes to a temporary file in the target folder and is renamed when complete.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])  # also RAS -> LPS (its own inverse)
SEGMENTATION_SUFFIXES = (".seg.nrrd",)
# Single-file formats only: a detached header (.nhdr, .mhd) would point at a data file named after the temporary
# file that atomic_path renames, so it is refused as an output (still read as an input).
LABELMAP_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# Distinct segment colours (RGB in 0..1), in prompt order.
SEGMENT_COLORS = [(0.90, 0.30, 0.25), (0.25, 0.70, 0.95), (0.95, 0.85, 0.20), (0.45, 0.85, 0.40),
                  (0.75, 0.45, 0.90), (0.95, 0.55, 0.15), (0.30, 0.90, 0.80), (0.95, 0.45, 0.70)]


@dataclass(frozen=True)
class Geometry:
    """Voxel grid in physical space. spacing: mm along (I, J, K); origin: LPS mm of voxel (0,0,0);
    direction: 3x3 LPS, column c = unit vector of voxel axis c."""

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[tuple[float, ...], ...]

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    def ijk_to_lps(self) -> np.ndarray:
        """4x4 homogeneous matrix from voxel (i, j, k) to LPS mm."""
        m = np.eye(4)
        m[:3, :3] = self.direction_matrix * np.asarray(self.spacing)[None, :]
        m[:3, 3] = self.origin
        return m

    def ijk_to_ras(self) -> np.ndarray:
        """4x4 homogeneous matrix from voxel (i, j, k) to RAS mm (Slicer's IJKToRAS)."""
        flip = np.eye(4)
        flip[:3, :3] = LPS_TO_RAS
        return flip @ self.ijk_to_lps()

    @classmethod
    def axis_aligned(cls, spacing_kji, origin=(0.0, 0.0, 0.0)) -> "Geometry":
        """Identity directions; ``spacing_kji`` in mm in array order (K, J, I), as phantoms give it."""
        return cls(tuple(float(s) for s in spacing_kji[::-1]), tuple(origin), ((1, 0, 0), (0, 1, 0), (0, 0, 1)))

    @classmethod
    def from_ijk_to_lps(cls, m: np.ndarray) -> "Geometry":
        m = np.asarray(m, dtype=float)
        spacing = np.linalg.norm(m[:3, :3], axis=0)
        if np.any(spacing <= 0):
            raise InputError(f"voxel spacing {spacing.tolist()} must be positive; fix the image header")
        return cls(tuple(spacing.tolist()), tuple(m[:3, 3].tolist()), tuple(map(tuple, m[:3, :3] / spacing)))

    @classmethod
    def from_ijk_to_ras(cls, m: np.ndarray) -> "Geometry":
        flip = np.eye(4)
        flip[:3, :3] = LPS_TO_RAS
        return cls.from_ijk_to_lps(flip @ np.asarray(m, dtype=float))

    @classmethod
    def from_sitk(cls, image) -> "Geometry":
        """From a 2D or 3D SimpleITK image (2D gets a unit third axis)."""
        d = image.GetDimension()
        spacing = list(image.GetSpacing()) + [1.0] * (3 - d)
        origin = list(image.GetOrigin()) + [0.0] * (3 - d)
        direction = np.eye(3)
        direction[:d, :d] = np.asarray(image.GetDirection()).reshape(d, d)
        return cls(tuple(spacing), tuple(origin), tuple(map(tuple, direction)))

    def to_sitk(self, array: np.ndarray, is_vector: bool = False):
        """``[K,J,I]`` array (``[K,J,I,C]`` with ``is_vector``) -> 3D SimpleITK image carrying this geometry."""
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(array, isVector=is_vector)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction_matrix.flatten().tolist())
        return image


def check_same_grid(mask: np.ndarray, mask_geometry: Geometry, image: np.ndarray, image_geometry: Geometry,
                    mask_name: str, image_name: str) -> None:
    """Raise unless a mask ``[K,J,I]`` lies on its image's voxel grid: same shape and the same voxel -> LPS mapping
    (to 0.01 mm at the grid's far corner), so that a flipped or shifted mask is never scored or trained on."""
    if mask.shape != image.shape:
        raise InputError(f"mask {mask_name} has shape {mask.shape} (K,J,I), its image {image_name} has {image.shape}")
    corners = np.array([[i, j, k, 1.0] for i in (0, image.shape[2] - 1) for j in (0, image.shape[1] - 1)
                        for k in (0, image.shape[0] - 1)]).T
    gap = np.abs(mask_geometry.ijk_to_lps() @ corners - image_geometry.ijk_to_lps() @ corners).max()
    if gap > 0.01:
        raise InputError(f"mask {mask_name} is on another grid than its image {image_name} (voxels up to {gap:.2f} mm "
                         f"apart: different origin, spacing or direction); resample the mask onto the image first "
                         f"(e.g. in Slicer: Resample Image (BRAINS) with the image as reference, nearest neighbour)")


def check_volume(array: np.ndarray, what: str = "image") -> np.ndarray:
    """Validate a ``[K,J,I]`` scalar array: 3 axes, none empty, all finite. Returns float32."""
    array = np.asarray(array)
    if array.ndim != 3:
        raise InputError(f"{what} has {array.ndim} axes (shape {array.shape}); expected a 2D image or 3D volume")
    if 0 in array.shape:
        raise InputError(f"{what} has an empty axis (shape {array.shape} as K,J,I); it holds no voxels to segment")
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise InputError(f"{what} has voxel type {array.dtype}; expected real scalar numbers")
    array = array.astype(np.float32, copy=False)
    bad = ~np.isfinite(array)
    if bad.any():
        raise InputError(f"{what} has {int(bad.sum())} NaN or infinite voxels; replace them (for example with 0) "
                         f"before segmenting")
    return array


def _read_sitk(path: Path):
    import SimpleITK as sitk

    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        series = reader.GetGDCMSeriesIDs(str(path))
        if not series:
            raise InputError(f"folder {path} holds no DICOM series; give a DICOM folder or an image file")
        if len(series) > 1:
            raise InputError(f"folder {path} holds {len(series)} DICOM series ({', '.join(series)}); move the series "
                             f"to segment into a folder of its own and give that folder")
        files = reader.GetGDCMSeriesFileNames(str(path), series[0])
        reader.SetFileNames(files)
        try:
            return reader.Execute()
        except RuntimeError as e:
            raise InputError(f"DICOM series in {path} cannot be read ({str(e).strip().splitlines()[-1]})") from e
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise InputError(f"{path} is not an image this tool can read; use NIfTI, NRRD, MHA, a DICOM folder or "
                         f"PNG/JPEG") from e


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, Geometry]:
    """Read an image file or DICOM folder -> (float32 ``[K,J,I]``, Geometry)."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.exists():
        raise InputError(f"input {path} does not exist; check the path")
    image = _read_sitk(path)
    dim, ncomp = image.GetDimension(), image.GetNumberOfComponentsPerPixel()
    if dim == 4 or (dim == 3 and image.GetSize()[2] > 1 and path.name.lower().endswith(PICTURE_SUFFIXES)):
        raise InputError(f"{path} is a {dim}D image of size {image.GetSize()}; extract one 3D frame first "
                         f"(in Slicer: Sequences module; in Python: SimpleITK's Extract)")
    if dim not in (2, 3):
        raise InputError(f"{path} is a {dim}D image; expected a 2D image or a 3D volume")
    if ncomp > 1:
        if dim == 2 or path.name.lower().endswith(PICTURE_SUFFIXES):
            rgb = sitk.GetArrayFromImage(image).astype(np.float32)[..., :3]
            grey = rgb @ np.array([0.299, 0.587, 0.114], np.float32)[: rgb.shape[-1]] if rgb.shape[-1] == 3 \
                else rgb.mean(-1)
            geometry = Geometry.from_sitk(image)
            return check_volume(grey.reshape((1,) + grey.shape[-2:]), str(path)), geometry
        raise InputError(f"{path} is a colour/vector volume with {ncomp} components per voxel; convert it to a scalar "
                         f"volume first (in Slicer: 'Vector to Scalar Volume' module)")
    array = sitk.GetArrayFromImage(image)
    if dim == 2:
        array = array[None]
    return check_volume(array, str(path)), Geometry.from_sitk(image)


def output_kind(path: str | os.PathLike) -> str:
    """'segmentation' (.seg.nrrd) or 'labelmap' (.nii.gz, .nrrd, ...); raises on an unknown suffix."""
    name = Path(path).name.lower()
    if name.endswith(SEGMENTATION_SUFFIXES):
        return "segmentation"
    if name.endswith(LABELMAP_SUFFIXES):
        return "labelmap"
    raise InputError(f"output {path} has an unknown file type; use .seg.nrrd (segments) or .nii.gz/.nrrd (label map)")


def check_output_path(path: str | os.PathLike, kinds=("segmentation", "labelmap")) -> Path:
    """Fail early (before any work) if the output cannot be written."""
    path = Path(path)
    if output_kind(path) not in kinds:
        raise InputError(f"output {path} must be one of: {', '.join(kinds)}")
    if not path.parent.is_dir():
        raise InputError(f"output folder {path.parent} does not exist; create it first or choose another path")
    if path.is_dir():
        raise InputError(f"output {path} is a folder; give a file name such as {path / 'result.seg.nrrd'}")
    return path


@contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside ``path`` (same suffixes); rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    name = path.name
    suffix = "".join(s for s in path.suffixes if len(s) <= 5)
    tmp = path.with_name(f".{name[: len(name) - len(suffix)]}.partial-{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_segmentation(path: str | os.PathLike, masks: dict[str, np.ndarray], geometry: Geometry) -> Path:
    """Write masks (name -> bool ``[K,J,I]``) as ``.seg.nrrd`` (one segment per name, overlaps allowed) or as a
    label map (label n = n-th mask; where masks overlap the later one wins)."""
    import SimpleITK as sitk

    path = Path(path)
    kind = output_kind(path)
    shapes = {m.shape for m in masks.values()}
    if len(shapes) > 1:
        raise ValueError(f"masks have different shapes {shapes}")
    with atomic_path(path) as tmp:
        if kind == "segmentation":
            import slicerio

            shape = next(iter(shapes)) if shapes else (1, 1, 1)
            seg = slicerio.create_segmentation(shape[::-1], geometry.ijk_to_lps())
            for n, (name, mask) in enumerate(masks.items()):
                slicerio.add_segment(seg, np.asarray(mask, bool).transpose(2, 1, 0),
                                     {"id": f"Segment_{n + 1}", "name": name,
                                      "color": list(SEGMENT_COLORS[n % len(SEGMENT_COLORS)])})
            seg["masterRepresentation"] = "Binary labelmap"
            seg["containedRepresentationNames"] = ["Binary labelmap"]
            slicerio.write_segmentation(str(tmp), seg)
        else:
            labels = np.zeros(next(iter(shapes)), np.uint8)
            for n, mask in enumerate(masks.values()):
                labels[np.asarray(mask, bool)] = n + 1
            sitk.WriteImage(geometry.to_sitk(labels), str(tmp), useCompression=True)
    return path


def read_segment_masks(path: str | os.PathLike, names: list[str]) -> dict[str, np.ndarray]:
    """Segments of a ``.seg.nrrd`` by name -> bool ``[K,J,I]`` (slicerio reads I,J,K)."""
    import slicerio

    seg = slicerio.read_segmentation(str(path))
    return {name: slicerio.extract_segments(seg, [(name, 1)])["voxels"].transpose(2, 1, 0) > 0 for name in names}


def read_probabilities(path: str | os.PathLike, n_prompts: int) -> np.ndarray:
    """Inverse of ``write_probabilities``: -> ``[P,K,J,I]`` float32."""
    import SimpleITK as sitk

    probs = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float32)
    return probs[None] if n_prompts == 1 else np.moveaxis(probs, -1, 0)


def write_probabilities(path: str | os.PathLike, probabilities: np.ndarray, geometry: Geometry) -> Path:
    """Write ``[P,K,J,I]`` probabilities in [0,1] as a P-component float32 image (NRRD/NIfTI/MHA)."""
    import SimpleITK as sitk

    path = Path(path)
    probs = np.asarray(probabilities, np.float32)
    image = geometry.to_sitk(np.moveaxis(probs, 0, -1), is_vector=True) if probs.shape[0] > 1 \
        else geometry.to_sitk(probs[0])
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)
    return path


def write_volume(path: str | os.PathLike, array: np.ndarray, geometry: Geometry) -> Path:
    """Write a ``[K,J,I]`` scalar array with its geometry (any SimpleITK format, by suffix)."""
    import SimpleITK as sitk

    with atomic_path(Path(path)) as tmp:
        sitk.WriteImage(geometry.to_sitk(np.asarray(array)), str(tmp), useCompression=True)
    return Path(path)
