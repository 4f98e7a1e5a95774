"""The training objectives, each in one function.

- :func:`diffusion_loss`: DiffuseReg's Eq. 3 (Sec. 2.0.6-2.0.7),
  ``L = ||eps_hat - eps||^2 + lambda1 (1 - SSIM(f, m o phi0_hat)) + lambda2 mean|grad phi0_hat|^2``
  (the paper's recipe).
- :func:`refinement_loss`: one step of a denoiser that refines its current estimate (the
  ``"refine"`` recipe): ``w_T MSE(z(x0_hat), z(target)) + lambda1 (1 - SSIM(f, m o x0_hat))
  + lambda2 mean|grad x0_hat|^2`` with ``x0_hat`` the estimate refined from a noised start.
- :func:`registration_loss`: the teacher's unsupervised loss (similarity + smoothness,
  optionally + soft label Dice).

Fields are ``(B, ndim, *S)`` displacements in voxels; images ``(B, 1, *S)`` in ``[0, 1]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler
from torch import Tensor, nn

from diffusereg.losses import dice_loss, gradient_loss, ncc_loss, ssim_loss
from diffusereg.schedulers import FieldNormalizer, clean_and_noise, denoise, prediction_target
from diffusereg.spatial import warp

__all__ = ["DiffusionLoss", "RefinementLoss", "RegistrationLoss", "diffusion_loss", "refinement_loss",
           "registration_loss"]


@dataclass
class DiffusionLoss:
    """Parts of the diffusion objective (scalars); ``total`` is what is minimised.

    Attributes:
        total: ``noise + similarity_weight * similarity + smoothness_weight * smoothness``.
        noise: ``MSE(eps_hat, eps)`` on the z-scored field (the MSE of the prediction against its
            target for denoisers that predict the clean field or the velocity).
        similarity: ``1 - SSIM(fixed, warp(moving, phi0_hat))``.
        smoothness: mean squared forward difference of ``phi0_hat`` (voxels^2).
        phi0_hat: the predicted clean field ``(B, ndim, *S)`` in voxels (for inspection).
    """

    total: Tensor
    noise: Tensor
    similarity: Tensor
    smoothness: Tensor
    phi0_hat: Tensor

    def parts(self) -> dict[str, Tensor]:
        """The scalar terms by name (what the trainer logs)."""
        return {"loss": self.total, "noise": self.noise, "similarity": self.similarity, "smoothness": self.smoothness}


@dataclass
class RegistrationLoss:
    """Parts of the teacher loss (scalars); ``dice`` is ``None`` without label supervision."""

    total: Tensor
    similarity: Tensor
    smoothness: Tensor
    dice: Tensor | None

    def parts(self) -> dict[str, Tensor]:
        """The scalar terms by name; an absent Dice term is logged as 0."""
        dice = self.dice if self.dice is not None else torch.zeros_like(self.total)
        return {"loss": self.total, "similarity": self.similarity, "smoothness": self.smoothness, "dice": dice}


def diffusion_loss(
    denoiser: nn.Module,
    scheduler: DDPMScheduler | DDIMScheduler,
    fixed: Tensor,
    moving: Tensor,
    phi0: Tensor,
    field_mean: Sequence[float],
    field_std: Sequence[float],
    generator: torch.Generator | None = None,
    similarity_weight: float = 1.0,
    smoothness_weight: float = 0.1,
    ssim_window: int = 9,
    timesteps: Tensor | None = None,
    prediction_type: str = "epsilon",
) -> DiffusionLoss:
    """DiffuseReg's training objective for one batch (paper Eq. 3 and 4).

    ``phi0`` is z-scored per axis, noised with the scheduler's ``add_noise``
    (``phi_t = sqrt(a_t) phi0 + sqrt(1 - a_t) eps``), the denoiser predicts ``eps_hat`` (or, per
    ``prediction_type``, the clean field or the velocity; the first term is then the
    MSE of that prediction), and ``phi0_hat = (phi_t - sqrt(1 - a_t) eps_hat) / sqrt(a_t)``
    (:func:`~diffusereg.schedulers.clean_and_noise`) is de-normalised to voxels (``x * std + mean``)
    before warping and before the smoothness penalty.

    Args:
        denoiser: ``denoiser(sample, timestep, fixed=, moving=).sample`` -> the prediction.
        scheduler: gives ``alphas_cumprod``, ``add_noise`` and ``num_train_timesteps``.
        fixed, moving: ``(B, 1, *S)`` images in ``[0, 1]``.
        phi0: ``(B, ndim, *S)`` teacher field in voxels.
        field_mean, field_std: per-axis statistics of the training fields (voxels).
        generator: draws ``eps`` and ``t`` (on the images' device).
        similarity_weight, smoothness_weight: lambda1 and lambda2 of the paper.
        ssim_window: SSIM window size (paper: 9).
        timesteps: ``(B,)`` integer timesteps to use instead of uniform random ones.
        prediction_type: what the denoiser outputs (its config's ``prediction_type``).
    """
    normalizer = FieldNormalizer(tuple(field_mean), tuple(field_std))
    phi0_z = normalizer.normalize(phi0.float())
    batch = phi0.shape[0]
    if timesteps is None:
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,),
                                  generator=generator, device=phi0.device)
    noise = torch.randn(phi0_z.shape, generator=generator, device=phi0.device)
    phi_t = scheduler.add_noise(phi0_z, noise, timesteps)
    prediction = denoiser(phi_t, timesteps, fixed=fixed, moving=moving).sample.float()

    alpha_bar = scheduler.alphas_cumprod.to(phi0.device)[timesteps].reshape(batch, *([1] * (phi0.ndim - 1)))
    phi0_hat_z, _ = clean_and_noise(prediction, phi_t, alpha_bar, prediction_type)
    phi0_hat = normalizer.denormalize(phi0_hat_z)
    noise_term = F.mse_loss(prediction, prediction_target(phi0_z, noise, alpha_bar, prediction_type))
    similarity = ssim_loss(fixed.float(), warp(moving.float(), phi0_hat), kernel_size=ssim_window)
    smoothness = gradient_loss(phi0_hat)
    total = noise_term + similarity_weight * similarity + smoothness_weight * smoothness
    return DiffusionLoss(total=total, noise=noise_term, similarity=similarity, smoothness=smoothness, phi0_hat=phi0_hat)


@dataclass
class RefinementLoss:
    """Parts of the refinement objective (scalars); ``total`` is what is minimised.

    Attributes:
        total: ``target_weight * target + similarity_weight * similarity + smoothness_weight * smoothness``.
        target: ``MSE(z(x0_hat), z(target))`` on the z-scored fields.
        similarity: ``1 - SSIM(fixed, warp(moving, x0_hat))``.
        smoothness: mean squared forward difference of ``x0_hat`` (voxels^2).
        x0_hat: the refined estimate ``(B, ndim, *S)`` in voxels (for inspection).
    """

    total: Tensor
    target: Tensor
    similarity: Tensor
    smoothness: Tensor
    x0_hat: Tensor

    def parts(self) -> dict[str, Tensor]:
        """The scalar terms by name (what the trainer logs)."""
        return {"loss": self.total, "target": self.target, "similarity": self.similarity, "smoothness": self.smoothness}


def refinement_loss(
    denoiser: nn.Module,
    config: Mapping[str, Any],
    scheduler: DDPMScheduler | DDIMScheduler,
    normalizer: FieldNormalizer,
    fixed: Tensor,
    moving: Tensor,
    estimate: Tensor,
    target: Tensor,
    proposal: nn.Module | None = None,
    generator: torch.Generator | None = None,
    target_weight: float = 1.0,
    similarity_weight: float = 1.0,
    smoothness_weight: float = 0.05,
    ssim_window: int = 9,
    timesteps: Tensor | None = None,
    noise: Tensor | None = None,
) -> RefinementLoss:
    """One training step of a denoiser that refines its estimate (``prediction_type="increment"``).

    The sampler's state is the ``target`` field, z-scored and noised to a uniform random timestep
    with the scheduler's ``add_noise`` (so the state carries the field the loss asks for); the
    denoiser reads it with the start ``estimate`` (what the previous sampling step would hold:
    zeros, a one-shot field, the denoiser's own earlier estimate) and the moving image warped by
    that estimate, and its refined estimate ``x0_hat`` (:func:`~diffusereg.schedulers.denoise`) is
    scored against the images (SSIM, window ``ssim_window``), for smoothness, and against ``target``.

    Args:
        denoiser: an ``"increment"`` denoiser (possibly wrapped for distributed training).
        config: its config.
        scheduler: gives ``alphas_cumprod``, ``add_noise`` and ``num_train_timesteps``.
        normalizer: the field z-scoring of the denoiser's config.
        fixed, moving: ``(B, 1, *S)`` images in ``[0, 1]``.
        estimate: ``(B, ndim, *S)`` start, voxels.
        target: ``(B, ndim, *S)`` field the state is noised from and the estimate is pulled
            towards (e.g. the teacher applied recursively), voxels.
        proposal: the teacher, for a denoiser whose config says ``proposal: teacher``.
        generator: draws the timesteps and the noise.
        target_weight, similarity_weight, smoothness_weight: the weights of the three terms.
        ssim_window: SSIM window size.
        timesteps: ``(B,)`` integer timesteps to use instead of uniform random ones.
        noise: ``(B, ndim, *S)`` noise (z-scored units) to use instead of a standard normal draw,
            e.g. the noise a sampler carries at ``timesteps``.
    """
    batch = estimate.shape[0]
    if timesteps is None:
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator,
                                  device=estimate.device)
    if noise is None:
        noise = torch.randn(estimate.shape, generator=generator, device=estimate.device)
    noisy = scheduler.add_noise(normalizer.normalize(target), noise, timesteps)
    alpha_bar = scheduler.alphas_cumprod.to(estimate.device)[timesteps].reshape(batch, *([1] * (estimate.ndim - 1)))
    x0_hat = normalizer.denormalize(denoise(denoiser, config, noisy, timesteps, alpha_bar, normalizer, estimate=estimate,
                                            fixed=fixed, moving=moving, proposal=proposal).clean)
    target_term = F.mse_loss(normalizer.normalize(x0_hat), normalizer.normalize(target))
    similarity = ssim_loss(fixed.float(), warp(moving.float(), x0_hat), kernel_size=ssim_window)
    smoothness = gradient_loss(x0_hat)
    total = target_weight * target_term + similarity_weight * similarity + smoothness_weight * smoothness
    return RefinementLoss(total=total, target=target_term, similarity=similarity, smoothness=smoothness,
                          x0_hat=x0_hat)


def registration_loss(
    field: Tensor,
    fixed: Tensor,
    moving: Tensor,
    similarity: Literal["ssim", "ncc"] = "ssim",
    similarity_window: int = 9,
    smoothness_weight: float = 1.0,
    dice_weight: float = 0.0,
    fixed_labels: Tensor | None = None,
    moving_labels: Tensor | None = None,
    num_labels: int = 4,
) -> RegistrationLoss:
    """The teacher's loss for a predicted field: ``sim(f, m o u) + w_s mean|grad u|^2 [+ w_d Dice]``.

    Args:
        field: ``(B, ndim, *S)`` predicted displacement in voxels.
        fixed, moving: ``(B, 1, *S)`` images in ``[0, 1]``.
        similarity: ``"ssim"`` (``1 - SSIM``) or ``"ncc"`` (negative squared local NCC).
        similarity_window: window size of either similarity.
        smoothness_weight: weight of :func:`diffusereg.losses.gradient_loss`.
        dice_weight: weight of the soft Dice loss between the warped one-hot moving labels
            (bilinear) and the one-hot fixed labels; 0 keeps the loss unsupervised.
        fixed_labels, moving_labels: ``(B, 1, *S)`` integer labels, needed when ``dice_weight > 0``.
        num_labels: number of label values (one-hot channels).
    """
    warped = warp(moving.float(), field)
    if similarity == "ssim":
        similarity_term = ssim_loss(fixed.float(), warped, kernel_size=similarity_window)
    elif similarity == "ncc":
        similarity_term = ncc_loss(fixed.float(), warped, kernel_size=similarity_window)
    else:
        raise ValueError(f"similarity must be 'ssim' or 'ncc', got {similarity!r}")
    smoothness = gradient_loss(field)
    total = similarity_term + smoothness_weight * smoothness
    dice = None
    if dice_weight > 0:
        if fixed_labels is None or moving_labels is None:
            raise ValueError("dice_weight > 0 needs fixed_labels and moving_labels")
        dice = dice_loss(warp(_one_hot(moving_labels, num_labels), field), _one_hot(fixed_labels, num_labels))
        total = total + dice_weight * dice
    return RegistrationLoss(total=total, similarity=similarity_term, smoothness=smoothness, dice=dice)


def _one_hot(labels: Tensor, num_labels: int) -> Tensor:
    """``(B, 1, *S)`` integer labels -> ``(B, num_labels, *S)`` float one-hot maps."""
    return F.one_hot(labels[:, 0].long(), num_labels).movedim(-1, 1).float()
