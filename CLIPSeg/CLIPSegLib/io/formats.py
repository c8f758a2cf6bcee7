"""File formats: which suffixes are read and written, and ITK's error text made readable."""

from __future__ import annotations

import re

SEGMENTATION_SUFFIXES = (".seg.nrrd",)
# Single-file formats only: a detached header (.nhdr, .mhd) would point at a data file named after the temporary
# file that atomic_path renames, so it is refused as an output (still read as an input).
LABELMAP_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def itk_reason(e: Exception) -> str:
    """The last line of an ITK exception: the reason, without the C++ source location and object address."""
    return re.sub(r"^(sitk::ERROR|ITK ERROR)?:?\s*(\w+\(0x[0-9a-f]+\):\s*)?", "", str(e).strip().splitlines()[-1].strip())
