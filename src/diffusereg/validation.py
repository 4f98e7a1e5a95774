"""Every check of what a user gives diffusereg to register, in one place.

A check raises an error whose one-line message starts with the file it is about (or, for an
in-memory image, its role: ``fixed``, ``moving``, ``fixed_labels``, ``moving_labels``) and says
the problem. The checks, in the order a registration runs them:

1. :func:`check_sources`, before any voxel is read: input files exist and have a readable header;
   the registration fits in this machine's memory (from the headers' sizes).
2. :func:`check_output_folder`: no input is one of the outputs; the folder can be created and
   written into.
3. :func:`check_pair`, once the images are read: one dimensionality that the model registers,
   no constant image, fixed and moving overlap in space, the fixed image spans enough of the
   model grid; label maps on their image's grid with non-negative integer values, and, when
   Dice is asked (both label maps), labelled structures in common. It warns
   (:class:`ImplausibleInputWarning`) about fields of view of very different sizes and about an
   image that looks like noise rather than like the images a model is trained on.

(Weights are checked where pipelines are loaded: :func:`diffusereg.hub.check_weights`.)

The checks of one image on its own (a 2D or 3D scalar image with finite voxels, positive
spacing and an orthonormal direction; NIfTI files complete) run whenever an image is read or
given: :func:`diffusereg.io.read_image` and :func:`diffusereg.io.validate_image`.
``docs/reliability.md`` lists every case with the message a user sees.
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from diffusereg.data.preprocessing import PaperPreprocessing
from diffusereg.io import Grid, Image, InvalidImageError, read_grid
from diffusereg.metrics import ncc

__all__ = [
    "BYTES_PER_FIXED_VOXEL",
    "ImplausibleInputWarning",
    "MAX_EXTENT_RATIO",
    "MIN_NEIGHBOUR_CORRELATION",
    "MIN_MODEL_VOXELS",
    "MIN_OVERLAP_FRACTION",
    "RegistrationError",
    "check_field_target",
    "check_model_grid_arrays",
    "check_output_folder",
    "check_pair",
    "neighbour_correlation",
    "check_sources",
    "physical_memory",
    "source_name",
]

BYTES_PER_FIXED_VOXEL = 256
"""Peak memory of a registration per voxel of the fixed image's grid, bytes: the moving image
resampled and warped there, the field in voxels, in mm and as an ITK image, the Jacobian; the
measurement behind it, rounded up, is in ``docs/reliability.md``."""

MIN_MODEL_VOXELS = 8
"""Fewest voxels the fixed image may span, on the model grid, along each axis the model registers:
one attention window (4 tokens of 2 voxels) of the denoiser's first Swin stage."""

ARRAY_RANGE_TOLERANCE = 1e-3
"""How far model-grid array intensities may leave ``[0, 1]`` (rounding of a rescaled image)."""

GEOMETRY_ATOL_MM = 1e-3
"""Largest difference (mm, and for direction cosines) between a label map's grid and its image's."""

MIN_OVERLAP_FRACTION = 0.5
"""Least fraction of the fixed image's physical box that the moving image's box must cover. The
registration lives on the fixed image's grid: where the moving image has no data its warped
values are zero, so below half the result is mostly empty (ACDC's ED and ES frames overlap
100 %; two scans of one anatomy with their own field of view overlap well above one half)."""

MAX_EXTENT_RATIO = 2.0
"""Largest ratio, along any axis, between the physical extents (mm) of the moving and the fixed
image before a warning: the shipped model was trained on pairs of one field of view (ratio 1),
and twice the size along an axis rarely shows the same anatomy the same way."""

MIN_NEIGHBOUR_CORRELATION = 0.5
"""Least correlation (:func:`~diffusereg.metrics.ncc`) between in-plane neighbouring voxels of an
input image before a warning. In images of anatomy, neighbouring voxels are alike (ACDC's frames
and the cardiac phantom lie far above; ``docs/data.md`` gives the figures); in noise they are
unrelated (about 0): a model trained on images has nothing to match there."""


class RegistrationError(ValueError):
    """A registration cannot run as asked (bad option, missing labels, an input would be
    overwritten, an unwritable output folder)."""


class ImplausibleInputWarning(UserWarning):
    """The inputs can be registered but look unlike a registration problem (e.g. very different
    fields of view); the message says what to check."""


def source_name(source: object, role: str) -> str:
    """How messages call an input: its path, else its ``role`` (``"fixed"``, ``"moving_labels"``...)."""
    return str(source) if isinstance(source, (str, os.PathLike)) else role


def _shape_text(shape: Iterable[int]) -> str:
    return " x ".join(str(n) for n in shape)


def _values_text(values: Iterable[float]) -> str:
    """``(-118.3, -152.6, 61.5)``: six significant digits, no float32 noise."""
    return f"({', '.join(f'{v:g}' for v in values)})"


def _bytes_text(count: int) -> str:
    """``count`` bytes in binary units, e.g. ``7.3 TiB``."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    power = min(int(math.log(max(count, 1), 1024)), len(units) - 1)
    return f"{count / 1024**power:.1f} {units[power]}"


# ---------------------------------------------------------------------------------- before reading
def physical_memory() -> int | None:
    """This machine's physical memory in bytes, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _source_grid(source: object) -> Grid | None:
    """The grid of a path (its header only), Image or SimpleITK image; None for arrays and None."""
    if isinstance(source, (str, os.PathLike)):
        return read_grid(source)
    if isinstance(source, Image):
        return source.grid
    if isinstance(source, sitk.Image):
        return Grid.from_sitk(source)
    return None


def check_sources(sources: Mapping[str, object], memory_limit: int | None = None) -> None:
    """Checks that read no voxel: every input file exists and has a readable header, and the
    registration fits in memory.

    Args:
        sources: role (``"fixed"``, ``"moving"``, ``"fixed_labels"``, ``"moving_labels"``) ->
            file path, :class:`~diffusereg.io.Image` or SimpleITK image; other values (arrays,
            None) are skipped.
        memory_limit: bytes a registration may use; default :func:`physical_memory`.

    The estimate is ``BYTES_PER_FIXED_VOXEL`` per fixed-grid voxel plus 8 bytes per voxel of
    every other input (decoded, at most float64).

    Raises:
        diffusereg.io.ImageReadError: a file is missing, or its header cannot be read.
        diffusereg.io.InvalidImageError: the estimate exceeds ``memory_limit``.
    """
    grids = {role: grid for role, source in sources.items() if (grid := _source_grid(source)) is not None}
    limit = physical_memory() if memory_limit is None else memory_limit
    if "fixed" not in grids or limit is None:
        return
    fixed_voxels = int(np.prod(grids["fixed"].shape, dtype=np.int64))
    needed = BYTES_PER_FIXED_VOXEL * fixed_voxels + sum(
        8 * int(np.prod(grid.shape, dtype=np.int64)) for role, grid in grids.items() if role != "fixed")
    if needed > limit:
        raise InvalidImageError(
            f"{source_name(sources['fixed'], 'fixed')}: {_shape_text(grids['fixed'].shape)} voxels would need about "
            f"{_bytes_text(needed)} of memory to register, more than this machine's {_bytes_text(limit)}")


def check_output_folder(output_dir: str | os.PathLike, inputs: Iterable[object], output_names: Iterable[str]) -> None:
    """Check that writing ``output_names`` into ``output_dir`` destroys no input and can succeed.

    Args:
        output_dir: the output folder (need not exist yet).
        inputs: the input files (non-path entries are ignored).
        output_names: file names that will be written into ``output_dir``.

    Raises:
        RegistrationError: an input is one of the outputs; ``output_dir`` (or a folder above it)
            is a file; the folder cannot be created or written into (probed with a temporary
            file, which works for every cause: permissions, read-only file systems, ...).
    """
    output_dir = Path(output_dir)
    outputs = {(output_dir / name).resolve() for name in output_names}
    for path in inputs:
        if isinstance(path, (str, os.PathLike)) and Path(path).resolve() in outputs:
            raise RegistrationError(
                f"{path}: this input would be overwritten by an output; choose another output folder")
    existing = output_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "exists and is not a folder" if existing == output_dir else f"cannot be created: {existing} is a file"
        raise RegistrationError(f"{output_dir}: {what}")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        where = "folder is not writable" if existing == output_dir else f"cannot be created in {existing}"
        raise RegistrationError(f"{output_dir}: {where} ({error.strerror})") from error


# ---------------------------------------------------------------------------------- after reading
def _extent_mm(grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned physical bounding box (mm, ITK order) of the grid's voxels, half a voxel beyond
    the outer voxel centres."""
    corners = np.array(np.meshgrid(*[(-0.5, n - 0.5) for n in reversed(grid.shape)], indexing="ij"))
    index = corners.reshape(grid.ndim, -1)
    points = np.asarray(grid.origin)[:, None] + grid.direction_matrix @ (np.asarray(grid.spacing)[:, None] * index)
    return points.min(axis=1), points.max(axis=1)


def _grid_difference(grid: Grid, reference: Grid) -> str | None:
    """What differs between two grids (first of shape, spacing, origin, direction), or None."""
    if grid.shape != reference.shape:
        return f"shape {_shape_text(grid.shape)} vs {_shape_text(reference.shape)}"
    for name, unit in (("spacing", " mm"), ("origin", " mm"), ("direction", "")):
        mine, theirs = getattr(grid, name), getattr(reference, name)
        if not np.allclose(mine, theirs, rtol=0.0, atol=GEOMETRY_ATOL_MM):
            return f"{name} {_values_text(mine)} vs {_values_text(theirs)}{unit}"
    return None


def _label_values(labels: Image, name: str) -> np.ndarray:
    """The sorted label values of a label map; raises unless they are non-negative integers."""
    values = np.unique(labels.array)
    fractional = values[values != np.round(values)] if np.issubdtype(values.dtype, np.floating) else values[:0]
    if fractional.size:
        raise InvalidImageError(f"{name}: label map has non-integer values (e.g. {float(fractional[0]):g}); "
                                "labels must be whole numbers")
    if values.size and values[0] < 0:
        raise InvalidImageError(
            f"{name}: label map has negative values (e.g. {float(values[0]):g}); labels must be >= 0")
    return values


def _check_label_maps(fixed: Image, moving: Image, fixed_labels: Image | None, moving_labels: Image | None,
                      names: Mapping[str, str]) -> None:
    """The label-map part of :func:`check_pair`."""
    values = {}
    for role, labels, image_role, image in (("fixed_labels", fixed_labels, "fixed", fixed),
                                            ("moving_labels", moving_labels, "moving", moving)):
        if labels is None:
            continue
        difference = _grid_difference(labels.grid, image.grid)
        if difference is not None:
            raise InvalidImageError(f"{names[role]}: label map is not on the grid of its image {names[image_role]} "
                                    f"({difference})")
        values[role] = _label_values(labels, names[role])
    if len(values) < 2:
        return
    for role, found in values.items():  # Dice compares the two maps
        if not np.any(found > 0):
            raise InvalidImageError(f"{names[role]}: label map is empty (every voxel is 0); Dice needs labelled "
                                    "structures")
    fixed_set, moving_set = (set(found[found > 0].tolist()) for found in values.values())
    if not fixed_set & moving_set:
        raise InvalidImageError(f"{names['moving_labels']}: labels {sorted(moving_set)} share none with "
                                f"{names['fixed_labels']}'s {sorted(fixed_set)}; Dice compares the same labels")


def _check_overlap(fixed: Grid, moving: Grid, fixed_name: str, moving_name: str) -> str | None:
    """Raise unless ``moving`` covers at least :data:`MIN_OVERLAP_FRACTION` of ``fixed``'s physical
    box; return a warning when their extents differ by more than :data:`MAX_EXTENT_RATIO` along an
    axis (the caller warns once every error check has passed), else None."""
    (fixed_low, fixed_high), (moving_low, moving_high) = _extent_mm(fixed), _extent_mm(moving)
    if np.any(moving_low >= fixed_high) or np.any(fixed_low >= moving_high):
        raise InvalidImageError(f"{moving_name}: does not overlap {fixed_name} in physical space "
                                f"(origins {_values_text(fixed.origin)} and {_values_text(moving.origin)} mm); "
                                "check the images' geometry")
    common = np.minimum(fixed_high, moving_high) - np.maximum(fixed_low, moving_low)
    covered = float(np.prod(common / (fixed_high - fixed_low)))
    if covered < MIN_OVERLAP_FRACTION:
        raise InvalidImageError(
            f"{moving_name}: covers only {100 * covered:.1f} % of the field of view of {fixed_name} (at least "
            f"{100 * MIN_OVERLAP_FRACTION:.0f} % needed; extents {_values_text(moving_high - moving_low)} and "
            f"{_values_text(fixed_high - fixed_low)} mm); check the images' geometry, or crop the fixed image to the "
            "region both show")
    ratios = (moving_high - moving_low) / (fixed_high - fixed_low)
    worst = int(np.argmax(np.maximum(ratios, 1 / ratios)))
    if max(ratios[worst], 1 / ratios[worst]) <= MAX_EXTENT_RATIO:
        return None
    return (f"{moving_name}: spans {ratios[worst]:.2g} times {fixed_name}'s extent along ITK axis {'xyz'[worst]} "
            f"({_values_text(moving_high - moving_low)} vs {_values_text(fixed_high - fixed_low)} mm); the "
            "registration covers the fixed image's field of view only: check that both images show the same anatomy")


def neighbour_correlation(image: Image) -> float:
    """Mean over the in-plane axes (the last two array axes) of the :func:`~diffusereg.metrics.ncc`
    of each voxel with its next neighbour along that axis; 1 for a smooth image, about 0 for noise."""
    x = image.array
    pairs = [(x[..., :-1, :], x[..., 1:, :]), (x[..., :, :-1], x[..., :, 1:])]
    values = [ncc(a, b) for a, b in pairs if a.size]
    return float(np.mean(values)) if values else 1.0


def check_pair(
    fixed: Image,
    moving: Image,
    spatial_dims: int,
    preprocessing: PaperPreprocessing,
    *,
    fixed_labels: Image | None = None,
    moving_labels: Image | None = None,
    names: Mapping[str, str] | None = None,
) -> None:
    """Check that the read images make a registration this model can do, and that its Dice
    (when both label maps are given) means something. Each image on its own has already been
    checked by :func:`diffusereg.io.validate_image`.

    Args:
        fixed, moving: the images, 2D ``(H, W)`` or 3D ``(D, H, W)``, any geometry.
        spatial_dims: the denoiser's (2: 2D images, or volumes slice by slice; 3: volumes only).
        preprocessing: the model's preprocessing (its spacing defines the model grid).
        fixed_labels, moving_labels: label maps on the fixed / moving image's grid, or None.
        names: role -> how messages call that input (default: the role).

    Raises:
        diffusereg.io.InvalidImageError: naming the input and the problem (see the module docstring).
    """
    names = {role: role for role in ("fixed", "moving", "fixed_labels", "moving_labels")} | dict(names or {})
    if moving.ndim != fixed.ndim:
        raise InvalidImageError(f"{names['moving']}: is {moving.ndim}D but {names['fixed']} is {fixed.ndim}D; "
                                "register images of one dimensionality")
    if fixed.ndim < spatial_dims:
        raise InvalidImageError(
            f"{names['fixed']}: is a {fixed.ndim}D image; this model registers {spatial_dims}D volumes")
    for role, image in (("fixed", fixed), ("moving", moving)):
        low, high = float(image.array.min()), float(image.array.max())
        if low == high:
            raise InvalidImageError(f"{names[role]}: every voxel is {low:g} (a constant image); nothing to register")
    doubts = [_check_overlap(fixed.grid, moving.grid, names["fixed"], names["moving"])]
    span = preprocessing.model_grid(fixed.grid).resampled.shape[-spatial_dims:]
    if min(span) < MIN_MODEL_VOXELS:
        raise InvalidImageError(f"{names['fixed']}: too small for the model: it spans {_shape_text(span)} voxels of "
                                f"the model grid, fewer than {MIN_MODEL_VOXELS} along an axis")
    _check_label_maps(fixed, moving, fixed_labels, moving_labels, names)
    for role, image in (("fixed", fixed), ("moving", moving)):
        correlation = neighbour_correlation(image)
        if correlation < MIN_NEIGHBOUR_CORRELATION:
            doubts.append(f"{names[role]}: neighbouring voxels correlate {correlation:.2f} (less than "
                          f"{MIN_NEIGHBOUR_CORRELATION}): it looks like noise, not like the images the model was trained "
                          "on; check that this is the image you meant")
    for doubt in doubts:
        if doubt is not None:
            warnings.warn(doubt, ImplausibleInputWarning, stacklevel=2)


def check_model_grid_arrays(arrays: Mapping[str, torch.Tensor]) -> None:
    """Check images given as arrays (already on the model grid): finite, intensities in ``[0, 1]``.

    Args:
        arrays: role (``"fixed"``, ``"moving"``) -> tensor.

    Raises:
        ValueError: naming the role and the values found, and how to bring images to the model grid.
    """
    for role, array in arrays.items():
        if not torch.isfinite(array).all():
            raise ValueError(f"{role} image contains NaN or infinite values")
        low, high = float(array.min()), float(array.max())
        if low < -ARRAY_RANGE_TOLERANCE or high > 1 + ARRAY_RANGE_TOLERANCE:
            raise ValueError(
                f"{role}: intensities span {low:g} .. {high:g}, but arrays must be on the model grid with intensities "
                "in [0, 1]; give file paths or diffusereg.io.Image objects (preprocessed for you), or bring arrays "
                "there with pipe.preprocessing(fixed_image, moving_image)")


def check_field_target(grid: Grid, image: Image, names: Mapping[str, str], labels: bool) -> None:
    """Check that ``image`` (an image or, with ``labels``, a label map in the moving image's space)
    can be warped by a field defined on the fixed grid ``grid``: one dimensionality, the overlap
    of :func:`check_pair`, and label values that are non-negative integers.

    Args:
        grid: the field's grid (the fixed image's).
        image: what to warp.
        names: ``"field"`` and ``"image"`` -> how messages call them.
        labels: ``image`` is a label map.

    Raises:
        diffusereg.io.InvalidImageError: naming the input and the problem.
    """
    if image.ndim != grid.ndim:
        raise InvalidImageError(f"{names['image']}: is {image.ndim}D but the field {names['field']} is {grid.ndim}D")
    doubt = _check_overlap(grid, image.grid, f"the field {names['field']}", names["image"])
    if labels:
        _label_values(image, names["image"])
    if doubt is not None:
        warnings.warn(doubt, ImplausibleInputWarning, stacklevel=2)
