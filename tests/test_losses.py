"""Tests of diffusereg.losses: known values, 2D and 3D, gradients flow."""

import pytest
import torch

from diffusereg.losses import dice_loss, gradient_loss, ncc_loss, ssim_loss
from diffusereg.spatial import identity_grid

SHAPES = {2: (12, 14), 3: (10, 11, 12)}


def random_images(ndim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shape = (2, 1, *SHAPES[ndim])
    return torch.rand(shape, generator=generator), torch.rand(shape, generator=generator)


@pytest.mark.parametrize("ndim", [2, 3])
def test_ssim_loss_zero_for_identical_positive_otherwise(ndim: int) -> None:
    x, y = random_images(ndim, ndim)
    assert ssim_loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert ssim_loss(x, y).item() > 0.5
    assert ssim_loss(x, 1 - x).item() > 1.0  # anti-correlated: SSIM < 0


@pytest.mark.parametrize("ndim", [2, 3])
def test_ncc_loss_is_minus_one_for_scaled_images(ndim: int) -> None:
    x, y = random_images(ndim, 10 + ndim)
    # MONAI pads with zeros, so an intensity offset is not invariant near the border; a scale is
    assert ncc_loss(x, 2.5 * x).item() == pytest.approx(-1.0, abs=1e-4)
    assert -1.0 < ncc_loss(x, y).item() < -0.0


@pytest.mark.parametrize("loss", [ssim_loss, ncc_loss])
@pytest.mark.parametrize("ndim", [2, 3])
def test_similarity_gradients_flow(loss, ndim: int) -> None:
    x, y = random_images(ndim, 20 + ndim)
    x.requires_grad_()
    loss(x, y).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("ndim", [2, 3])
def test_gradient_loss_known_values(ndim: int) -> None:
    shape = SHAPES[ndim]
    assert gradient_loss(torch.full((2, ndim, *shape), 3.7)).item() == 0.0
    slope = 0.6
    for axis in range(ndim):
        for channel in range(ndim):
            field = torch.zeros(1, ndim, *shape)
            field[0, channel] = slope * identity_grid(shape)[axis]
            # only axis `axis` and channel `channel` of ndim x ndim terms see a difference
            assert gradient_loss(field).item() == pytest.approx(slope**2 / ndim**2)


def test_gradient_loss_gradients_flow() -> None:
    field = torch.randn(2, 3, 6, 7, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    gradient_loss(field).backward()
    assert torch.isfinite(field.grad).all() and field.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        gradient_loss(torch.zeros(1, 1, 8))


def one_hot(labels: torch.Tensor, classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, classes).movedim(-1, 1).float()


@pytest.mark.parametrize("ndim", [2, 3])
def test_dice_loss_values_and_gradients(ndim: int) -> None:
    generator = torch.Generator().manual_seed(ndim)
    labels = torch.randint(0, 3, (2, *SHAPES[ndim]), generator=generator)
    target = one_hot(labels, 3)
    assert dice_loss(target, target).item() == pytest.approx(0.0, abs=1e-4)
    swapped = one_hot(torch.where(labels == 1, 2, torch.where(labels == 2, 1, 0)), 3)  # 1 <-> 2
    assert dice_loss(swapped, target).item() == pytest.approx(1.0, abs=1e-4)
    soft = torch.softmax(torch.randn(target.shape, generator=generator), dim=1).requires_grad_()
    value = dice_loss(soft, target, include_background=True)
    assert 0.0 < value.item() < 1.0
    value.backward()
    assert torch.isfinite(soft.grad).all() and soft.grad.abs().sum() > 0
