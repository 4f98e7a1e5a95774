"""All noise arithmetic of DiffuseReg in one home: the schedule, the parametrisations, the field normaliser.

- :func:`default_scheduler`: the paper's schedule (linear betas 1e-6 .. 1e-2 over 2000 steps) as a
  diffusers ``DDIMScheduler`` or ``DDPMScheduler``, for the prediction type of a denoiser.
- :func:`clean_and_noise` / :func:`prediction_target`: what a denoiser's output means
  (:data:`~diffusereg.models.PREDICTION_TYPES`), in both directions; :func:`denoise`: one call of
  a denoiser read as the clean-field estimate, for every prediction type (an ``"increment"``
  denoiser refines the current estimate: :func:`refined_estimate`, by the share of each step that
  :func:`increment_fraction` gives).
- :class:`FieldNormalizer` (defined beside the denoiser interface, which also uses it): the
  per-axis z-scoring of displacement fields whose statistics a denoiser's config carries
  (``field_mean``, ``field_std``).

A noisy field is ``noisy = sqrt(a) x0 + sqrt(1 - a) eps`` with ``a`` the cumulative signal
fraction ``alphas_cumprod[t]``, all in z-scored units.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import Tensor

from diffusereg.models import PREDICTION_TYPES, DenoiserCondition, RegistrationNet
from diffusereg.models.interface import FieldNormalizer
from diffusereg.spatial import compose, integrate_velocity, warp

__all__ = ["Denoised", "FieldNormalizer", "clean_and_noise", "default_scheduler", "denoise", "increment_fraction",
           "prediction_target", "refined_estimate", "scheduler_of_kind", "scheduler_prediction_type"]

SCHEDULER_KINDS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}


def scheduler_prediction_type(prediction_type: str) -> str:
    """What a scheduler is handed for a denoiser of ``prediction_type``: the same quantity, and the
    clean field (``"sample"``) for one that refines an estimate (``"increment"``)."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    return "sample" if prediction_type == "increment" else prediction_type


def default_scheduler(kind: str = "ddim", prediction_type: str = "epsilon") -> DDIMScheduler | DDPMScheduler:
    """The paper's noise schedule: linear betas 1e-6 .. 1e-2 over 2000 steps, no sample clipping
    (fields are z-scored, not bounded).

    Args:
        kind: ``"ddim"`` (deterministic, "trailing" spacing so that one step starts from the
            noisiest timestep) or ``"ddpm"`` (ancestral sampling).
        prediction_type: what the denoiser the scheduler works with predicts (its config's
            ``prediction_type``); the pipeline hands the scheduler that quantity (the clean field
            for ``"increment"``, see :func:`scheduler_prediction_type`).
    """
    common = dict(num_train_timesteps=2000, beta_start=1e-6, beta_end=1e-2, beta_schedule="linear",
                  prediction_type=scheduler_prediction_type(prediction_type), timestep_spacing="trailing",
                  clip_sample=False)
    if kind == "ddim":
        return DDIMScheduler(**common, set_alpha_to_one=True)
    if kind == "ddpm":
        return DDPMScheduler(**common, variance_type="fixed_small")
    raise ValueError(f"scheduler must be 'ddim' or 'ddpm', got {kind!r}")


def scheduler_of_kind(scheduler: DDIMScheduler | DDPMScheduler, kind: str) -> DDIMScheduler | DDPMScheduler:
    """``scheduler`` itself if it is of ``kind`` (``"ddim"`` or ``"ddpm"``), else a scheduler of
    that kind built from its config (same schedule, same prediction type)."""
    if kind not in SCHEDULER_KINDS:
        raise ValueError(f"scheduler must be 'ddim' or 'ddpm', got {kind!r}")
    wanted = SCHEDULER_KINDS[kind]
    return scheduler if isinstance(scheduler, wanted) else wanted.from_config(scheduler.config)


def clean_and_noise(prediction: Tensor, noisy: Tensor, alpha_bar: Tensor, prediction_type: str) -> tuple[Tensor, Tensor]:
    """Clean-field and noise estimates from a denoiser's output.

    Args:
        prediction: the denoiser's output ``(B, ndim, *S)``.
        noisy: the field it was given, same shape (z-scored).
        alpha_bar: ``a`` at the timestep, broadcastable to the field.
        prediction_type: one of :data:`PREDICTION_TYPES`.

    Returns:
        ``(x0, eps)``, both z-scored like ``noisy``.
    """
    signal, spread = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if prediction_type == "epsilon":
        return (noisy - spread * prediction) / signal, prediction
    if prediction_type == "sample":
        return prediction, (noisy - signal * prediction) / spread
    if prediction_type == "v_prediction":
        return signal * noisy - spread * prediction, spread * noisy + signal * prediction
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def prediction_target(clean: Tensor, noise: Tensor, alpha_bar: Tensor, prediction_type: str) -> Tensor:
    """What a denoiser of ``prediction_type`` outputs for ``noisy = sqrt(a) clean + sqrt(1 - a) noise``
    (the inverse of :func:`clean_and_noise`); all tensors z-scored, ``alpha_bar`` broadcastable."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return clean
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * clean
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def increment_fraction(config: Mapping[str, Any], num_inference_steps: int) -> float:
    """The share of its predicted increment that each step of a ``num_inference_steps``-step
    sampling run applies, for a denoiser with this ``config``: ``min(1, increment_passes /
    num_inference_steps)``, or 1 where ``increment_passes`` is None or absent (whole increments)."""
    passes = config.get("increment_passes")
    return 1.0 if passes is None else min(1.0, passes / num_inference_steps)


def refined_estimate(prediction: Tensor, estimate: Tensor, normalizer: FieldNormalizer,
                     integration_steps: int, fraction: float = 1.0) -> Tensor:
    """The clean field an ``"increment"`` denoiser predicts: its current ``estimate`` (voxels,
    ``(B, ndim, *S)``) composed with the diffeomorphic increment whose z-scored stationary
    velocity is ``prediction``, ``fraction`` of it: ``compose(estimate, exp(fraction *
    denormalize(prediction)))``, voxels."""
    increment = integrate_velocity(fraction * normalizer.denormalize(prediction), integration_steps)
    return compose(estimate, increment)


@dataclass(frozen=True)
class Denoised:
    """One denoiser call read in every parametrisation: its raw ``prediction`` and the z-scored
    clean-field and noise estimates ``clean`` and ``noise`` that go with the noisy field."""

    prediction: Tensor
    clean: Tensor
    noise: Tensor


def denoise(denoiser: torch.nn.Module, config: Mapping[str, Any], noisy: Tensor, timestep: Tensor, alpha_bar: Tensor,
            normalizer: FieldNormalizer, estimate: Tensor | None = None, condition: DenoiserCondition | None = None,
            fixed: Tensor | None = None, moving: Tensor | None = None, proposal: RegistrationNet | None = None,
            fraction: float = 1.0) -> Denoised:
    """Call ``denoiser`` (whose config is ``config``) on the z-scored noisy field ``noisy``
    ``(B, ndim, *S)`` at ``timestep`` (cumulative signal fraction ``alpha_bar``, broadcastable),
    given a ``condition`` (from ``encode_condition``) or the ``fixed`` and ``moving`` images
    ``(B, 1, *S)``, and read what it predicts.

    A denoiser of ``prediction_type="increment"`` refines ``estimate`` (voxels; zeros at the first
    step from noise), the one place where the cascade happens: ``moving`` (always given, unwarped)
    is warped by the estimate and the denoiser conditioned on that warped image (only the moving
    image's encoder runs again when a ``condition`` is given); a self-conditioned one also reads
    ``z(estimate)``, any other the noise around it, ``noisy - sqrt(a) z(estimate)``. With a
    ``proposal`` network (the teacher, for a denoiser whose config says ``proposal: teacher``) the
    velocity is that network's on the fixed and warped images plus the denoiser's residual. The
    clean field is :func:`refined_estimate` with ``fraction`` of the increment (a sampling step's
    share, :func:`increment_fraction`; 1: the whole clean-field prediction, as the training loss
    scores it). Every other type reads as :func:`clean_and_noise` says.
    """
    prediction_type = config["prediction_type"]
    if prediction_type != "increment":
        images = {} if condition is not None else {"fixed": fixed, "moving": moving}
        prediction = _call(denoiser, noisy, timestep, condition, images)
        return Denoised(prediction, *clean_and_noise(prediction, noisy, alpha_bar, prediction_type))
    if estimate is None or moving is None:
        raise ValueError("an increment denoiser refines an estimate: give estimate (zeros from noise) and moving")
    if (config.get("proposal") is None) != (proposal is None):
        raise ValueError(f"the denoiser's proposal is {config.get('proposal')!r}: give the teacher as proposal "
                         "exactly when it is 'teacher'")
    warped = warp(moving, estimate)
    fixed_image = fixed if condition is None else condition.fixed
    inputs: dict[str, Tensor] = {}
    if condition is None:
        inputs.update(fixed=fixed, moving=warped)
    else:
        condition = denoiser.with_moving(condition, warped.to(condition.fixed.dtype))
    sample = noisy
    if config.get("self_conditioning"):
        inputs["estimate"] = normalizer.normalize(estimate)
    else:
        sample = noisy - alpha_bar.sqrt() * normalizer.normalize(estimate)
    prediction = _call(denoiser, sample, timestep, condition, inputs)
    if proposal is not None:
        parameter = next(proposal.parameters())
        velocity = proposal.velocity(fixed_image.to(parameter), warped.to(parameter)).float()
        prediction = prediction + normalizer.normalize(velocity)
    clean = normalizer.normalize(refined_estimate(prediction, estimate, normalizer, config["integration_steps"],
                                                    fraction))
    return Denoised(prediction, *clean_and_noise(clean, noisy, alpha_bar, "sample"))


def _call(denoiser: torch.nn.Module, sample: Tensor, timestep: Tensor, condition: DenoiserCondition | None,
          inputs: Mapping[str, Tensor]) -> Tensor:
    """``denoiser``'s prediction (float32) for ``sample`` at ``timestep``, its inputs cast to its weights' dtype."""
    dtype = next(denoiser.parameters()).dtype
    return denoiser(sample.to(dtype), timestep.expand(sample.shape[0]), condition=condition,
                    **{name: x.to(dtype) for name, x in inputs.items()}).sample.float()
