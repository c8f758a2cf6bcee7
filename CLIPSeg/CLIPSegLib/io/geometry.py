"""Voxel grids in physical space: the one internal layout and its geometry.

Internal layout (used everywhere in CLIPSegLib): a numpy array indexed ``[K, J, I]`` (slice, row, column; the
order ``SimpleITK.GetArrayFromImage`` returns), plus a ``Geometry``: spacing in mm along I, J, K, origin in mm
and a 3x3 direction matrix whose columns are the I, J, K axes. Geometry is stored in LPS (DICOM/ITK convention);
Slicer's scene uses RAS, which differs by flipping x and y (``LPS_TO_RAS``). A 2D image is a volume with K = 1.

Axis names, the same in every module: ``slice_axis`` is a voxel axis, 0 = I, 1 = J, 2 = K (what ``--axis`` takes);
``array_axis`` is an axis of the ``[K, J, I]`` array, 0 = K, 1 = J, 2 = I (``array_axis_of``). Spacing is in mm
along (I, J, K) (``Geometry.spacing``) unless a name says ``spacing_kji`` (array order, as phantoms give it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])  # also RAS -> LPS (its own inverse)


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
