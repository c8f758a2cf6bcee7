"""Intensity normalisation and slice resizing shared by training and inference (one definition, no drift).

Normalisation is per image (a 2D image or a whole volume): the 1st..99.5th intensity percentiles map to [0, 1],
clipped (MONAI ``ScaleIntensityRangePercentiles``). Resizing is bilinear with antialiasing, in voxel units.
An engine's ``Preprocessing`` (``engines.contract``) names its normalisation (``INTENSITIES``) and how a slice of
any H x W becomes its S x S input (``FITS``): ``fit_slices`` there, ``unfit_slices`` back.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

LOWER_PERCENTILE = 1.0
UPPER_PERCENTILE = 99.5


def normalize_intensity(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Any-shape array -> float32 tensor in [0, 1], percentiles computed over the whole input."""
    from monai.transforms import ScaleIntensityRangePercentiles

    t = torch.as_tensor(np.asarray(image, dtype=np.float32) if isinstance(image, np.ndarray) else image.float())
    scale = ScaleIntensityRangePercentiles(lower=LOWER_PERCENTILE, upper=UPPER_PERCENTILE, b_min=0.0, b_max=1.0,
                                           clip=True)
    # a plain tensor, not MONAI's MetaTensor: its per-op dispatch cost ~40% of a volume's network time downstream
    return torch.as_tensor(scale(t), dtype=torch.float32).as_subclass(torch.Tensor)


def resize_slices(slices: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """``[B,C,H,W]`` float -> ``[B,C,size,size]`` (or ``size=(h, w)``), bilinear, antialiased when shrinking."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(slices.shape[-2:]) == size:
        return slices
    shrink = size[0] < slices.shape[-2] or size[1] < slices.shape[-1]
    return F.interpolate(slices, size=size, mode="bilinear", align_corners=False, antialias=shrink)


INTENSITIES = {"percentile": normalize_intensity}  # name in a Preprocessing -> per-image normalisation
# How a H x W slice becomes S x S: "pad" centres it on an m x m black square (m = max(H, W)) then resizes, keeping its
# aspect ratio; "squash" resizes H and W independently (what models trained on resized slices saw).
FITS = ("pad", "squash")


def _pad_box(shape: tuple[int, int]) -> tuple[int, int, int]:
    """(m, top, left): the square side and the slice's offset in it, for ``fit="pad"``."""
    h, w = shape
    m = max(h, w)
    return m, (m - h) // 2, (m - w) // 2


def fit_slices(slices: torch.Tensor, size: int, fit: str) -> torch.Tensor:
    """``[B,C,H,W]`` -> ``[B,C,size,size]`` by ``fit`` (``FITS``); padding is 0 (black after normalisation)."""
    if fit == "pad":
        h, w = slices.shape[-2:]
        m, top, left = _pad_box((h, w))
        slices = F.pad(slices, (left, m - w - left, top, m - h - top), value=0.0)
    return resize_slices(slices, size)


def slice_channels(context: int) -> int:
    """Input channels of one slice read with ``context`` neighbours on each side: the slice in the middle."""
    return 1 + 2 * context


def with_neighbours(idx: torch.Tensor, n: int, context: int) -> torch.Tensor:
    """Slice indices ``[B]`` (of ``n``) -> ``[B, 1 + 2 x context]``: each slice between its ``context`` neighbours on
    either side, the nearest slice repeated past the volume's ends (``engines.contract.Preprocessing.context``)."""
    offsets = torch.arange(slice_channels(context)) - context
    return (idx[:, None] + offsets).clamp_(0, n - 1)


def neighbours_of(k: int, n: int, context: int) -> torch.Tensor:
    """Indices ``[1 + 2 x context]`` of slice ``k`` of ``n`` between its neighbours (``with_neighbours``)."""
    return with_neighbours(torch.tensor([k]), n, context)[0]


def unfit_slices(maps: torch.Tensor, shape: tuple[int, int], fit: str) -> torch.Tensor:
    """The inverse of ``fit_slices``: ``[B,C,S,S]`` -> ``[B,C,H,W]`` for a slice of ``shape`` (H, W) voxels."""
    if fit != "pad":
        return resize_slices(maps, shape)
    m, top, left = _pad_box(shape)
    return resize_slices(maps, m)[..., top:top + shape[0], left:left + shape[1]]
