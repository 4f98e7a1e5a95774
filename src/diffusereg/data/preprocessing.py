"""The DiffuseReg paper's preprocessing (resample, intensity scaling, centre crop/pad) and its inverse.

Steps for a fixed/moving pair (``PaperPreprocessing.__call__``), as in the paper's code:

1. Resampled grid: the fixed image's origin and direction, the target ``spacing``, and
   ``round(size_i * spacing_i / target_spacing_i)`` voxels per axis.
2. Resample the fixed and the moving image onto that one grid with SimpleITK (cubic B-spline,
   float32, 0 outside the moving image; linear for an image with fewer than
   ``BSPLINE_MIN_SAMPLES`` voxels along an axis); labels with nearest neighbour.
3. Scale each image's intensities on the whole resampled grid:
   ``x -= x.min(); x /= x.std(); x -= x.min(); x /= x.max()`` (so ``[0, 1]``, float32).
4. Centre crop or zero-pad every array to ``size``: along an axis of length ``n`` the model
   grid starts at index ``trunc((n - size) / 2)`` of the resampled grid (negative = padding).

The model grid (`ModelGrid.model`) is the resampled grid shifted by that start index; the
`ModelGrid` maps arrays and fields on it back onto the original fixed image's grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import SimpleITK as sitk

from diffusereg.io import Grid, Image

__all__ = ["BSPLINE_MIN_SAMPLES", "ModelGrid", "PaperPreprocessing", "PreprocessedPair", "resample_to_grid",
           "scale_intensities"]

Interpolation = Literal["linear", "nearest", "bspline"]
_SITK_INTERPOLATORS = {
    "linear": sitk.sitkLinear,
    "nearest": sitk.sitkNearestNeighbor,
    "bspline": sitk.sitkBSpline,
}

BSPLINE_MIN_SAMPLES = 4
"""Fewest voxels along every axis of an image for cubic B-spline interpolation (its support is 4
samples wide). On an axis of fewer samples ITK's B-spline can return values that differ from call
to call (huge ones, or NaN; see ``docs/data.md``), so such images are interpolated linearly."""


def resample_to_grid(image: Image, grid: Grid, interpolation: Interpolation, default: float = 0.0,
                     transform: sitk.Transform | None = None) -> np.ndarray:
    """Resample ``image`` onto ``grid`` with SimpleITK: the value at each point ``x`` of ``grid``
    is ``image`` at ``transform(x)`` (physical space; identity when ``transform`` is None).

    Images are interpolated as float32 (``linear``/``bspline``); ``nearest`` keeps the voxel type.
    ``bspline`` becomes ``linear`` for an image with fewer than :data:`BSPLINE_MIN_SAMPLES` voxels
    along an axis. Points that land outside ``image`` get ``default``. Returns an array of shape ``grid.shape``.
    With the :func:`~diffusereg.io.displacement_transform` of a registration's field, this warps
    any image of the moving image's space onto the fixed grid.
    """
    source = image.to_sitk()
    if interpolation == "bspline" and min(image.array.shape) < BSPLINE_MIN_SAMPLES:
        interpolation = "linear"
    if interpolation != "nearest":
        source = sitk.Cast(source, sitk.sitkFloat32)
    resampled = sitk.Resample(
        source,
        list(reversed(grid.shape)),
        sitk.Transform() if transform is None else transform,
        _SITK_INTERPOLATORS[interpolation],
        grid.origin,
        grid.spacing,
        grid.direction,
        default,
        source.GetPixelID(),
    )
    return sitk.GetArrayFromImage(resampled)


def scale_intensities(array: np.ndarray) -> np.ndarray:
    """The paper's intensity scaling to ``[0, 1]``: ``x -= min; x /= std; x -= min; x /= max``.

    Returns float32. A constant array (zero std) gives all zeros.
    """
    x = array.astype(np.float64)
    x -= x.min()
    std = x.std()
    if std == 0.0:
        return np.zeros(array.shape, dtype=np.float32)
    x /= std
    x -= x.min()
    x /= x.max()
    return x.astype(np.float32)


def _crop_or_pad(array: np.ndarray, start: tuple[int, ...], size: tuple[int, ...]) -> np.ndarray:
    """``array[start : start + size]`` per axis, zero where that window leaves ``array``."""
    out = np.zeros(size, dtype=array.dtype)
    source, target = [], []
    for first, length, extent in zip(start, size, array.shape):
        low, high = max(first, 0), min(first + length, extent)
        source.append(slice(low, high))
        target.append(slice(low - first, high - first))
    out[tuple(target)] = array[tuple(source)]
    return out


@dataclass(frozen=True)
class ModelGrid:
    """The model grid of a preprocessed pair and the way back to the original fixed grid.

    Attributes:
        original: grid of the original fixed image (the output space).
        resampled: the fixed image's grid after resampling to the target spacing (same origin
            and direction, whole field of view), before crop/pad.
        start: index in ``resampled`` (array order) of the model grid's first voxel; negative
            along padded axes.
        model: the model grid: ``resampled`` cropped/padded to the model size, i.e. its origin
            shifted by ``start`` voxels.
    """

    original: Grid
    resampled: Grid
    start: tuple[int, ...]
    model: Grid

    @property
    def data_region(self) -> tuple[slice, ...]:
        """Per array axis, the model-grid voxels inside the resampled fixed image (elsewhere the
        model arrays are zero padding)."""
        return tuple(
            slice(max(0, -s), min(m, n - s)) for s, m, n in zip(self.start, self.model.shape, self.resampled.shape)
        )

    def model_grid_image(self, array: np.ndarray) -> Image:
        """An `Image` with voxel values ``array`` (shape ``model.shape``) on the model grid."""
        return Image.on_grid(np.asarray(array), self.model)

    def image_to_original(self, array: np.ndarray, interpolation: Literal["linear", "nearest"] = "linear") -> Image:
        """Resample an array on the model grid (shape ``model.shape``) onto the original fixed grid.

        ``linear`` gives float32, ``nearest`` (use it for labels) keeps the dtype. Original voxels
        outside the model grid are 0.
        """
        return Image.on_grid(
            resample_to_grid(self.model_grid_image(array), self.original, interpolation), self.original
        )

    def field_to_original(self, field: np.ndarray) -> np.ndarray:
        """Map a displacement field from model-grid voxels to original fixed-grid voxels.

        Both grids share the direction, so each channel converts on its own: model voxels -> mm
        (times the model axis spacing), linear resampling onto the original grid, mm -> original
        voxels (divided by the original axis spacing). Original voxels outside the model grid
        (e.g. cut away by the crop) get a zero displacement.

        Args:
            field: shape ``(ndim, *model.shape)``, channel ``i`` along array axis ``i``, model voxels.

        Returns:
            float64 array ``(ndim, *original.shape)`` in original fixed-grid voxels.
        """
        field = np.asarray(field)
        if field.shape != (self.model.ndim, *self.model.shape):
            expected = (self.model.ndim, *self.model.shape)
            raise ValueError(f"field shape {field.shape} is not (ndim, *model shape) = {expected}")
        channels = [
            resample_to_grid(self.model_grid_image(channel.astype(np.float32) * model_step), self.original, "linear")
            / original_step
            for channel, model_step, original_step in zip(field, self.model.axis_spacing, self.original.axis_spacing)
        ]
        return np.stack(channels).astype(np.float64)


@dataclass(frozen=True, eq=False)
class PreprocessedPair:
    """A fixed/moving pair on the model grid.

    Attributes:
        fixed, moving: float32 intensities in ``[0, 1]``, shape ``S = grid.model.shape``.
        fixed_labels, moving_labels: integer label maps of shape ``S`` (input dtype), or None.
        grid: the model grid and its mapping back to the original fixed grid.
    """

    fixed: np.ndarray
    moving: np.ndarray
    fixed_labels: np.ndarray | None
    moving_labels: np.ndarray | None
    grid: ModelGrid


@dataclass(frozen=True)
class PaperPreprocessing:
    """The DiffuseReg paper's preprocessing (see the module docstring for the exact steps).

    Attributes:
        spacing: target voxel size in mm, ITK ``(x, y, z)`` order; 2D inputs use the first two.
        size: model grid shape in array order ``(D, H, W)``; 2D inputs use the last two.
    """

    spacing: tuple[float, ...] = (1.5, 1.5, 3.15)
    size: tuple[int, ...] = (32, 128, 128)

    def __post_init__(self) -> None:
        if len(self.spacing) != len(self.size) or any(s <= 0 for s in self.spacing) or any(n <= 0 for n in self.size):
            raise ValueError(f"need positive spacing and size of one length, got {self.spacing} and {self.size}")

    def model_grid(self, fixed: Grid) -> ModelGrid:
        """The model grid for a fixed image with grid ``fixed`` (only its geometry is needed)."""
        ndim = fixed.ndim
        if ndim > len(self.size):
            raise ValueError(f"a {ndim}D image needs a {ndim}D preprocessing, this one is {len(self.size)}D")
        spacing, size = tuple(self.spacing[:ndim]), tuple(self.size[-ndim:])
        resampled_itk_size = [
            int(round(n * old / new)) for n, old, new in zip(reversed(fixed.shape), fixed.spacing, spacing)
        ]
        resampled = Grid(tuple(reversed(resampled_itk_size)), spacing, fixed.origin, fixed.direction)
        start = tuple(int((n - m) / 2) for n, m in zip(resampled.shape, size))  # trunc: crop or pad
        shift_mm = fixed.direction_matrix @ (np.asarray(spacing) * np.asarray(start[::-1], dtype=np.float64))
        model = Grid(size, spacing, tuple(np.asarray(fixed.origin) + shift_mm), fixed.direction)
        return ModelGrid(original=fixed, resampled=resampled, start=start, model=model)

    def to_model_grid(self, image: Image, grid: ModelGrid, kind: Literal["image", "labels"]) -> np.ndarray:
        """Resample ``image`` onto the resampled fixed grid, scale it (images only) and crop/pad it
        to the model grid. Images: B-spline (linear for thin images, see :func:`resample_to_grid`), float32 in
        ``[0, 1]``; labels: nearest, input dtype."""
        resampled = resample_to_grid(image, grid.resampled, "bspline" if kind == "image" else "nearest")
        if kind == "image":
            resampled = scale_intensities(resampled)
        return _crop_or_pad(resampled, grid.start, grid.model.shape)

    def __call__(
        self,
        fixed: Image,
        moving: Image,
        fixed_labels: Image | None = None,
        moving_labels: Image | None = None,
    ) -> PreprocessedPair:
        """Bring a pair (and optional label maps) onto one model grid defined by ``fixed``.

        The moving image and labels are resampled onto the fixed image's resampled grid, so
        they need not share the fixed image's geometry (outside the moving image: 0).
        """
        if moving.ndim != fixed.ndim:
            raise ValueError(f"fixed is {fixed.ndim}D but moving is {moving.ndim}D")
        grid = self.model_grid(fixed.grid)
        return PreprocessedPair(
            fixed=self.to_model_grid(fixed, grid, "image"),
            moving=self.to_model_grid(moving, grid, "image"),
            fixed_labels=None if fixed_labels is None else self.to_model_grid(fixed_labels, grid, "labels"),
            moving_labels=None if moving_labels is None else self.to_model_grid(moving_labels, grid, "labels"),
            grid=grid,
        )
