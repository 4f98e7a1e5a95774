"""Training losses: image similarity (SSIM, local NCC), field smoothness, soft Dice.

Images are ``(B, C, *S)`` with intensities in ``[0, 1]``, fields ``(B, ndim, *S)`` in
voxels; ``S`` is 2D or 3D and the number of spatial axes is read from the input. Every
function returns a scalar tensor that gradients flow through.
"""

from __future__ import annotations

import torch
from monai.losses import DiceLoss, LocalNormalizedCrossCorrelationLoss, SSIMLoss

__all__ = ["dice_loss", "gradient_loss", "ncc_loss", "ssim_loss"]


def _spatial_dims(image: torch.Tensor) -> int:
    spatial_dims = image.ndim - 2
    if spatial_dims not in (2, 3):
        raise ValueError(f"expected (B, C, H, W) or (B, C, D, H, W), got {tuple(image.shape)}")
    return spatial_dims


def ssim_loss(x: torch.Tensor, y: torch.Tensor, kernel_size: int = 9, data_range: float = 1.0) -> torch.Tensor:
    """``1 - SSIM(x, y)`` (the paper's similarity loss), batch mean.

    :class:`monai.losses.SSIMLoss` with a Gaussian window of ``kernel_size`` (sigma 1.5),
    ``k1 = 0.01``, ``k2 = 0.03``, evaluated on valid windows only (every spatial size must be
    at least ``kernel_size``).

    Args:
        x, y: ``(B, C, *S)`` images.
        kernel_size: window size per axis.
        data_range: intensity range (1.0 for ``[0, 1]`` images).
    Returns:
        Scalar in ``[0, 2]``; 0 for identical images.
    """
    loss = SSIMLoss(spatial_dims=_spatial_dims(x), data_range=data_range, win_size=kernel_size)
    return loss(x, y)


def ncc_loss(x: torch.Tensor, y: torch.Tensor, kernel_size: int = 9) -> torch.Tensor:
    """Negative squared local normalised cross-correlation, mean over voxels and batch.

    :class:`monai.losses.LocalNormalizedCrossCorrelationLoss` with a rectangular window. MONAI
    pads with zeros, so within ``kernel_size // 2`` voxels of the border the loss is invariant
    to intensity scaling but not to an intensity offset.

    Args:
        x, y: ``(B, C, *S)`` images.
        kernel_size: window size per axis (odd).
    Returns:
        Scalar in ``[-1, 0]``; ``-1`` when ``x`` and ``y`` are locally linearly related.
    """
    loss = LocalNormalizedCrossCorrelationLoss(spatial_dims=_spatial_dims(x), kernel_size=kernel_size)
    return loss(x, y)


def gradient_loss(field: torch.Tensor) -> torch.Tensor:
    """Smoothness ``L_reg``: mean over axes ``a`` of the mean squared forward difference
    ``(u[k + e_a] - u[k])**2`` over all channels and voxels (as in the paper's code).

    Args:
        field: ``(B, ndim, *S)`` in voxels.
    Returns:
        Scalar, voxels squared; 0 for a constant field.
    """
    spatial_dims = _spatial_dims(field)
    per_axis = [torch.diff(field, dim=dim).square().mean() for dim in range(2, 2 + spatial_dims)]
    return torch.stack(per_axis).mean()


def dice_loss(pred: torch.Tensor, target: torch.Tensor, include_background: bool = False) -> torch.Tensor:
    """Soft Dice loss ``1 - Dice`` between one-hot (or probability) label maps.

    :class:`monai.losses.DiceLoss` with ``soft_label=True`` (targets may be non-binary, e.g.
    bilinearly warped one-hot labels), mean over classes and batch.

    Args:
        pred, target: ``(B, K, *S)`` class probabilities, channel 0 the background.
        include_background: also score channel 0.
    Returns:
        Scalar in ``[0, 1]``; 0 for identical binary maps.
    """
    loss = DiceLoss(include_background=include_background, soft_label=True)
    return loss(pred, target)
