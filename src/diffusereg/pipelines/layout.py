"""The model-grid batch: one registration's inputs as the denoiser takes them, and the way back.

A pipeline call takes images in several layouts; the denoiser takes batches ``(N, 1, *S)``. A
:class:`ModelGridBatch` is built once per call and knows how its items relate to the caller's
layout:

- ``"single"``: one pair of model-grid arrays ``(*S)`` (``S`` of the denoiser's dimensionality);
- ``"batch"``: a batch ``(B, 1, *S)``;
- ``"slices"``: one volume ``(D, H, W)`` registered slice by slice by a 2D model (``N = D``);
- ``"slices_batch"``: volumes ``(B, 1, D, H, W)`` so (``N = B * D``).

The *output layout* of a field is ``(ndim, *S)`` / ``(B, ndim, *S)``, and ``(3, D, H, W)`` /
``(B, 3, D, H, W)`` for volumes registered slice by slice (channel 0, across slices, is zero);
images keep the input's layout. With ``num_samples`` samples per pair the model batch holds
``N * num_samples`` items, item-major (the samples of item 0 first), and output-layout tensors
of the samples carry a leading sample axis.

Images with geometry (files, SimpleITK images, :class:`~diffusereg.io.Image`) are preprocessed to
the model grid (:class:`~diffusereg.data.PaperPreprocessing`); the batch keeps them, so that a
field on the model grid goes back to the fixed image's own grid
(:meth:`ModelGridBatch.field_on_fixed_grid`) and the original moving image and labels are warped
there (:meth:`ModelGridBatch.warp_on_fixed_grid`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from torch import Tensor

from diffusereg.data.preprocessing import ModelGrid, PaperPreprocessing, resample_to_grid
from diffusereg.io import Image, displacement_transform, read_image, validate_image
from diffusereg.validation import check_model_grid_arrays, check_pair, check_sources, source_name

__all__ = ["LAYOUTS", "ImagesOnFixedGrid", "ModelGridBatch", "as_image"]

LAYOUTS = ("single", "batch", "slices", "slices_batch")


def as_image(source: Any, role: str) -> Image | None:
    """A path, SimpleITK image or :class:`~diffusereg.io.Image` as a validated Image; None for
    None, arrays and tensors (which have no geometry)."""
    if source is None or isinstance(source, (np.ndarray, Tensor)):
        return None
    if isinstance(source, (str, os.PathLike)):
        return read_image(source)
    if isinstance(source, sitk.Image):
        return validate_image(Image.from_sitk(source), role)
    if isinstance(source, Image):
        return validate_image(source, role)
    raise TypeError(f"{role}: cannot register a {type(source).__name__}; give a path, SimpleITK image, "
                    "diffusereg.io.Image, numpy array or torch tensor")


@dataclass(frozen=True, eq=False)
class ImagesOnFixedGrid:
    """The original images of a call with geometry, and the model grid they were brought to.

    Attributes:
        fixed, moving, moving_labels: as given (each on its own grid; labels may be None).
        grid: the model grid and its way back to ``fixed``'s grid.
    """

    fixed: Image
    moving: Image
    moving_labels: Image | None
    grid: ModelGrid


@dataclass(frozen=True, eq=False)
class ModelGridBatch:
    """Inputs of one pipeline call on the model grid (see the module docstring).

    Attributes:
        fixed, moving: ``(N, 1, *S)`` float32, intensities in ``[0, 1]``.
        moving_labels: ``(N, 1, *S)`` int64, or None.
        layout: one of :data:`LAYOUTS`.
        num_volumes, depth: for the ``slices`` layouts, how the ``N = num_volumes * depth``
            slices stack back into volumes.
        labels_dtype: the dtype the moving labels were given in (warped labels come back in it).
        images: for inputs with geometry, the originals and their model grid; else None.
    """

    fixed: Tensor
    moving: Tensor
    moving_labels: Tensor | None
    layout: str
    num_volumes: int = 1
    depth: int = 1
    labels_dtype: torch.dtype | None = None
    images: ImagesOnFixedGrid | None = None

    # ------------------------------------------------------------------ building
    @classmethod
    def from_arrays(cls, fixed: Any, moving: Any, moving_labels: Any, spatial_dims: int, size_multiple: int,
                    images: ImagesOnFixedGrid | None = None) -> ModelGridBatch:
        """Arrays or tensors already on the model grid -> a batch (see the module docstring for the layouts).

        Raises:
            ValueError: naming the problem: other shapes, intensities outside ``[0, 1]``, sizes the
                model cannot take (with the way to the model grid).
        """
        tensors = [None if x is None else torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x)
                   for x in (fixed, moving, moving_labels)]
        fixed_t, moving_t, labels_t = tensors
        if tuple(fixed_t.shape) != tuple(moving_t.shape):
            raise ValueError(f"fixed and moving must have the same shape, got {tuple(fixed_t.shape)} and "
                             f"{tuple(moving_t.shape)}")
        if labels_t is not None and tuple(labels_t.shape) != tuple(moving_t.shape):
            raise ValueError(f"moving_labels shape {tuple(labels_t.shape)} differs from moving shape "
                             f"{tuple(moving_t.shape)}")
        check_model_grid_arrays({"fixed": fixed_t, "moving": moving_t})
        if fixed_t.ndim < spatial_dims or any(size % size_multiple for size in fixed_t.shape[-spatial_dims:]):
            raise ValueError(
                f"arrays of shape {tuple(fixed_t.shape)} are not on a model grid (each of the last {spatial_dims} "
                f"sizes a multiple of {size_multiple}): give file paths or diffusereg.io.Image objects (resampled, "
                "scaled and cropped for you), or bring images there with pipe.preprocessing(fixed_image, "
                "moving_image)")
        rank, d = fixed_t.ndim, spatial_dims
        if rank == d:
            layout, shape, volumes, depth = "single", (1, 1, *fixed_t.shape), 1, 1
        elif rank == d + 2 and fixed_t.shape[1] == 1:
            layout, shape, volumes, depth = "batch", tuple(fixed_t.shape), 1, 1
        elif d == 2 and rank in (3, 5) and (rank == 3 or fixed_t.shape[1] == 1):
            volumes, depth = (1, fixed_t.shape[0]) if rank == 3 else (fixed_t.shape[0], fixed_t.shape[2])
            layout, shape = ("slices" if rank == 3 else "slices_batch"), (volumes * depth, 1, *fixed_t.shape[-2:])
        else:
            raise ValueError(
                f"cannot read an input of shape {tuple(fixed_t.shape)} for a {d}D model: give {d}D arrays "
                f"({'H, W' if d == 2 else 'D, H, W'}) or batches (B, 1, *S)" + (" or volumes (D, H, W)" if d == 2 else ""))

        def items(x: Tensor | None, dtype: torch.dtype) -> Tensor | None:
            return None if x is None else x.reshape(shape).to(dtype)

        return cls(items(fixed_t, torch.float32), items(moving_t, torch.float32), items(labels_t, torch.int64),
                   layout, volumes, depth, None if labels_t is None else labels_t.dtype, images)

    @classmethod
    def from_images(cls, fixed: Image, moving: Image, moving_labels: Image | None, preprocessing: PaperPreprocessing,
                    spatial_dims: int, size_multiple: int) -> ModelGridBatch:
        """Checked images with geometry -> a batch on the model grid of ``preprocessing`` (no checks:
        see :meth:`from_inputs`)."""
        pair = preprocessing(fixed, moving, moving_labels=moving_labels)
        return cls.from_arrays(pair.fixed, pair.moving, pair.moving_labels, spatial_dims, size_multiple,
                               images=ImagesOnFixedGrid(fixed, moving, moving_labels, pair.grid))

    @classmethod
    def from_inputs(cls, fixed: Any, moving: Any, moving_labels: Any, preprocessing: PaperPreprocessing,
                    spatial_dims: int, size_multiple: int) -> ModelGridBatch:
        """A pipeline call's inputs -> a batch, running every check of them once: for files, the
        checks before reading (:func:`~diffusereg.validation.check_sources`), reading, and the
        pair's checks (:func:`~diffusereg.validation.check_pair`); for arrays, those of
        :meth:`from_arrays`.

        Raises:
            diffusereg.io.ImageError, ValueError, TypeError: naming the input and the problem.
        """
        sources = {"fixed": fixed, "moving": moving, "moving_labels": moving_labels}
        check_sources(sources)
        images = {role: as_image(source, role) for role, source in sources.items()}
        if images["fixed"] is None:
            if images["moving"] is not None:
                raise TypeError("moving must be given like fixed: an array or tensor")
            return cls.from_arrays(fixed, moving, moving_labels, spatial_dims, size_multiple)
        if images["moving"] is None:
            raise TypeError("moving must be given like fixed: a path, SimpleITK image or diffusereg.io.Image")
        check_pair(images["fixed"], images["moving"], spatial_dims, preprocessing,
                   moving_labels=images["moving_labels"],
                   names={role: source_name(source, role) for role, source in sources.items()})
        return cls.from_images(images["fixed"], images["moving"], images["moving_labels"], preprocessing,
                               spatial_dims, size_multiple)

    # ------------------------------------------------------------------ model layout
    @property
    def size(self) -> int:
        """``N``, the items of the model batch (one sample each)."""
        return self.fixed.shape[0]

    @property
    def spatial_dims(self) -> int:
        return self.fixed.ndim - 2

    def repeated(self, x: Tensor, num_samples: int) -> Tensor:
        """An ``(N, C, *S)`` tensor with each item repeated ``num_samples`` times (item-major)."""
        return x.repeat_interleave(num_samples, dim=0)

    def mean_std(self, x: Tensor, num_samples: int) -> tuple[Tensor, Tensor | None]:
        """Mean and std over the samples of an ``(N * num_samples, C, *S)`` tensor: ``(N, C, *S)``
        each; the std is None for one sample."""
        samples = x.reshape(self.size, num_samples, *x.shape[1:])
        return samples.mean(dim=1), (samples.std(dim=1) if num_samples > 1 else None)

    # ------------------------------------------------------------------ output layout
    def to_output(self, x: Tensor, is_field: bool) -> Tensor:
        """``(N, C, *S)`` on the model grid -> the output layout (see the module docstring)."""
        if self.layout.startswith("slices"):
            x = x.reshape(self.num_volumes, self.depth, *x.shape[1:]).transpose(1, 2)  # (V, C, D, H, W)
            if is_field:
                x = torch.cat([torch.zeros_like(x[:, :1]), x], dim=1)
        if self.layout in ("single", "slices"):
            x = x[0] if is_field else x[0, 0]
        return x

    def samples_to_output(self, x: Tensor, is_field: bool, num_samples: int) -> Tensor:
        """``(N * num_samples, C, *S)`` -> ``(num_samples, *output layout)``."""
        samples = x.reshape(self.size, num_samples, *x.shape[1:]).transpose(0, 1)
        return torch.stack([self.to_output(sample, is_field) for sample in samples])

    def from_output(self, x: Tensor, is_field: bool) -> Tensor:
        """The output layout -> ``(N, C, *S)`` (inverse of :meth:`to_output`; the across-slice
        channel of a slice-by-slice field is dropped)."""
        if self.layout in ("single", "slices"):
            x = x[None] if is_field else x[None, None]
        if self.layout.startswith("slices"):
            x = x[:, 1:] if is_field else x
            x = x.transpose(1, 2).reshape(self.size, x.shape[1], *x.shape[3:])
        return x

    def field_from_output(self, field: Any, name: str = "field") -> Tensor:
        """A field in the output layout -> ``(N, ndim, *S)`` float32, checked.

        Raises:
            ValueError: naming ``name`` and the expected shape, or non-finite values.
        """
        x = torch.as_tensor(np.asarray(field) if not torch.is_tensor(field) else field).float()
        expected = tuple(self.to_output(torch.zeros(self.size, self.spatial_dims, *self.fixed.shape[2:]), True).shape)
        if tuple(x.shape) != expected:
            raise ValueError(f"{name} must have the shape of the field this call returns, {expected}, "
                             f"got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} contains NaN or infinite values")
        return self.from_output(x, is_field=True)

    def samples_from_output(self, x: Tensor) -> Tensor:
        """``(num_samples, *field output layout)`` -> ``(N * num_samples, ndim, *S)`` (inverse of
        :meth:`samples_to_output` for fields)."""
        per_sample = torch.stack([self.from_output(sample, is_field=True) for sample in x])  # (s, N, ndim, *S)
        return per_sample.transpose(0, 1).reshape(-1, *per_sample.shape[2:])

    def mask_to_model(self, mask: Tensor, num_samples: int) -> Tensor:
        """A mask in the images' layout, or of one item ``(*S)`` / ``(1, *S)`` (the same for every
        item) -> ``(N * num_samples, 1, *S)`` float, in the model batch's order."""
        mask = torch.as_tensor(mask).float()
        spatial = tuple(self.fixed.shape[2:])
        image_shape = tuple(self.to_output(self.fixed, is_field=False).shape)
        if tuple(mask.shape) == image_shape:
            items = self.from_output(mask, is_field=False)
        elif tuple(mask.shape) in (spatial, (1, *spatial)):
            items = mask.reshape(1, 1, *spatial).expand(self.size, 1, *spatial)
        else:
            raise ValueError(f"a mask of shape {tuple(mask.shape)} fits neither the images {image_shape} "
                             f"nor one of their {self.size} items {spatial}")
        return self.repeated(items, num_samples)

    # ------------------------------------------------------------------ the fixed image's own grid
    def field_on_fixed_grid(self, field: Tensor) -> np.ndarray:
        """An output-layout field on the model grid (voxels) -> float32 ``(ndim, *S_fixed)`` in
        voxels of the original fixed image's grid (zero where the model grid does not reach)."""
        if self.images is None:
            raise ValueError("the inputs had no geometry: the field is on the model grid already")
        return self.images.grid.field_to_original(np.asarray(field)).astype(np.float32)

    def warp_on_fixed_grid(self, field: np.ndarray) -> tuple[sitk.DisplacementFieldTransform, np.ndarray,
                                                               np.ndarray | None]:
        """``(transform, warped, warped_labels)``: the field (voxels of the fixed grid) as an ITK
        transform, and the original moving image (linear) and labels (nearest neighbour, their
        dtype) resampled through it onto the fixed grid, each once."""
        if self.images is None:
            raise ValueError("the inputs had no geometry: warp on the model grid instead")
        grid = self.images.fixed.grid
        transform = displacement_transform(field, grid)
        warped = resample_to_grid(self.images.moving, grid, "linear", transform=transform)
        labels = self.images.moving_labels
        warped_labels = None if labels is None else resample_to_grid(labels, grid, "nearest", transform=transform)
        return transform, warped, warped_labels

