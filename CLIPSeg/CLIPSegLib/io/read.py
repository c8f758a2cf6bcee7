"""Reading images: NIfTI, NRRD, MHA/MHD, a DICOM folder, PNG/JPEG/BMP/TIFF (colour screenshots become grey).

Every file is checked to be complete before its voxels are trusted (a truncated or damaged file is a
``CorruptFileError`` naming it, never zeros); a DICOM folder must hold one series with even slice spacing.
Returns the internal layout of ``io.geometry``: float32 ``[K,J,I]`` and a ``Geometry`` (LPS).
"""

from __future__ import annotations

import bz2
import gzip
import os
import re
import struct
import zlib
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..errors import CorruptFileError, InputError
from ..options import parse_spacing
from .formats import LABELMAP_SUFFIXES, PICTURE_SUFFIXES, itk_reason
from .geometry import Geometry, check_volume

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
        raise CorruptFileError(f"DICOM series in {path} cannot be read ({itk_reason(e)}); copy the files again "
                               f"from the source") from e
    _check_even_slices(path, reader, files[series[0]])
    return image


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
        raise _corrupt(path, f"its {fmt} header cannot be read ({itk_reason(e)})") from e
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
        raise _corrupt(path, itk_reason(e)) from e


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
