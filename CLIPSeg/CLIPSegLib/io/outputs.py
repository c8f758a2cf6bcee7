"""Writing results, and reading them back: ``.seg.nrrd`` through slicerio (one segment per prompt, names in UTF-8,
Slicer-readable), label maps (NIfTI, NRRD, MHA) with a label table beside them, probability maps and volumes through
SimpleITK. Every output path is checked before a run; every write goes to a temporary file in the target folder and
all of a run's files are renamed only when all are complete.
"""

from __future__ import annotations

import io
import os
import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import InputError
from .formats import LABELMAP_SUFFIXES, SEGMENTATION_SUFFIXES, itk_reason
from .geometry import Geometry

# Distinct segment colours (RGB in 0..1), in prompt order.
SEGMENT_COLORS = [(0.90, 0.30, 0.25), (0.25, 0.70, 0.95), (0.95, 0.85, 0.20), (0.45, 0.85, 0.40),
                  (0.75, 0.45, 0.90), (0.95, 0.55, 0.15), (0.30, 0.90, 0.80), (0.95, 0.45, 0.70)]


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

    from ..errors import ClipSegError

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
        raise OSError(None, itk_reason(e), str(path)) from e


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
    """Label value -> name from the table beside a label map (``label_names_path``) or from that table itself
    (``io.tables.read_table``: columns LabelValue,Name)."""
    from .tables import read_table

    path = Path(path)
    table = path if path.name.endswith(".csv") else label_names_path(path)
    names = {}
    for row in read_table(table, required=("LabelValue", "Name")):
        try:
            names[int(row["LabelValue"])] = row["Name"]
        except ValueError:
            raise InputError(f"{row.where}: LabelValue {row['LabelValue']!r} is not a whole number") from None
    return names


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
