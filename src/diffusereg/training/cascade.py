"""Stage 2 with the cascade's recipe (``loss.recipe: refine``): a denoiser that refines its own estimate.

Every sampling step of an ``"increment"`` denoiser registers the fixed image and the moving image
warped by the running estimate and composes what it predicts onto that estimate
(:func:`~diffusereg.schedulers.denoise`). :class:`CascadeStage` trains such a step from the
starts a sampler meets (zero, a one-shot field, another pair's field, the sampler's own state)
with :func:`~diffusereg.training.objective.refinement_loss`; the sampler's state is the target
noised to the step's timestep (see :class:`~diffusereg.training.config.DiffusionLossConfig`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from diffusereg.schedulers import Denoised, default_scheduler, denoise, increment_fraction
from diffusereg.training.config import DiffusionConfig
from diffusereg.training.diffusion import DiffusionStage
from diffusereg.training.objective import RefinementLoss, refinement_loss

__all__ = ["CascadeStage"]


class CascadeStage(DiffusionStage):
    """The refine recipe: an ``"increment"`` denoiser trained to refine the estimates a sampler holds."""

    recipe = "refine"
    loss_names = ("target", "similarity", "smoothness")

    def __init__(self, config: DiffusionConfig) -> None:
        super().__init__(config)
        self.sampler = default_scheduler("ddim", "increment")  # the sampler's timesteps (loss.own_schedules)

    def loss(self, model: nn.Module, batch: dict[str, Any], generator: torch.Generator,
             progress: float) -> dict[str, Tensor]:
        return self._refinement_loss(model, batch["fixed"], batch["moving"], generator, progress).parts()

    def _refinement_loss(self, model: nn.Module, fixed: Tensor, moving: Tensor, generator: torch.Generator,
                         progress: float) -> RefinementLoss:
        """The refine recipe on one batch: start from a mix of estimates, pull towards the teacher
        applied recursively, with the target weight at ``progress`` of the run."""
        loss = self.config.loss
        with torch.no_grad():
            one_shot = self.teacher(fixed, moving)
            target = self._target(fixed, moving, one_shot, generator)
            one_shot = one_shot.float()
            start, timesteps, noise = self._starts(model, fixed, moving, one_shot, generator)
        weight = loss.target_weight + (loss.target_weight_final - loss.target_weight) * progress
        return refinement_loss(model, self.model_config, self.scheduler, self.normalizer, fixed, moving, start,
                               target, proposal=self.proposal, generator=generator, target_weight=weight,
                               similarity_weight=loss.similarity_weight, smoothness_weight=loss.smoothness_weight,
                               ssim_window=loss.ssim_window, timesteps=timesteps, noise=noise)

    def _target(self, fixed: Tensor, moving: Tensor, one_shot: Tensor, generator: torch.Generator) -> Tensor:
        """Each pair's target (voxels): the teacher applied recursively, as many times as one of
        ``loss.target_passes`` drawn per pair says (several counts: a target with a spread, largest
        where the recursion has not settled)."""
        choices = self.config.loss.target_passes
        fields = self.teacher.recursive(fixed, moving, max(choices), one_shot=one_shot)
        drawn = torch.tensor(choices, device=fixed.device)[
            torch.randint(len(choices), (fixed.shape[0],), generator=generator, device=fixed.device)]
        target = torch.zeros_like(one_shot)
        for passes, field in enumerate(fields, start=1):
            target = torch.where((drawn == passes).reshape(-1, *([1] * (field.ndim - 1))), field, target)
        return target.float()

    def _starts(self, model: nn.Module, fixed: Tensor, moving: Tensor, one_shot: Tensor,
                generator: torch.Generator) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """A start estimate per pair (voxels), drawn as ``loss`` says: zero, the teacher's field
        scaled by a factor in [0.3, 1.3], another pair's teacher field, or the denoiser's own
        estimate (:meth:`_own_estimates`, or :meth:`_rollouts` with ``loss.own_schedules``).

        Returns ``(start, timesteps, noise)``: with ``own_schedules``, the step to train and the
        noise around the start, ``(B,)`` and ``(B, ndim, *S)`` (uniform and standard normal draws
        where the start is not a rollout); else None and None (:func:`refinement_loss` draws them)."""
        loss, device = self.config.loss, fixed.device
        draw = torch.rand(fixed.shape[0], generator=generator, device=device)
        bounds = torch.tensor([loss.zero_start, loss.teacher_start, loss.other_start], device=device).cumsum(0)
        kind = torch.bucketize(draw, bounds, right=True)  # 0 zero, 1 teacher, 2 other pair's, 3 own
        shape = (-1, *([1] * (one_shot.ndim - 1)))
        scale = 0.3 + torch.rand(fixed.shape[0], generator=generator, device=device).reshape(shape)
        start = torch.zeros_like(one_shot)
        start = torch.where((kind == 1).reshape(shape), scale * one_shot, start)
        start = torch.where((kind == 2).reshape(shape), one_shot.roll(1, dims=0), start)
        own = kind == 3
        if not loss.own_schedules:
            if own.any():
                start[own] = self._own_estimates(model, fixed[own], moving[own], generator)
            return start, None, None
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (fixed.shape[0],), generator=generator,
                                  device=device)
        noise = torch.randn(start.shape, generator=generator, device=device)
        if own.any():
            start[own], timesteps[own], noise[own] = self._rollouts(model, fixed[own], moving[own], generator)
        return start, timesteps, noise

    def _rollouts(self, model: nn.Module, fixed: Tensor, moving: Tensor,
                  generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """The DDIM sampler's state after the first k steps of its own N-step schedule from noise
        (N drawn from ``loss.own_schedules``, k from 1 .. N - 1): the estimate (voxels), the
        timestep of step k + 1 ``(B,)`` and the noise the sampler carries to it (z-scored units)."""
        device, schedules = fixed.device, self.config.loss.own_schedules
        steps = schedules[int(torch.randint(len(schedules), (1,), generator=generator, device=device))]
        count = int(torch.randint(1, steps, (1,), generator=generator, device=device))
        self.sampler.set_timesteps(steps, device=device)
        timesteps = self.sampler.timesteps
        estimate = torch.zeros(fixed.shape[0], fixed.ndim - 2, *fixed.shape[2:], device=device)
        noisy = torch.randn(estimate.shape, generator=generator, device=device)  # pure noise, where sampling starts
        fraction = increment_fraction(self.model_config, steps)
        for step, t in enumerate(timesteps[:count]):
            if step:
                noisy = self.scheduler.add_noise(self.normalizer.normalize(estimate), noise, t[None])
            denoised = self._refine(model, noisy, t, estimate, fixed, moving, fraction)
            estimate, noise = self.normalizer.denormalize(denoised.clean), denoised.noise
        return estimate, timesteps[count].expand(fixed.shape[0]), noise

    def _own_estimates(self, model: nn.Module, fixed: Tensor, moving: Tensor, generator: torch.Generator) -> Tensor:
        """The denoiser's estimate after 1 to 3 sampling steps from noise, at decreasing random
        timesteps in [400, 2000) (what a later sampling step starts from)."""
        device = fixed.device
        count = int(torch.randint(1, 4, (1,), generator=generator, device=device))
        steps = torch.randint(400, self.scheduler.config.num_train_timesteps, (count,), generator=generator,
                              device=device).sort(descending=True).values
        estimate = torch.zeros(fixed.shape[0], fixed.ndim - 2, *fixed.shape[2:], device=device)
        for t in steps:
            noise = torch.randn(estimate.shape, generator=generator, device=device)
            noisy = self.scheduler.add_noise(self.normalizer.normalize(estimate), noise, t[None])
            estimate = self.normalizer.denormalize(self._refine(model, noisy, t, estimate, fixed, moving).clean)
        return estimate

    def _refine(self, model: nn.Module, noisy: Tensor, timestep: Tensor, estimate: Tensor, fixed: Tensor,
                moving: Tensor, fraction: float = 1.0) -> Denoised:
        """One sampling step of ``model`` (no guidance) from the z-scored ``noisy`` field at the scalar
        ``timestep``, refining ``estimate`` (voxels) on the moving image warped by it by ``fraction``
        of the increment (:func:`~diffusereg.schedulers.increment_fraction`)."""
        alpha_bar = self.scheduler.alphas_cumprod.to(noisy.device)[timestep]
        return denoise(model, self.model_config, noisy, timestep, alpha_bar, self.normalizer, estimate=estimate,
                       fixed=fixed, moving=moving, proposal=self.proposal, fraction=fraction)
