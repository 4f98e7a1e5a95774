"""What every denoiser takes and returns, and the one place where its inputs are checked.

A denoiser sees a noisy z-scored displacement field ``sample`` of shape ``(B, ndim, *S)``, the
fixed and moving images ``(B, 1, *S)`` (intensities in ``[0, 1]``) and the diffusion timestep,
and predicts, as its config's ``prediction_type`` says (:data:`PREDICTION_TYPES`), the noise in
``sample`` (``"epsilon"``, the paper's choice), the clean field itself (``"sample"``) or the
velocity ``v = sqrt(a) eps - sqrt(1 - a) x0`` (``"v_prediction"``);
:func:`diffusereg.schedulers.clean_and_noise` turns any of them into the clean-field and noise
estimates. Image-only work is split off into
``encode_condition`` so that a sampling loop runs it once per registration, not once per step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from diffusers.utils import BaseOutput
from torch import Tensor

#: Per-stage, per-block image features: ``features[stage][block]`` is a tuple with one
#: channels-last tensor ``(B, *s, C)`` per conditioning image (fixed first, then moving).
BlockFeatures = tuple[tuple[tuple[Tensor, ...], ...], ...]


PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "increment")
"""What a denoiser's output means: the noise, the clean (z-scored) field, the velocity
``sqrt(a) eps - sqrt(1 - a) x0``, or a refinement of the current estimate ``u`` of the field:
the z-scored stationary velocity of a diffeomorphic increment ``d``, the clean field being
``u o (id + d)`` (the moving image it is conditioned on is then the one warped by ``u``)."""


@dataclass
class DenoiserOutput(BaseOutput):
    """Output of a denoiser.

    Attributes:
        sample: the prediction (see the model's ``prediction_type``), ``(B, ndim, *S)``, same
            shape as the input field.
    """

    sample: Tensor


@dataclass(frozen=True)
class DenoiserCondition:
    """Everything a denoiser needs from the image pair, computed once by ``encode_condition``.

    Attributes:
        fixed: fixed image ``(B, 1, *S)``, intensities in ``[0, 1]``.
        moving: moving image ``(B, 1, *S)``.
        features: image-encoder features ``features[stage][block] = (fixed_feat, moving_feat)``,
            each ``(B, *s, C)`` channels-last; empty for models that only use the images.
        estimate: for a self-conditioned denoiser, the z-scored field estimate ``(B, ndim, *S)``
            of the previous sampling step (the one ``moving`` was warped by); None: zeros.
    """

    fixed: Tensor
    moving: Tensor
    features: BlockFeatures = ()
    estimate: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.fixed.shape[0]

    def expand(self, batch_size: int) -> DenoiserCondition:
        """Broadcast a batch-1 condition to ``batch_size`` (e.g. several samples of one pair)."""
        if batch_size == self.batch_size:
            return self
        if self.batch_size != 1:
            raise ValueError(f"cannot broadcast a condition of batch {self.batch_size} to batch {batch_size}")

        def grow(t: Tensor) -> Tensor:
            return t.expand(batch_size, *t.shape[1:])

        features = tuple(tuple(tuple(grow(t) for t in block) for block in stage) for stage in self.features)
        estimate = None if self.estimate is None else grow(self.estimate)
        return replace(self, fixed=grow(self.fixed), moving=grow(self.moving), features=features, estimate=estimate)


@dataclass(frozen=True)
class FieldNormalizer:
    """Per-axis z-scoring of displacement fields ``(B, ndim, *S)``: ``z = (u - mean) / std``.

    Attributes:
        mean, std: one value per field channel, voxels (array-axis order).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> FieldNormalizer:
        """The statistics a denoiser's config carries (``field_mean``, ``field_std``)."""
        return cls(tuple(config["field_mean"]), tuple(config["field_std"]))

    def _shaped(self, values: Sequence[float], like: Tensor) -> Tensor:
        shape = (1, len(values)) + (1,) * (like.ndim - 2)
        return torch.tensor(values, dtype=like.dtype, device=like.device).reshape(shape)

    def normalize(self, field: Tensor) -> Tensor:
        """Voxels -> z-scored units."""
        return (field - self._shaped(self.mean, field)) / self._shaped(self.std, field)

    def denormalize(self, field: Tensor) -> Tensor:
        """z-scored units -> voxels."""
        return field * self._shaped(self.std, field) + self._shaped(self.mean, field)


class DenoiserForward:
    """The ``forward`` every denoiser shares: take the images or a condition, check the field
    against it, broadcast timestep and condition to the batch, then ``predict``."""

    def forward(
        self,
        sample: Tensor,
        timestep: Tensor | float | int,
        fixed: Tensor | None = None,
        moving: Tensor | None = None,
        condition: DenoiserCondition | None = None,
        estimate: Tensor | None = None,
        return_dict: bool = True,
    ) -> DenoiserOutput | tuple[Tensor]:
        """Predict, per the config's ``prediction_type``, the noise in ``sample``, the clean field or
        the velocity.

        Args:
            sample: noisy z-scored field ``(B, ndim, *S)``.
            timestep: diffusion step, scalar or ``(B,)``.
            fixed, moving: images ``(B, 1, *S)``; or instead
            condition: ``encode_condition(fixed, moving)`` (batch B or 1), computed once per pair.
            estimate: the z-scored field estimate ``(B, ndim, *S)`` a self-conditioned denoiser
                reads beside ``sample`` (put into the condition; see :class:`DenoiserCondition`).
            return_dict: return :class:`DenoiserOutput` (True) or a 1-tuple.

        Returns:
            The prediction ``(B, ndim, *S)`` as ``DenoiserOutput.sample`` or a 1-tuple.
        """
        condition = resolve_condition(condition, fixed, moving, self.encode_condition)
        if estimate is not None:
            condition = replace(condition, estimate=estimate)
        timestep, condition = check_denoiser_inputs(sample, timestep, condition)
        prediction = self.predict(sample, timestep, condition)
        return DenoiserOutput(sample=prediction) if return_dict else (prediction,)

    def with_moving(self, condition: DenoiserCondition, moving: Tensor) -> DenoiserCondition:
        """``condition`` with another moving image ``(B, 1, *S)`` (for a denoiser that refines an
        estimate: the moving image warped by it); what depends on the fixed image alone is kept."""
        return self.encode_condition(condition.fixed, moving)


def check_image_pair(fixed: Tensor, moving: Tensor, spatial_dims: int, multiple: int) -> None:
    """Check that ``fixed`` and ``moving`` are ``(B, 1, *S)`` with each of ``S`` a multiple of ``multiple``."""
    for name, image in (("fixed", fixed), ("moving", moving)):
        if image.ndim != spatial_dims + 2 or image.shape[1] != 1:
            raise ValueError(
                f"{name} must have shape (B, 1, *S) with {spatial_dims} spatial dims, got {tuple(image.shape)}"
            )
    if fixed.shape != moving.shape:
        raise ValueError(f"fixed {tuple(fixed.shape)} and moving {tuple(moving.shape)} must have the same shape")
    check_spatial_multiple(fixed.shape[2:], multiple)


def check_spatial_multiple(spatial_shape: Sequence[int], multiple: int) -> None:
    """Raise a ``ValueError`` naming ``multiple`` unless every size in ``spatial_shape`` is a multiple of it."""
    if any(s % multiple for s in spatial_shape):
        raise ValueError(
            f"every spatial size must be a multiple of {multiple} for this model, got {tuple(spatial_shape)}; "
            f"pad or crop the images (e.g. to {tuple(-(-s // multiple) * multiple for s in spatial_shape)})"
        )


def resolve_condition(
    condition: DenoiserCondition | None,
    fixed: Tensor | None,
    moving: Tensor | None,
    encode: Callable[[Tensor, Tensor], DenoiserCondition],
) -> DenoiserCondition:
    """Return ``condition`` or ``encode(fixed, moving)``; exactly one of the two must be given."""
    if condition is not None:
        if fixed is not None or moving is not None:
            raise ValueError("pass either `condition` or `fixed` and `moving`, not both")
        return condition
    if fixed is None or moving is None:
        raise ValueError("pass `fixed` and `moving` images, or a `condition` from `encode_condition`")
    return encode(fixed, moving)


def check_denoiser_inputs(
    sample: Tensor, timestep: Tensor | float | int, condition: DenoiserCondition
) -> tuple[Tensor, DenoiserCondition]:
    """Check the field against the condition and broadcast timestep and condition to the batch.

    Args:
        sample: noisy field ``(B, ndim, *S)``.
        timestep: scalar or ``(B,)``.
        condition: from ``encode_condition``; batch ``B`` or 1.

    Returns:
        ``(timestep (B,), condition with batch B)``.
    """
    spatial = tuple(condition.fixed.shape[2:])
    ndim = len(spatial)
    if sample.ndim != ndim + 2 or sample.shape[1] != ndim or tuple(sample.shape[2:]) != spatial:
        raise ValueError(
            f"sample must have shape (B, {ndim}, *{spatial}) to match the images, got {tuple(sample.shape)}"
        )
    batch = sample.shape[0]
    timestep = torch.as_tensor(timestep, device=sample.device)
    if timestep.ndim == 0:
        timestep = timestep.expand(batch)
    if timestep.shape != (batch,):
        raise ValueError(f"timestep must be a scalar or have shape ({batch},), got {tuple(timestep.shape)}")
    return timestep, condition.expand(batch)
