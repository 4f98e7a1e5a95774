"""Displacement fields: warping, composition, resizing, Jacobian determinant, voxel <-> mm.

Conventions (see ``docs/architecture.md`` and ``docs/spatial_metrics.md``):

- A field ``u`` has shape ``(B, ndim, *S)`` with ``S = (H, W)`` or ``(D, H, W)``; it is a
  displacement in voxels of the fixed grid, and channel ``i`` moves along array axis ``i``.
- Warping pulls: ``warp(m, u)(x) = m(x + u(x))``; voxel ``k`` sits at coordinate ``k``
  (corner voxels at ``0`` and ``s - 1``, i.e. ``align_corners=True`` in PyTorch terms).
- Only :func:`field_to_world` returns vectors in ITK ``(x, y, z)`` order; everything else
  is in array-axis order.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from monai.networks.blocks import DVF2DDF, Warp

__all__ = [
    "affine_field",
    "compose",
    "field_to_world",
    "identity_grid",
    "integrate_velocity",
    "jacobian_determinant",
    "mm_to_voxel",
    "resize_field",
    "voxel_to_mm",
    "warp",
    "warp_labels",
]


def _spatial_ndim(field: torch.Tensor) -> int:
    """Number of spatial axes of a batched field ``(B, ndim, *S)``; raises if malformed."""
    ndim = field.ndim - 2
    if ndim not in (2, 3) or field.shape[1] != ndim:
        raise ValueError(f"expected a field of shape (B, ndim, *S) with ndim 2 or 3, got {tuple(field.shape)}")
    return ndim


def _per_channel(values: Sequence[float] | torch.Tensor, field: torch.Tensor) -> torch.Tensor:
    """``values`` (one per channel) shaped ``(ndim, 1, ..., 1)`` to broadcast over
    ``(B, ndim, *S)`` or ``(ndim, *S)``."""
    vector = torch.as_tensor(values, dtype=field.dtype, device=field.device).flatten()
    ndim = vector.numel()
    return vector.reshape(ndim, *([1] * ndim))


def identity_grid(
    shape: Sequence[int], dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """Voxel coordinates of a grid: ``grid[i, *k] = k[i]``.

    Args:
        shape: spatial size ``S``.
    Returns:
        ``(ndim, *S)`` coordinates in voxels, array-axis order.
    """
    axes = [torch.arange(size, dtype=dtype, device=device) for size in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)


def warp(
    image: torch.Tensor,
    field: torch.Tensor,
    mode: Literal["bilinear", "nearest"] = "bilinear",
    padding_mode: Literal["border", "zeros"] = "border",
) -> torch.Tensor:
    """Pull ``image`` through ``field``: ``out(x) = image(x + field(x))``.

    Uses :class:`monai.networks.blocks.Warp` (reference grid ``arange(s)`` per axis, DDF
    channel ``i`` along array axis ``i``, ``align_corners=True``): exactly our convention.

    Args:
        image: ``(B, C, *S)``, any dtype. Non-float images (labels) are warped as float and
            rounded back to their dtype; use ``mode="nearest"`` for labels.
        field: ``(B, ndim, *S)`` displacement in voxels.
        mode: ``"bilinear"`` (trilinear in 3D) or ``"nearest"``.
        padding_mode: ``"border"`` repeats edge values, ``"zeros"`` reads 0 outside.
    Returns:
        ``(B, C, *S)`` warped image with the dtype of ``image``.
    """
    _spatial_ndim(field)
    if image.ndim != field.ndim or image.shape[0] != field.shape[0] or image.shape[2:] != field.shape[2:]:
        raise ValueError(f"image {tuple(image.shape)} and field {tuple(field.shape)} do not match")
    is_float = image.is_floating_point()
    work_dtype = image.dtype if is_float else (field.dtype if field.is_floating_point() else torch.float32)
    with warnings.catch_warnings():  # MONAI warns on every construction that it uses grid_sample
        warnings.simplefilter("ignore")
        warper = Warp(mode=mode, padding_mode=padding_mode)
    warped = warper(image.to(work_dtype), field.to(work_dtype))
    return warped if is_float else warped.round().to(image.dtype)


def warp_labels(labels: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
    """Integer label maps ``(B, 1, *S)`` pulled through ``field`` ``(B, ndim, *S)`` (voxels) with
    nearest neighbour; same dtype as ``labels``."""
    return warp(labels, field, mode="nearest")


def compose(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Field of warping by ``first`` and then by ``second``.

    ``warp(m, compose(first, second)) == warp(warp(m, first), second)`` (up to interpolation).
    With pull semantics ``warp(warp(m, u), v)(x) = m(x + v(x) + u(x + v(x)))``, so
    ``compose(u, v) = v + warp(u, v)``; as coordinate maps ``phi_u o phi_v`` with
    ``phi_u(x) = x + u(x)``. ``first`` is sampled with border padding.

    Args:
        first, second: ``(B, ndim, *S)`` fields in voxels on the same grid.
    Returns:
        ``(B, ndim, *S)`` composed field in voxels.
    """
    if first.shape != second.shape:
        raise ValueError(f"fields differ in shape: {tuple(first.shape)} vs {tuple(second.shape)}")
    return second + warp(first, second)


@functools.lru_cache(maxsize=None)
def _scaling_and_squaring(steps: int) -> DVF2DDF:
    """MONAI's scaling-and-squaring layer with ``steps`` squarings, border padding (one per count)."""
    with warnings.catch_warnings():  # MONAI's Warp says at every construction that it uses grid_sample
        warnings.simplefilter("ignore")
        return DVF2DDF(num_steps=steps, mode="bilinear", padding_mode="border")


def integrate_velocity(velocity: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """The displacement of the flow of a stationary velocity field, by scaling and squaring
    (MONAI's ``DVF2DDF`` with border padding): ``u = v / 2**steps``, then ``steps`` times
    ``u <- compose(u, u)``. Diffeomorphic in the continuum; ``steps=0`` returns ``velocity`` itself.

    Args:
        velocity: ``(B, ndim, *S)`` in voxels.
        steps: number of squarings.
    Returns:
        ``(B, ndim, *S)`` displacement in voxels.
    """
    return velocity if steps == 0 else _scaling_and_squaring(steps)(velocity)


def resize_field(field: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resample a field to spatial ``size`` and rescale its vectors to the new voxel size.

    Corners are aligned (old voxel ``0`` and ``s - 1`` land on new voxel ``0`` and
    ``n - 1``), as in :func:`warp`, so channel ``i`` is multiplied by
    ``(n_i - 1) / (s_i - 1)`` (``1`` where either size is 1). An affine map stays the same
    affine map (linear interpolation of a linear field is exact).

    Args:
        field: ``(B, ndim, *S)`` in voxels of the old grid.
        size: new spatial size, ``ndim`` integers.
    Returns:
        ``(B, ndim, *size)`` in voxels of the new grid.
    """
    ndim = _spatial_ndim(field)
    size = tuple(int(s) for s in size)
    if len(size) != ndim:
        raise ValueError(f"size {size} does not have {ndim} entries")
    mode = "bilinear" if ndim == 2 else "trilinear"
    resized = F.interpolate(field, size=size, mode=mode, align_corners=True)
    ratios = [(new - 1) / (old - 1) if new > 1 and old > 1 else 1.0 for new, old in zip(size, field.shape[2:])]
    return resized * _per_channel(ratios, resized)


def jacobian_determinant(field: torch.Tensor, method: Literal["forward", "central"] = "forward") -> torch.Tensor:
    """Determinant of the Jacobian of ``x -> x + u(x)``: ``det(I + du_c/dx_a)``.

    An axis of one voxel (a single slice) has no derivative along it: ``du/dx`` there is 0 and
    the axis is kept, so the determinant is the in-plane one.

    Args:
        field: ``(B, ndim, *S)`` in voxels.
        method: ``"forward"``: forward differences ``u[k+1] - u[k]`` along each axis,
            evaluated on the voxels ``k < s - 1`` of every axis, exactly like DiffuseReg's
            evaluation code; output ``(B, *(s - 1 for s in S))`` (``1`` for an axis of one voxel).
            ``"central"``: :func:`torch.gradient` (central differences inside, one-sided at the
            border); output ``(B, *S)``.
    Returns:
        Determinant map (unitless, 1 means volume preserved, <= 0 means folding).
    """
    ndim = _spatial_ndim(field)
    if method not in ("forward", "central"):
        raise ValueError(f"method must be 'forward' or 'central', got {method!r}")
    sizes = field.shape[2:]
    flat = [size == 1 for size in sizes]
    interior = (slice(None), slice(None)) + tuple(
        slice(None) if single or method == "central" else slice(0, size - 1) for size, single in zip(sizes, flat))
    derivatives = []
    for dim, single in enumerate(flat, start=2):
        if single:
            derivatives.append(torch.zeros_like(field))
        elif method == "forward":
            derivatives.append(torch.diff(field, dim=dim))
        else:
            derivatives.append(torch.gradient(field, dim=dim)[0])
    # jacobian[b, *k, c, a] = du_c / dx_a at voxel k
    jacobian = torch.stack([d[interior] for d in derivatives], dim=-1).movedim(1, -2)
    jacobian = jacobian + torch.eye(ndim, dtype=field.dtype, device=field.device)
    return torch.linalg.det(jacobian)


def voxel_to_mm(field: torch.Tensor, axis_spacing: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Field in voxels -> millimetres: channel ``i`` times ``axis_spacing[i]``.

    Args:
        field: ``(B, ndim, *S)`` or ``(ndim, *S)`` in voxels.
        axis_spacing: spacing in mm per array axis (``Image.axis_spacing``, reverse of ITK's).
    Returns:
        Same shape, in mm, still array-axis channel order.
    """
    return field * _per_channel(axis_spacing, field)


def mm_to_voxel(field: torch.Tensor, axis_spacing: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`voxel_to_mm`: channel ``i`` divided by ``axis_spacing[i]``."""
    return field / _per_channel(axis_spacing, field)


def field_to_world(
    field: torch.Tensor,
    axis_spacing: Sequence[float] | torch.Tensor,
    direction: Sequence[float] | torch.Tensor,
) -> torch.Tensor:
    """Displacement vectors in physical (world) space, ITK ``(x, y, z)`` order, mm.

    ``world = direction @ (spacing_xyz * u_xyz)`` where ``u_xyz`` is the field with its
    channels reversed (array order -> ITK order). This is what an ITK displacement-field
    transform stores. The only function here whose channel order is not array order.

    Args:
        field: ``(B, ndim, *S)`` or ``(ndim, *S)`` in voxels, array-axis channel order.
        axis_spacing: spacing in mm per array axis.
        direction: ITK direction cosines, ``ndim * ndim`` values row-major (as
            ``SimpleITK.Image.GetDirection()``) or an ``(ndim, ndim)`` matrix.
    Returns:
        Same shape, in mm, channels ``(x, y[, z])``.
    """
    ndim = len(axis_spacing)
    channel_dim = field.ndim - ndim - 1
    matrix = torch.as_tensor(direction, dtype=field.dtype, device=field.device).reshape(ndim, ndim)
    mm_xyz = voxel_to_mm(field, axis_spacing).flip(channel_dim)
    return (mm_xyz.movedim(channel_dim, -1) @ matrix.T).movedim(-1, channel_dim)



def world_to_field(
    vectors: torch.Tensor,
    axis_spacing: Sequence[float] | torch.Tensor,
    direction: Sequence[float] | torch.Tensor,
) -> torch.Tensor:
    """Inverse of :func:`field_to_world`: world vectors (ITK ``(x, y, z)`` channels, mm) -> voxels.

    ``u_xyz = (direction^T @ world) / spacing_xyz`` (the direction matrix is orthonormal), then
    the channels are reversed to array order.

    Args:
        vectors: ``(B, ndim, *S)`` or ``(ndim, *S)`` in mm, channels ``(x, y[, z])``.
        axis_spacing: spacing in mm per array axis.
        direction: ITK direction cosines, as for :func:`field_to_world`.
    Returns:
        Same shape, in voxels, array-axis channel order.
    """
    ndim = len(axis_spacing)
    channel_dim = vectors.ndim - ndim - 1
    matrix = torch.as_tensor(direction, dtype=vectors.dtype, device=vectors.device).reshape(ndim, ndim)
    mm_xyz = (vectors.movedim(channel_dim, -1) @ matrix).movedim(-1, channel_dim)
    return mm_to_voxel(mm_xyz.flip(channel_dim), axis_spacing)

def affine_field(matrix: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Displacement of an affine map on voxel coordinates: ``u(x) = A x + b - x``.

    Args:
        matrix: ``(ndim, ndim + 1)`` or batched ``(B, ndim, ndim + 1)`` ``[A | b]`` acting on
            voxel coordinates in array-axis order (a homogeneous ``(ndim + 1, ndim + 1)`` matrix
            is accepted; its last row is ignored).
        shape: spatial size ``S``.
    Returns:
        ``(B, ndim, *S)`` field in voxels (``B = 1`` for an unbatched matrix).
    """
    ndim = len(shape)
    matrix = torch.as_tensor(matrix)
    if not matrix.is_floating_point():
        matrix = matrix.to(torch.get_default_dtype())
    matrix = matrix.reshape(-1, *matrix.shape[-2:])[:, :ndim, :]
    if matrix.shape[1:] != (ndim, ndim + 1):
        raise ValueError(f"matrix must be (ndim, ndim + 1) for ndim={ndim}, got {tuple(matrix.shape[1:])}")
    grid = identity_grid(shape, dtype=matrix.dtype, device=matrix.device)
    linear = torch.einsum("bij,j...->bi...", matrix[:, :, :ndim], grid)
    translation = matrix[:, :, ndim].reshape(-1, ndim, *([1] * ndim))
    return linear + translation - grid
