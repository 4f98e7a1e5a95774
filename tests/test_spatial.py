"""Tests of diffusereg.spatial against analytic results (2D and 3D, every axis)."""

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from diffusereg.spatial import (
    affine_field,
    compose,
    field_to_world,
    identity_grid,
    jacobian_determinant,
    mm_to_voxel,
    resize_field,
    voxel_to_mm,
    warp,
)

# Distinct sizes per axis so that a transposed axis cannot go unnoticed.
SHAPES = {2: (9, 12), 3: (7, 9, 11)}
DTYPE = torch.float64


def constant_field(shape: tuple[int, ...], vector: list[float]) -> torch.Tensor:
    ndim = len(shape)
    return torch.tensor(vector, dtype=DTYPE).reshape(1, ndim, *([1] * ndim)).expand(1, ndim, *shape).clone()


def linear_image(shape: tuple[int, ...], weights: list[float], offset: float = 0.5) -> torch.Tensor:
    """(1, 1, *shape) image sum_i weights[i] * k_i + offset (bilinear interpolation is exact)."""
    grid = identity_grid(shape, dtype=DTYPE)
    return (torch.einsum("i,i...->...", torch.tensor(weights, dtype=DTYPE), grid) + offset)[None, None]


def random_affine(ndim: int, generator: torch.Generator) -> torch.Tensor:
    """(ndim, ndim + 1) near-identity affine map on voxel coordinates."""
    linear = torch.eye(ndim, dtype=DTYPE) + 0.15 * torch.randn(ndim, ndim, generator=generator, dtype=DTYPE)
    translation = torch.randn(ndim, 1, generator=generator, dtype=DTYPE)
    return torch.cat([linear, translation], dim=1)


def inside(coords: torch.Tensor, shape: tuple[int, ...], margin: float = 0.0) -> torch.Tensor:
    """Mask (*S) of points whose coordinates (ndim, *S) lie in the grid, ``margin`` voxels in."""
    upper = torch.tensor(shape, dtype=coords.dtype).reshape(-1, *([1] * len(shape))) - 1
    return ((coords >= margin) & (coords <= upper - margin)).all(dim=0)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("shift", [1.0, 0.37, -1.6])
def test_warp_constant_shift_along_each_axis(ndim: int, shift: float) -> None:
    shape = SHAPES[ndim]
    for axis in range(ndim):
        vector = [0.0] * ndim
        vector[axis] = shift
        field = constant_field(shape, vector)
        grid = identity_grid(shape, dtype=DTYPE)
        valid = inside(grid + field[0], shape)
        for ramp_axis in range(ndim):
            weights = [0.0] * ndim
            weights[ramp_axis] = 1.0
            warped = warp(linear_image(shape, weights), field)[0, 0]
            expected = grid[ramp_axis] + 0.5 + (shift if ramp_axis == axis else 0.0)
            torch.testing.assert_close(warped[valid], expected[valid])


@pytest.mark.parametrize("ndim", [2, 3])
def test_warp_matches_affine_map(ndim: int) -> None:
    shape = SHAPES[ndim]
    matrix = random_affine(ndim, torch.Generator().manual_seed(ndim))
    weights = [1.0, -2.0, 0.5][:ndim]
    field = affine_field(matrix, shape)
    mapped = identity_grid(shape, dtype=DTYPE) + field[0]
    expected = torch.einsum("i,i...->...", torch.tensor(weights, dtype=DTYPE), mapped) + 0.5
    warped = warp(linear_image(shape, weights), field)[0, 0]
    valid = inside(mapped, shape)
    assert valid.float().mean() > 0.3
    torch.testing.assert_close(warped[valid], expected[valid])


@pytest.mark.parametrize("ndim", [2, 3])
def test_nearest_warp_keeps_label_values_and_dtype(ndim: int) -> None:
    shape = SHAPES[ndim]
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (1, 1, *shape), generator=generator, dtype=torch.int64) * 10
    field = 2.0 * torch.randn(1, ndim, *shape, generator=generator)
    warped = warp(labels, field, mode="nearest")
    assert warped.dtype == labels.dtype
    assert set(warped.unique().tolist()) <= set(labels.unique().tolist())
    for axis in range(ndim):  # an integer shift moves labels exactly
        vector = [0.0] * ndim
        vector[axis] = 1.0
        shifted = warp(labels, constant_field(shape, vector).float(), mode="nearest")
        interior = [slice(None)] * (ndim + 2)
        interior[axis + 2] = slice(0, -1)
        torch.testing.assert_close(shifted[tuple(interior)], labels.narrow(axis + 2, 1, shape[axis] - 1))


def test_warp_zeros_padding_and_shape_check() -> None:
    shape = SHAPES[2]
    image = torch.ones(1, 1, *shape, dtype=DTYPE)
    warped = warp(image, constant_field(shape, [0.0, 100.0]), padding_mode="zeros")
    assert warped.abs().max() == 0
    with pytest.raises(ValueError):
        warp(image, torch.zeros(1, 2, 3, 3, dtype=DTYPE))


def test_warp_is_differentiable() -> None:
    generator = torch.Generator().manual_seed(1)
    image = torch.rand(2, 1, 8, 8, 8, generator=generator, requires_grad=True)
    field = (0.5 * torch.randn(2, 3, 8, 8, 8, generator=generator)).requires_grad_()
    warp(image, field).sum().backward()
    assert image.grad.abs().sum() > 0 and field.grad.abs().sum() > 0


@pytest.mark.parametrize("ndim", [2, 3])
def test_compose_of_affine_fields_is_the_composed_map(ndim: int) -> None:
    shape = SHAPES[ndim]
    generator = torch.Generator().manual_seed(10 + ndim)
    first_matrix, second_matrix = random_affine(ndim, generator), random_affine(ndim, generator)
    composed = compose(affine_field(first_matrix, shape), affine_field(second_matrix, shape))
    # warp(warp(m, u), v)(x) = m(phi_u(phi_v(x))): apply second's map, then first's
    grid = identity_grid(shape, dtype=DTYPE)
    after_second = torch.einsum("ij,j...->i...", second_matrix[:, :ndim], grid) + second_matrix[:, ndim].reshape(
        ndim, *([1] * ndim)
    )
    expected = torch.einsum("ij,j...->i...", first_matrix[:, :ndim], after_second) + first_matrix[:, ndim].reshape(
        ndim, *([1] * ndim)
    )
    valid = inside(after_second, shape)
    assert valid.float().mean() > 0.3
    torch.testing.assert_close((grid + composed[0])[:, valid], expected[:, valid])


def smooth_field(shape: tuple[int, ...], amplitude: float, phase: float) -> torch.Tensor:
    grid = identity_grid(shape, dtype=DTYPE)
    channels = [
        amplitude * torch.sin(2 * math.pi * grid[(axis + 1) % len(shape)] / shape[axis] + phase + axis)
        for axis in range(len(shape))
    ]
    return torch.stack(channels)[None]


@pytest.mark.parametrize("ndim", [2, 3])
def test_warp_by_composed_field_equals_successive_warps(ndim: int) -> None:
    shape = (24, 26) if ndim == 2 else (20, 22, 24)
    grid = identity_grid(shape, dtype=DTYPE)
    image = torch.cos(sum(2 * math.pi * grid[axis] / (4 * size) for axis, size in enumerate(shape)))[None, None]
    first, second = smooth_field(shape, 1.2, 0.3), smooth_field(shape, 0.9, 1.7)
    successive = warp(warp(image, first), second)
    interior = (slice(None), slice(None)) + (slice(4, -4),) * ndim
    error = (warp(image, compose(first, second)) - successive)[interior].abs().max()
    wrong_order_error = (warp(image, compose(second, first)) - successive)[interior].abs().max()
    assert error < 0.01
    assert wrong_order_error > 5 * error


@pytest.mark.parametrize("ndim", [2, 3])
def test_resize_constant_field_rescales_each_axis(ndim: int) -> None:
    shape = SHAPES[ndim]
    new_size = (17, 6, 21)[:ndim]
    vector = [1.5, -2.0, 0.75][:ndim]
    resized = resize_field(constant_field(shape, vector), new_size)
    assert resized.shape == (1, ndim, *new_size)
    for axis in range(ndim):
        ratio = (new_size[axis] - 1) / (shape[axis] - 1)
        torch.testing.assert_close(resized[0, axis], torch.full(new_size, vector[axis] * ratio, dtype=DTYPE))


@pytest.mark.parametrize("ndim", [2, 3])
def test_resize_affine_field_is_the_same_affine_map(ndim: int) -> None:
    shape = SHAPES[ndim]
    new_size = (17, 6, 21)[:ndim]
    matrix = random_affine(ndim, torch.Generator().manual_seed(20 + ndim))
    scale = torch.diag(torch.tensor([(n - 1) / (s - 1) for n, s in zip(new_size, shape)], dtype=DTYPE))
    new_matrix = torch.cat([scale @ matrix[:, :ndim] @ torch.linalg.inv(scale), scale @ matrix[:, ndim:]], dim=1)
    torch.testing.assert_close(resize_field(affine_field(matrix, shape), new_size), affine_field(new_matrix, new_size))


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("method", ["forward", "central"])
def test_jacobian_of_affine_field_is_det_a(ndim: int, method: str) -> None:
    shape = SHAPES[ndim]
    generator = torch.Generator().manual_seed(30 + ndim)
    matrices = torch.stack([random_affine(ndim, generator) for _ in range(2)])
    determinant = jacobian_determinant(affine_field(matrices, shape), method=method)
    expected_shape = tuple(s - 1 for s in shape) if method == "forward" else shape
    assert determinant.shape == (2, *expected_shape)
    for item in range(2):
        expected = torch.linalg.det(matrices[item, :, :ndim])
        torch.testing.assert_close(determinant[item], expected.expand(expected_shape))


@pytest.mark.parametrize("ndim", [2, 3])
def test_jacobian_scaling_one_axis(ndim: int) -> None:
    """u_a = (s - 1) k_a on a single axis a: det = s; catches channel/axis mix-ups."""
    shape = SHAPES[ndim]
    for axis in range(ndim):
        matrix = torch.cat([torch.eye(ndim, dtype=DTYPE), torch.zeros(ndim, 1, dtype=DTYPE)], dim=1)
        matrix[axis, axis] = 1.8
        shear = matrix.clone()
        shear[axis, (axis + 1) % ndim] = 0.7  # du_a/dx_b, b != a: det unchanged
        for candidate in (matrix, shear):
            determinant = jacobian_determinant(affine_field(candidate, shape))
            torch.testing.assert_close(determinant, torch.full_like(determinant, 1.8))


def paper_jacobian_3d(flow: torch.Tensor) -> torch.Tensor:
    """DiffuseReg's evaluation code (core/metrics.py get_jacobian_determinant), on the CPU."""
    eye = torch.eye(3, dtype=flow.dtype).reshape(3, 3, 1, 1, 1)
    stacks = torch.stack(
        [
            flow[..., 1:, :-1, :-1] - flow[..., :-1, :-1, :-1] + eye[0],
            flow[..., :-1, 1:, :-1] - flow[..., :-1, :-1, :-1] + eye[1],
            flow[..., :-1, :-1, 1:] - flow[..., :-1, :-1, :-1] + eye[2],
        ],
        dim=2,
    )
    return torch.linalg.det(torch.permute(stacks, [0, 3, 4, 5, 1, 2]))


def test_forward_jacobian_matches_paper_code() -> None:
    field = torch.randn(2, 3, 6, 7, 8, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    torch.testing.assert_close(jacobian_determinant(field), paper_jacobian_3d(field))


@pytest.mark.parametrize("method", ["forward", "central"])
def test_jacobian_of_a_single_slice_is_the_in_plane_one(method: str) -> None:
    """A (1, H, W) volume (how many 2D images are stored) crashed torch.gradient (issue 32)."""
    in_plane = torch.randn(1, 2, 7, 8, generator=torch.Generator().manual_seed(5), dtype=DTYPE)
    volume = torch.cat([torch.zeros_like(in_plane[:, :1]), in_plane], dim=1)[:, :, None]  # (1, 3, 1, 7, 8)
    determinant = jacobian_determinant(volume, method=method)
    expected = jacobian_determinant(in_plane, method=method)
    assert determinant.shape == (1, 1, *expected.shape[1:])
    torch.testing.assert_close(determinant[:, 0], expected)


def test_jacobian_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        jacobian_determinant(torch.zeros(1, 3, 5, 5))
    with pytest.raises(ValueError):
        jacobian_determinant(torch.zeros(1, 2, 5, 5), method="backward")


def test_voxel_mm_round_trip_batched_and_unbatched() -> None:
    field = torch.randn(2, 3, 4, 5, 6, generator=torch.Generator().manual_seed(4), dtype=DTYPE)
    spacing = (10.0, 1.5, 0.5)
    in_mm = voxel_to_mm(field, spacing)
    for axis, value in enumerate(spacing):
        torch.testing.assert_close(in_mm[:, axis], field[:, axis] * value)
    torch.testing.assert_close(mm_to_voxel(in_mm, spacing), field)
    torch.testing.assert_close(voxel_to_mm(field[0], spacing), in_mm[0])


def test_field_to_world_matches_simpleitk_geometry() -> None:
    """World displacement = physical point of (index + u) minus that of index."""
    axis_spacing = (3.0, 1.25, 0.8)  # array order (D, H, W)
    rotation = sitk.VersorTransform((0.2, -0.5, 1.0), 0.6).GetMatrix()
    image = sitk.Image(5, 4, 3, sitk.sitkUInt8)  # ITK size (x, y, z) = (W, H, D)
    image.SetSpacing(axis_spacing[::-1])
    image.SetDirection(rotation)
    image.SetOrigin((4.0, -2.0, 7.0))
    vector = [0.7, -1.3, 2.1]  # voxels along (D, H, W)
    world = field_to_world(constant_field((3, 4, 5), vector), axis_spacing, rotation)
    start = np.array(image.TransformContinuousIndexToPhysicalPoint((1.0, 2.0, 1.0)))
    end = np.array(image.TransformContinuousIndexToPhysicalPoint((1.0 + vector[2], 2.0 + vector[1], 1.0 + vector[0])))
    np.testing.assert_allclose(world[0, :, 1, 2, 1].numpy(), end - start, atol=1e-12)
    unbatched = field_to_world(constant_field((3, 4, 5), vector)[0], axis_spacing, np.reshape(rotation, (3, 3)))
    torch.testing.assert_close(unbatched, world[0])


def test_affine_field_identity_and_translation() -> None:
    identity = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert affine_field(identity, (4, 5)).abs().max() == 0
    translation = identity.clone()
    translation[:, 2] = torch.tensor([2.0, -3.0])
    field = affine_field(translation, (4, 5))
    assert field.shape == (1, 2, 4, 5)
    assert (field[0, 0] == 2.0).all() and (field[0, 1] == -3.0).all()
    homogeneous = torch.cat([translation, torch.tensor([[0.0, 0.0, 1.0]])])
    torch.testing.assert_close(affine_field(homogeneous, (4, 5)), field)
    grid = identity_grid((2, 3))
    assert grid.shape == (2, 2, 3) and grid[0, 1, 2] == 1 and grid[1, 1, 2] == 2


def test_world_to_field_inverts_field_to_world():
    from diffusereg.spatial import field_to_world, world_to_field

    direction = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    field = torch.randn(2, 3, 4, 5, 6, dtype=torch.float64)
    world = field_to_world(field, (3.0, 1.5, 0.7), direction)
    assert torch.allclose(world_to_field(world, (3.0, 1.5, 0.7), direction), field)
