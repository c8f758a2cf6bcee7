"""All image I/O and geometry conversions, in one place.

Internal layout (used everywhere in CLIPSegLib): a numpy array indexed ``[K, J, I]`` (slice, row, column; the
order ``SimpleITK.GetArrayFromImage`` returns), plus a ``Geometry``: spacing in mm along I, J, K, origin in mm
and a 3x3 direction matrix whose columns are the I, J, K axes. Geometry is stored in LPS (DICOM/ITK convention);
Slicer's scene uses RAS, which differs by flipping x and y (``LPS_TO_RAS``). A 2D image is a volume with K = 1.

Axis names, the same in every module: ``slice_axis`` is a voxel axis, 0 = I, 1 = J, 2 = K (what ``--axis`` takes);
``array_axis`` is an axis of the ``[K, J, I]`` array, 0 = K, 1 = J, 2 = I (``array_axis_of``). Spacing is in mm
along (I, J, K) (``Geometry.spacing``) unless a name says ``spacing_kji`` (array order, as phantoms give it).

Reading: NIfTI, NRRD, MHA/MHD, a DICOM folder, PNG/JPEG/BMP/TIFF (colour screenshots become grey).
Writing: ``.seg.nrrd`` through slicerio (one segment per prompt, Slicer-readable), or a label map (NIfTI, NRRD,
MHA) through SimpleITK. Every write goes to a temporary file in the target folder and is renamed when complete.
"""

from __future__ import annotations

import bz2
import gzip
import io
import os
import re
import struct
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .errors import CorruptFileError, InputError
from .options import parse_spacing

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])  # also RAS -> LPS (its own inverse)
SEGMENTATION_SUFFIXES = (".seg.nrrd",)
# Single-file formats only: a detached header (.nhdr, .mhd) would point at a data file named after the temporary
# file that atomic_path renames, so it is refused as an output (still read as an input).
LABELMAP_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# Distinct segment colours (RGB in 0..1), in prompt order.
SEGMENT_COLORS = [(0.90, 0.30, 0.25), (0.25, 0.70, 0.95), (0.95, 0.85, 0.20), (0.45, 0.85, 0.40),
                  (0.75, 0.45, 0.90), (0.95, 0.55, 0.15), (0.30, 0.90, 0.80), (0.95, 0.45, 0.70)]


def array_axis_of(slice_axis: int) -> int:
    """Voxel axis (0 = I, 1 = J, 2 = K) -> the ``[K,J,I]`` array's axis along it (0 = K, 1 = J, 2 = I); its own
    inverse."""
    return 2 - slice_axis


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


_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
          (b"NRRD000", "NRRD"))


def _file_format(path: Path) -> str | None:
    """The format a file's first bytes announce (NIfTI, NRRD, MetaImage, PNG, JPEG, BMP, TIFF, DICOM), else None."""
    with open(path, "rb") as f:
        head = f.read(132)
    name = path.name.lower()
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    if head[128:132] == b"DICM":
        return "DICOM"
    if head.startswith(b"BM") and name.endswith(".bmp"):
        return "BMP"
    if head.startswith(b"\x1f\x8b") and name.endswith(".nii.gz"):
        return "NIfTI"
    if len(head) >= 4 and (struct.unpack("<i", head[:4])[0] in (348, 540)
                           or struct.unpack(">i", head[:4])[0] in (348, 540)):
        return "NIfTI"
    if re.match(rb"(ObjectType|NDims|Comment|ObjectSubType)\s*=", head) and name.endswith((".mha", ".mhd")):
        return "MetaImage"
    return None


def _corrupt(path: Path, reason: str) -> CorruptFileError:
    return CorruptFileError(f"{path} cannot be read in full: {reason}. The file is truncated or damaged (an "
                            f"interrupted copy or download?); copy it again from its source")


def _drain(stream, path: Path, what: str) -> int:
    """Bytes left in a (decompressing) stream; a stream that ends early or fails its checksum is corrupt."""
    total = 0
    try:
        while chunk := stream.read(1 << 20):
            total += len(chunk)
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError) as e:
        raise _corrupt(path, f"its {what} data is damaged or ends early ({e})") from e
    return total


def _drain_zlib(f, path: Path) -> int:
    """Decompressed size of the zlib stream from ``f``'s position to the end of the file (MetaImage data)."""
    d, total = zlib.decompressobj(), 0
    try:
        while not d.eof and (chunk := d.unconsumed_tail or f.read(1 << 20)):
            total += len(d.decompress(chunk, 1 << 24))  # bounded output: zeros compress 1000:1
    except zlib.error as e:
        raise _corrupt(path, f"its compressed data is damaged ({e})") from e
    if not d.eof:
        raise _corrupt(path, "its compressed data ends early")
    return total


def _voxel_bytes(reader) -> int:
    """Bytes of voxel data the header read by ``reader`` (after ReadImageInformation) announces."""
    import SimpleITK as sitk

    component = sitk.Image([1, 1], reader.GetPixelID()).GetSizeOfPixelComponent()
    return int(np.prod(reader.GetSize(), dtype=np.int64)) * reader.GetNumberOfComponents() * component


def _header_fields(f, separator: str, last_key: str | None = None) -> tuple[dict[str, str], bool]:
    """Read ``key<separator>value`` header lines from ``f`` up to a blank line (NRRD) or the ``last_key`` line
    (MetaImage), leaving ``f`` at the first data byte. Returns (fields with lower-case keys, whether the header
    ended before the end of the file)."""
    fields = {}
    for line in f:
        text = line.decode("latin-1").strip()
        if not text and last_key is None:
            return fields, True
        if text.startswith("#") or separator not in text:
            continue
        key, _, value = text.partition(separator)
        key = key.strip().lower()
        fields[key] = value.lstrip("=").strip()
        if key == last_key:
            return fields, True
    return fields, False


def _check_nifti(path: Path) -> None:
    """A NIfTI-1/2 file (``.nii`` or ``.nii.gz``) must hold vox_offset + nx*ny*...*bitpix/8 bytes."""
    compressed = path.name.lower().endswith(".gz")
    with (gzip.open(path, "rb") if compressed else open(path, "rb")) as f:
        try:
            head = f.read(544)
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise _corrupt(path, f"its compressed data is damaged or ends early ({e})") from e
        available = len(head) + _drain(f, path, "compressed") if compressed else path.stat().st_size
    if len(head) < 348:
        raise _corrupt(path, f"it ends inside its NIfTI header ({len(head)} of 348 bytes)")
    for endian in "<>":
        version = struct.unpack(endian + "i", head[:4])[0]
        if version == 348:
            dims = struct.unpack(endian + "8h", head[40:56])
            bitpix = struct.unpack(endian + "h", head[72:74])[0]
            offset = max(int(struct.unpack(endian + "f", head[108:112])[0]), 352)
            break
        if version == 540 and len(head) >= 544:
            bitpix = struct.unpack(endian + "h", head[14:16])[0]
            dims = struct.unpack(endian + "8q", head[16:80])
            offset = max(struct.unpack(endian + "q", head[168:176])[0], 544)
            break
    else:
        return  # not a NIfTI header: the reader says what it is
    if not 1 <= dims[0] <= 7 or min(dims[1:dims[0] + 1]) < 1 or bitpix < 1:
        return
    needed = offset + (int(np.prod(dims[1:dims[0] + 1], dtype=np.int64)) * bitpix + 7) // 8
    if available < needed:
        raise _corrupt(path, f"it holds {available} bytes of header and voxels, its header announces {needed}")


def _check_nrrd(path: Path, reader) -> None:
    """An attached-data NRRD must hold all its voxels: raw by size, gzip/bzip2 by decompressing to the end."""
    with open(path, "rb") as f:
        fields, ended = _header_fields(f, ":")
        if "data file" in fields or "datafile" in fields:
            return  # detached data (.nhdr): the reader checks the data file
        if not ended:
            raise _corrupt(path, "it ends inside its NRRD header")
        if fields.get("line skip", "0") != "0" or fields.get("byte skip", "0") != "0":
            return
        encoding = fields.get("encoding", "raw").lower()
        if encoding == "raw":
            available = path.stat().st_size - f.tell()
        elif encoding in ("gzip", "gz"):
            available = _drain(gzip.GzipFile(fileobj=f), path, "gzip")
        elif encoding in ("bzip2", "bz2"):
            available = _drain(bz2.BZ2File(f), path, "bzip2")
        else:
            return  # text encodings: the reader counts the values
    needed = _voxel_bytes(reader)
    if available < needed:
        raise _corrupt(path, f"it holds {available} bytes of voxel data, its header announces {needed}")


def _check_metaimage(path: Path, reader) -> None:
    """A MetaImage with ``ElementDataFile = LOCAL`` must hold all its voxels (zlib data: a complete stream)."""
    with open(path, "rb") as f:
        fields, ended = _header_fields(f, "=", last_key="elementdatafile")
        if not ended:
            raise _corrupt(path, "it ends inside its MetaImage header")
        if fields["elementdatafile"].upper() != "LOCAL" or fields.get("headersize", "0") != "0":
            return  # detached data (.mhd + .raw): the reader checks the data file
        if fields.get("compresseddata", "").lower() == "true":
            available = _drain_zlib(f, path)
        else:
            available = path.stat().st_size - f.tell()
    needed = _voxel_bytes(reader)
    if available < needed:
        raise _corrupt(path, f"it holds {available} bytes of voxel data, its header announces {needed}")


def _check_picture(path: Path, fmt: str) -> None:
    """Decode a PNG/JPEG/BMP in full with Pillow, which (unlike ITK's JPEG and BMP readers) refuses a cut file."""
    import warnings

    from PIL import Image

    if fmt == "BMP":
        with open(path, "rb") as f:
            head = f.read(34)
        if len(head) >= 34 and struct.unpack("<I", head[14:18])[0] >= 40:  # BITMAPINFOHEADER or later
            offset, width, height = struct.unpack("<I4xii", head[10:26])
            bits, compression = struct.unpack("<HI", head[28:34])
            needed = offset + (abs(width) * bits + 31) // 32 * 4 * abs(height)
            if compression in (0, 3) and path.stat().st_size < needed:
                raise _corrupt(path, f"it holds {path.stat().st_size} bytes, its header announces {needed}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with Image.open(path) as picture:
                picture.load()
        except Image.DecompressionBombError:
            return  # too large for Pillow's default limit; ITK reads it
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise _corrupt(path, str(e)) from e


def _check_dicom_folder(path: Path, series_files: set[Path]) -> None:
    """Every DICOM file of the folder must belong to a series: GDCM leaves out a file it cannot read (truncated, or
    no pixel data), so a series read without it would silently miss a slice."""
    left_out = []
    for f in sorted(path.iterdir()):
        if f.is_file() and f.name.upper() != "DICOMDIR" and f.resolve() not in series_files:
            with open(f, "rb") as fh:
                if fh.read(132)[128:132] == b"DICM":
                    left_out.append(f.name)
    if left_out:
        shown = ", ".join(left_out[:5]) + (f" and {len(left_out) - 5} more" if len(left_out) > 5 else "")
        raise CorruptFileError(f"DICOM folder {path}: {len(left_out)} DICOM file(s) cannot be read as images ({shown}): "
                               f"truncated or damaged (copy them again from the source), or not images (a report or "
                               f"structure set: move them out of the folder)")


def _describe_series(uid: str, files: list[str]) -> str:
    """``'T2 axial' 256x256x40 (rows x columns x slices), 40 files, UID 1.2.3`` from the series' first file."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(files[0])
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return f"{len(files)} file(s), UID {uid}"
    size = reader.GetSize()
    slices = size[2] if len(size) > 2 and size[2] > 1 else len(files)
    description = reader.GetMetaData("0008|103e").strip() if reader.HasMetaDataKey("0008|103e") else ""
    return (f"{description or '(no description)'!r} {size[1]}x{size[0]}x{slices} (rows x columns x slices), "
            f"{len(files)} file(s), UID {uid}")


def _check_even_slices(path: Path, reader, files: list[str]) -> None:
    """Refuse a series whose slice positions (ImagePositionPatient along the slice normal) are unevenly spaced:
    a voxel grid has one spacing, so a missing or repeated slice would misplace every slice after it."""
    n = len(files)
    if n < 3 or not all(reader.HasMetaDataKey(i, "0020|0032") for i in range(n)) \
            or not reader.HasMetaDataKey(0, "0020|0037"):
        return
    try:
        orientation = np.array([float(v) for v in reader.GetMetaData(0, "0020|0037").split("\\")])
        positions = np.array([[float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")] for i in range(n)])
    except ValueError:
        return
    if orientation.shape != (6,) or positions.shape != (n, 3):
        return
    steps = np.diff(positions @ np.cross(orientation[:3], orientation[3:]))
    typical = float(np.median(np.abs(steps)))
    worst = int(np.argmax(np.abs(np.abs(steps) - typical)))
    if abs(abs(steps[worst]) - typical) > 0.01 * typical + 0.01:
        raise InputError(
            f"DICOM series in {path} has uneven slice spacing: {np.abs(steps).min():.4g} to {np.abs(steps).max():.4g} "
            f"mm between neighbouring slices ({abs(steps[worst]):.4g} mm between {Path(files[worst]).name} and "
            f"{Path(files[worst + 1]).name}, {typical:.4g} mm elsewhere: a missing or repeated slice?). A volume has "
            f"one slice spacing, so segmenting it would misplace slices; resample it to even spacing first (e.g. "
            f"load it in 3D Slicer, which regularises the geometry, and save it as NRRD) and give that file")


def _read_dicom_folder(path: Path):
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(path))
    if not series:
        images = sorted(f.name for f in path.iterdir()
                        if f.is_file() and f.name.lower().endswith(LABELMAP_SUFFIXES + PICTURE_SUFFIXES + (".mhd",)))
        hint = f" but image files ({', '.join(images[:3])}{', ...' if len(images) > 3 else ''}): give one of them" \
            if images else ""
        raise InputError(f"folder {path} holds no DICOM series{hint}; the input is one image file (NIfTI, NRRD, MHA, "
                         f"PNG/JPEG) or a folder holding one DICOM series")
    files = {uid: reader.GetGDCMSeriesFileNames(str(path), uid) for uid in series}
    _check_dicom_folder(path, {Path(f).resolve() for names in files.values() for f in names})
    if len(series) > 1:
        listing = "; ".join(f"{n + 1}: {_describe_series(uid, files[uid])}" for n, uid in enumerate(series))
        raise InputError(f"folder {path} holds {len(series)} DICOM series ({listing}); move the series to segment "
                         f"into a folder of its own and give that folder")
    reader.SetFileNames(files[series[0]])
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as e:
        raise CorruptFileError(f"DICOM series in {path} cannot be read ({_itk_reason(e)}); copy the files again "
                               f"from the source") from e
    _check_even_slices(path, reader, files[series[0]])
    return image


def _itk_reason(e: Exception) -> str:
    """The last line of an ITK exception: the reason, without the C++ source location and object address."""
    return re.sub(r"^(sitk::ERROR|ITK ERROR)?:?\s*(\w+\(0x[0-9a-f]+\):\s*)?", "", str(e).strip().splitlines()[-1].strip())


@contextmanager
def quiet_itk():
    """ITK's warnings off (they go to stderr as raw C++ messages; the checks here turn what matters into errors)."""
    import SimpleITK as sitk

    before = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(before)


def _read_sitk(path: Path):
    """Read a file or DICOM folder with SimpleITK after checking that the file holds all the data its header
    announces (ITK reads a cut NIfTI, JPEG or BMP without complaint, zeros in place of the missing voxels)."""
    with quiet_itk():
        return _read_checked(path)


def _read_checked(path: Path):
    import SimpleITK as sitk

    if path.is_dir():
        return _read_dicom_folder(path)
    fmt = _file_format(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        if fmt is None:
            raise InputError(f"{path} is not an image this tool can read; use NIfTI, NRRD, MHA, a DICOM folder or "
                             f"PNG/JPEG") from e
        raise _corrupt(path, f"its {fmt} header cannot be read ({_itk_reason(e)})") from e
    if fmt == "NIfTI":
        _check_nifti(path)
    elif fmt == "NRRD":
        _check_nrrd(path, reader)
    elif fmt == "MetaImage":
        _check_metaimage(path, reader)
    elif fmt in ("PNG", "JPEG", "BMP"):
        _check_picture(path, fmt)
    try:
        return reader.Execute()
    except RuntimeError as e:
        raise _corrupt(path, _itk_reason(e)) from e


def is_picture(path: str | os.PathLike) -> bool:
    """A 2D picture format (PNG, JPEG, BMP, TIFF): pixels without a physical size (a DPI is a printing hint)."""
    return Path(path).name.lower().endswith(PICTURE_SUFFIXES)


def read_image(path: str | os.PathLike, spacing=None) -> tuple[np.ndarray, Geometry]:
    """Read an image file or DICOM folder -> (float32 ``[K,J,I]``, Geometry).

    A picture (``is_picture``) gets 1.0 mm pixels whatever DPI it carries (ITK reads a 300-dpi JPEG as 0.085 mm
    pixels, a PNG as 1.0 mm). ``spacing`` (``parse_spacing``: one value for I and J, or I, J, K in mm) replaces
    the spacing of the file, for a picture's real pixel size or a volume with a wrong header."""
    path = Path(path)
    spacing = parse_spacing(spacing)
    if not path.exists():
        raise InputError(f"input {path} does not exist; check the path")
    array, geometry = _read_array(path)
    if is_picture(path):
        geometry = replace(geometry, spacing=(1.0, 1.0, 1.0))
    if spacing is not None:
        geometry = replace(geometry, spacing=spacing if len(spacing) == 3 else (spacing[0], spacing[0],
                                                                                  geometry.spacing[2]))
    return array, geometry


def _read_array(path: Path) -> tuple[np.ndarray, Geometry]:
    import SimpleITK as sitk

    image = _read_sitk(path)
    dim, ncomp = image.GetDimension(), image.GetNumberOfComponentsPerPixel()
    if dim == 4 or (dim == 3 and image.GetSize()[2] > 1 and is_picture(path)):
        raise InputError(f"{path} is a {dim}D image of size {image.GetSize()}; extract one 3D frame first "
                         f"(in Slicer: Sequences module; in Python: SimpleITK's Extract)")
    if dim not in (2, 3):
        raise InputError(f"{path} is a {dim}D image; expected a 2D image or a 3D volume")
    if ncomp > 1:
        if dim == 2 or is_picture(path):
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


def label_names_path(path: str | os.PathLike) -> Path:
    """The label table written beside a label map: ``scan.nii.gz`` -> ``scan.labels.csv`` (a Slicer colour table:
    LabelValue, Name, Color_R, Color_G, Color_B, Color_A; UTF-8)."""
    path = Path(path)
    name = path.name
    suffix = next(s for s in LABELMAP_SUFFIXES if name.lower().endswith(s))
    return path.with_name(name[: len(name) - len(suffix)] + ".labels.csv")


def probabilities_path(path: str | os.PathLike) -> Path:
    """Where the probabilities go beside an output when no file is named for them: ``scan.seg.nrrd`` ->
    ``scan.probabilities.nrrd``, ``scan.nii.gz`` -> ``scan.probabilities.nii.gz``."""
    path = Path(path)
    name = path.name
    if output_kind(path) == "segmentation":
        return path.with_name(name[: len(name) - len(".seg.nrrd")] + ".probabilities.nrrd")
    suffix = next(s for s in LABELMAP_SUFFIXES if name.lower().endswith(s))
    return path.with_name(name[: len(name) - len(suffix)] + ".probabilities" + name[len(name) - len(suffix):])


def output_files(path: str | os.PathLike) -> list[Path]:
    """Every file ``write_segmentation`` writes for ``path``: the ``.seg.nrrd``, or the label map and its table."""
    path = Path(path)
    return [path] if output_kind(path) == "segmentation" else [path, label_names_path(path)]


def check_writable_folder(folder: Path, what: str = "output") -> None:
    """Raise (exit code 1) unless a file can be created in ``folder``: tried with a temporary file, which also
    catches read-only disks, ACLs and root-squashed network shares that ``os.access`` misjudges."""
    import tempfile

    from .errors import ClipSegError

    try:
        fd, probe = tempfile.mkstemp(prefix=".clipseg-write-test-", dir=folder)
    except OSError as e:
        raise ClipSegError(f"cannot write the {what} in folder {folder} ({e.strerror or e}); choose a folder you "
                           f"can write to, or fix its permissions") from e
    os.close(fd)
    os.unlink(probe)


def check_output_path(path: str | os.PathLike, kinds=("segmentation", "labelmap"), what: str = "output") -> Path:
    """Fail early (before any work) if the output (and, for a label map, its label table) cannot be written there:
    a known file type, not a folder, in an existing folder this process can write in."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} {path} is a folder; give a file name such as {path / 'result.seg.nrrd'}")
    if output_kind(path) not in kinds:
        raise InputError(f"{what} {path} must be one of: {', '.join(kinds)}")
    if not path.parent.is_dir():
        what_folder = "a file, not a folder" if path.parent.exists() else "does not exist"
        raise InputError(f"{what} folder {path.parent} {what_folder}; create it first or choose another path")
    for file in output_files(path)[1:]:
        if file.is_dir():
            raise InputError(f"{what} {path} needs {file.name} beside it for its label names, and that is a folder; "
                             f"rename the folder or choose another output name")
    check_writable_folder(path.parent, what)
    return path


def _temporary_name(path: Path) -> Path:
    """``out.seg.nrrd`` -> ``.out.partial-<pid>.seg.nrrd`` beside it (same suffixes: writers choose by suffix)."""
    name = path.name
    suffix = "".join(s for s in path.suffixes if len(s) <= 5 and " " not in s)
    suffix = suffix if name.endswith(suffix) else ""
    return path.with_name(f".{name[: len(name) - len(suffix)]}.partial-{os.getpid()}{suffix}")


@contextmanager
def atomic_paths(paths):
    """Yield ``{final path: temporary path}`` (beside each final path); rename every temporary file over its final
    path only once the block has succeeded, so an error leaves all final paths as they were. An ``OSError`` names
    the final path, not the temporary one."""
    temporary = {Path(p): _temporary_name(Path(p)) for p in paths}
    by_tmp = {str(t): str(p) for p, t in temporary.items()}
    try:
        yield temporary
        for final, tmp in temporary.items():
            os.replace(tmp, final)
    except OSError as e:
        if e.filename in by_tmp:
            reason = str(e.strerror or "")
            for tmp, final in by_tmp.items():
                reason = reason.replace(tmp, final)
            raise OSError(e.errno, reason, by_tmp[e.filename]) from e
        raise
    finally:
        for tmp in temporary.values():
            if tmp.exists():
                tmp.unlink()


@contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside ``path`` (same suffixes); rename it over ``path`` only if the block succeeds."""
    with atomic_paths([path]) as temporary:
        yield temporary[Path(path)]


def _write_sitk(image, path: Path) -> None:
    """``sitk.WriteImage`` (compressed); ITK's refusal (disk full, permissions) becomes an ``OSError`` on ``path``."""
    import SimpleITK as sitk

    try:
        sitk.WriteImage(image, str(path), useCompression=True)
    except RuntimeError as e:
        raise OSError(None, _itk_reason(e), str(path)) from e


_NAME_PLACEHOLDER = re.compile(rb"^(Segment\d+_Name:=)CLIPSeg-name-(\d+)$", re.M)


class _Utf8Names(io.RawIOBase):
    """A binary file wrapper for pynrrd's writer, which encodes the header as ASCII: segment names go in as
    placeholders and come out as UTF-8, as Slicer writes them (``vtkMRMLSegmentationStorageNode``)."""

    def __init__(self, file, names: list[str]):
        self._file, self._names, self._head, self._done = file, names, b"", False

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if self._done:
            return self._file.write(data)
        self._head += bytes(data)
        end = self._head.find(b"\n\n")
        if end >= 0:
            head = _NAME_PLACEHOLDER.sub(lambda m: m[1] + self._names[int(m[2])].encode("utf-8"), self._head[:end])
            self._file.write(head + self._head[end:])
            self._done = True
        return len(data)

    def close(self) -> None:
        if not self._done and not self.closed:  # a header without data: write it as it is
            self._file.write(self._head)
            self._done = True
        super().close()


def _write_seg_nrrd(path: Path, masks: dict[str, np.ndarray], shape, geometry: Geometry) -> None:
    import slicerio

    seg = slicerio.create_segmentation(shape[::-1], geometry.ijk_to_lps())
    for n, mask in enumerate(masks.values()):
        slicerio.add_segment(seg, np.asarray(mask, bool).transpose(2, 1, 0),
                             {"id": f"Segment_{n + 1}", "name": f"CLIPSeg-name-{n}",
                              "color": list(SEGMENT_COLORS[n % len(SEGMENT_COLORS)])})
    seg["masterRepresentation"] = "Binary labelmap"
    seg["containedRepresentationNames"] = ["Binary labelmap"]
    with open(path, "wb") as f, _Utf8Names(f, list(masks)) as out:
        slicerio.write_segmentation(out, seg)


def _write_label_table(path: Path, names: list[str]) -> None:
    import csv

    with open(path, "w", encoding="utf-8", newline="") as f:
        table = csv.writer(f)
        table.writerow(["LabelValue", "Name", "Color_R", "Color_G", "Color_B", "Color_A"])
        for n, name in enumerate(names):
            table.writerow([n + 1, name] + [round(c * 255) for c in SEGMENT_COLORS[n % len(SEGMENT_COLORS)]] + [255])


def read_label_names(path: str | os.PathLike) -> dict[int, str]:
    """Label value -> name from the table beside a label map (``label_names_path``) or from that table itself."""
    import csv

    path = Path(path)
    table = path if path.name.endswith(".csv") else label_names_path(path)
    with open(table, encoding="utf-8", newline="") as f:
        return {int(row["LabelValue"]): row["Name"] for row in csv.DictReader(f)}


def write_segmentation(path: str | os.PathLike, masks: dict[str, np.ndarray], geometry: Geometry,
                       temporary: dict[Path, Path] | None = None) -> Path:
    """Write masks (name -> bool ``[K,J,I]``) as ``.seg.nrrd`` (one segment per name, overlaps allowed) or as a
    label map (label n = n-th mask; where masks overlap the later one wins) with its names in ``label_names_path``.

    Names may hold any Unicode: the ``.seg.nrrd`` header carries them as UTF-8 (as Slicer writes and reads them;
    read them back with ``read_segmentation``), the label table is UTF-8 CSV. Files are written under temporary
    names and renamed when all are complete; ``temporary`` ({final: temporary path}, from an enclosing
    ``atomic_paths`` over ``output_files(path)``) writes there and leaves the renaming to the caller."""
    path = Path(path)
    if temporary is None:
        with atomic_paths(output_files(path)) as temporary:
            return write_segmentation(path, masks, geometry, temporary)
    shapes = {m.shape for m in masks.values()}
    if len(shapes) > 1:
        raise ValueError(f"masks have different shapes {shapes}")
    shape = next(iter(shapes)) if shapes else (1, 1, 1)
    if output_kind(path) == "segmentation":
        _write_seg_nrrd(temporary[path], masks, shape, geometry)
    else:
        labels = np.zeros(shape, np.uint8 if len(masks) < 256 else np.uint16)
        for n, mask in enumerate(masks.values()):
            labels[np.asarray(mask, bool)] = n + 1
        _write_sitk(geometry.to_sitk(labels), temporary[path])
        _write_label_table(temporary[label_names_path(path)], list(masks))
    return path


def read_segmentation(path: str | os.PathLike) -> dict:
    """``slicerio.read_segmentation`` with the segment names decoded as UTF-8, as Slicer writes them (slicerio's
    NRRD reader, pynrrd, decodes the header as ASCII and drops every other character)."""
    import slicerio

    seg = slicerio.read_segmentation(str(path))
    indices, names = set(), {}
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                break
            m = re.match(rb"Segment(\d+)_(\w+):=(.*?)\r?\n?$", line)
            if m:
                indices.add(int(m[1]))
                if m[2] == b"Name":
                    names[int(m[1])] = m[3].decode("utf-8", "replace").strip()
    for segment, index in zip(seg.get("segments", []), sorted(indices)):  # slicerio lists segments by index
        if index in names:
            segment["name"] = names[index]
    return seg


def read_segment_masks(path: str | os.PathLike, names: list[str]) -> dict[str, np.ndarray]:
    """Segments of a ``.seg.nrrd`` by name -> bool ``[K,J,I]`` (slicerio reads I,J,K)."""
    import slicerio

    seg = read_segmentation(path)
    return {name: slicerio.extract_segments(seg, [(name, 1)])["voxels"].transpose(2, 1, 0) > 0 for name in names}


def read_probabilities(path: str | os.PathLike, n_prompts: int) -> np.ndarray:
    """Inverse of ``write_probabilities``: -> ``[P,K,J,I]`` float32."""
    import SimpleITK as sitk

    probs = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float32)
    return probs[None] if n_prompts == 1 else np.moveaxis(probs, -1, 0)


def write_probabilities(path: str | os.PathLike, probabilities: np.ndarray, geometry: Geometry,
                        temporary: dict[Path, Path] | None = None) -> Path:
    """Write ``[P,K,J,I]`` probabilities in [0,1] as a P-component float32 image (NRRD/NIfTI/MHA), atomically
    (``temporary``: as in ``write_segmentation``)."""
    path = Path(path)
    if temporary is None:
        with atomic_paths([path]) as temporary:
            return write_probabilities(path, probabilities, geometry, temporary)
    probs = np.asarray(probabilities, np.float32)
    image = geometry.to_sitk(np.moveaxis(probs, 0, -1), is_vector=True) if probs.shape[0] > 1 \
        else geometry.to_sitk(probs[0])
    _write_sitk(image, temporary[path])
    return path


def write_volume(path: str | os.PathLike, array: np.ndarray, geometry: Geometry) -> Path:
    """Write a ``[K,J,I]`` scalar array with its geometry (any SimpleITK format, by suffix), atomically."""
    with atomic_path(Path(path)) as tmp:
        _write_sitk(geometry.to_sitk(np.asarray(array)), tmp)
    return Path(path)
