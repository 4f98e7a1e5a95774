"""DiffuseReg's denoising network: Swin image encoder + fused Swin field backbone + time-conditioned decoder."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from diffusereg.models.decoder import SwinUNETRDecoder
from diffusereg.models.fusion_attention import CONDITION_MASKS
from diffusereg.models.interface import (
    PREDICTION_TYPES,
    DenoiserCondition,
    DenoiserForward,
    check_image_pair,
)
from diffusereg.models.swin_encoder import FieldSwinEncoder, ImageSwinEncoder, SwinLayout


@dataclass(frozen=True)
class _Defaults:
    """Architecture used for every config value left as None."""

    feature_size: int
    window_size: tuple[int, ...]
    depths: tuple[int, ...] = (2, 2, 2, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)


DEFAULTS = {2: _Defaults(feature_size=24, window_size=(4, 4)), 3: _Defaults(feature_size=48, window_size=(2, 4, 4))}
FUSIONS = ("layerwise", "concat")
#: Patch embedding (stride 2) then four patch mergings: every spatial size must be a multiple of 32.
SIZE_MULTIPLE = 32


class DiffuseRegDenoiser(DenoiserForward, ModelMixin, ConfigMixin):
    r"""Denoises a z-scored displacement field given the fixed and moving images: predicts, as its
    ``prediction_type`` says, the noise, the clean field, the velocity, or an increment of the
    current estimate.

    Architecture (DiffuseReg, Zhuo & Shen 2024): a Swin image encoder runs on the fixed and the
    moving image; a Swin backbone of the same shape runs on the noisy field, and in each of its
    (shifted) windows the field tokens attend to ``[time token, fixed tokens, moving tokens,
    field tokens]`` under a mask; a SwinUNETR decoder with time-conditioned ResBlocks maps the
    backbone's hidden states and ``concat(field, fixed, moving)`` to the prediction.

    Args:
        spatial_dims: 2 or 3.
        feature_size: channels after patch embedding; None = 24 in 2D, 48 in 3D (SwinUNETR's).
        depths: Swin blocks in each of the 4 stages; None = ``(2, 2, 2, 2)``.
        num_heads: attention heads per stage; None = ``(3, 6, 12, 24)``.
        window_size: attention window; None = ``(4, 4)`` in 2D, ``(2, 4, 4)`` in 3D (paper).
        mlp_ratio: Swin MLP width relative to the channels.
        share_image_encoder: one image encoder for both images (True) or one each (False, default).
        fusion: ``"layerwise"`` (the paper's masked window fusion in every backbone block) or
            ``"concat"`` (ablation: field and images patch-embedded together at the input, backbone
            windows hold only the time token and the field tokens).
        condition_mask: ``"window"`` (paper), ``"adjacent"`` or ``"none"``; see
            :func:`~diffusereg.models.fusion_attention.fusion_attention_mask`.
        time_in_resblocks: decoder ResBlocks scale and shift their features by the timestep.
        norm_num_groups: GroupNorm groups in the decoder (must divide ``feature_size``).
        field_mean, field_std: per-axis statistics (voxels) that the pipeline uses to z-score
            fields; None = zeros / ones. Stored only, never used by the network.
        integration_steps: scaling-and-squaring steps that turn a predicted ``"increment"``
            velocity into a displacement (used by the parametrisation, not by the network).
        prediction_type: what the output means: ``"epsilon"`` (the noise, as in the paper),
            ``"sample"`` (the clean z-scored field), ``"v_prediction"`` or ``"increment"``; see
            :func:`~diffusereg.schedulers.clean_and_noise`. Stored only: the network is the same.
        proposal: ``"teacher"`` (``"increment"`` only): the network's output is a residual added to
            the velocity of the pipeline's teacher on the fixed and the (warped) moving image
            (:func:`~diffusereg.schedulers.denoise`), so a step whose residual is zero is one
            pass of the recursive teacher; None: the output is the whole velocity. Stored only:
            the teacher is the pipeline's component, saved once.
        increment_passes: how many whole increments one sampling run of an ``"increment"``
            denoiser applies in all: each of ``N`` steps applies the share ``min(1, increment_passes
            / N)`` of its predicted velocity (:func:`~diffusereg.schedulers.increment_fraction`), so
            that more steps refine the same path in smaller steps instead of adding whole passes.
            None: every step applies all of it. Stored only: the network is the same.
        self_conditioning: the network reads, beside the noisy field, the field estimate of the
            previous sampling step (``condition.estimate``, z-scored; zeros at the first step), as
            extra input channels (self-conditioning, Chen et al. 2022).

    Inputs of every spatial size that is a multiple of 32 are accepted.

    Example:
        >>> model = DiffuseRegDenoiser(spatial_dims=2)
        >>> fixed, moving = torch.rand(2, 1, 1, 64, 64).unbind(0)
        >>> cond = model.encode_condition(fixed, moving)
        >>> noise = model(torch.randn(1, 2, 64, 64), 500, condition=cond).sample
    """

    @register_to_config
    def __init__(
        self,
        spatial_dims: int = 3,
        feature_size: int | None = None,
        depths: Sequence[int] | None = None,
        num_heads: Sequence[int] | None = None,
        window_size: Sequence[int] | None = None,
        mlp_ratio: float = 4.0,
        share_image_encoder: bool = False,
        fusion: str = "layerwise",
        condition_mask: str = "window",
        time_in_resblocks: bool = True,
        norm_num_groups: int = 4,
        field_mean: Sequence[float] | None = None,
        field_std: Sequence[float] | None = None,
        prediction_type: str = "epsilon",
        integration_steps: int = 7,
        proposal: str | None = None,
        increment_passes: float | None = None,
        self_conditioning: bool = False,
    ) -> None:
        super().__init__()
        self.size_multiple = SIZE_MULTIPLE
        if spatial_dims not in DEFAULTS:
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if proposal not in (None, "teacher") or (proposal is not None and prediction_type != "increment"):
            raise ValueError(f"proposal must be None or 'teacher' (with prediction_type 'increment'), got {proposal!r} "
                             f"with {prediction_type!r}")
        if increment_passes is not None and (prediction_type != "increment" or increment_passes <= 0):
            raise ValueError(f"increment_passes must be None or > 0 with prediction_type 'increment', got "
                             f"{increment_passes!r} with {prediction_type!r}")
        if condition_mask not in CONDITION_MASKS:
            raise ValueError(f"condition_mask must be one of {CONDITION_MASKS}, got {condition_mask!r}")
        defaults = DEFAULTS[spatial_dims]
        feature_size = feature_size or defaults.feature_size
        depths = tuple(depths or defaults.depths)
        num_heads = tuple(num_heads or defaults.num_heads)
        window_size = tuple(window_size or defaults.window_size)
        if len(depths) != 4 or len(num_heads) != 4 or len(window_size) != spatial_dims:
            raise ValueError("depths and num_heads need 4 stages and window_size one entry per spatial dim")
        if feature_size % norm_num_groups:
            raise ValueError(f"norm_num_groups {norm_num_groups} must divide feature_size {feature_size}")
        field_mean = [float(v) for v in field_mean] if field_mean is not None else [0.0] * spatial_dims
        field_std = [float(v) for v in field_std] if field_std is not None else [1.0] * spatial_dims
        self.register_to_config(
            feature_size=feature_size,
            depths=list(depths),
            num_heads=list(num_heads),
            window_size=list(window_size),
            field_mean=field_mean,
            field_std=field_std,
        )

        time_embed_dim = 4 * feature_size
        self.time_proj = Timesteps(feature_size, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(feature_size, time_embed_dim)
        layout = SwinLayout(spatial_dims, feature_size, depths, num_heads, window_size, patch_size=2,
                            mlp_ratio=mlp_ratio)
        layerwise = fusion == "layerwise"
        field_channels = spatial_dims * (2 if self_conditioning else 1)
        num_encoders = (1 if share_image_encoder else 2) if layerwise else 0
        #: ``image_encoders[0]`` encodes the fixed image, ``image_encoders[-1]`` the moving one.
        self.image_encoders = nn.ModuleList(ImageSwinEncoder(layout) for _ in range(num_encoders))
        self.backbone = FieldSwinEncoder(
            layout,
            in_channels=field_channels if layerwise else field_channels + 2,
            time_embed_dim=time_embed_dim,
            num_groups=3 if layerwise else 1,
            condition_mask=condition_mask,
        )
        self.decoder = SwinUNETRDecoder(
            spatial_dims,
            in_channels=field_channels + 2,
            out_channels=spatial_dims,
            feature_size=feature_size,
            time_embed_dim=time_embed_dim if time_in_resblocks else None,
            norm_num_groups=norm_num_groups,
        )

    def encode_condition(self, fixed: Tensor, moving: Tensor) -> DenoiserCondition:
        """Run the image encoder(s) once for a registration.

        Args:
            fixed: ``(B, 1, *S)``, intensities in ``[0, 1]``, each of ``S`` a multiple of 32.
            moving: ``(B, 1, *S)``.

        Returns:
            :class:`DenoiserCondition` holding the images and, for layer-wise fusion, the
            pre-attention features ``features[stage][block] = (fixed, moving)``; pass it to
            ``forward(..., condition=...)`` at every sampling step.
        """
        check_image_pair(fixed, moving, self.config.spatial_dims, self.size_multiple)
        if not self.image_encoders:
            return DenoiserCondition(fixed=fixed, moving=moving)
        fixed_features = self.image_encoders[0](fixed)
        moving_features = self.image_encoders[-1](moving)
        features = tuple(
            tuple(zip(fixed_stage, moving_stage)) for fixed_stage, moving_stage in zip(fixed_features, moving_features)
        )
        return DenoiserCondition(fixed=fixed, moving=moving, features=features)

    def with_moving(self, condition: DenoiserCondition, moving: Tensor) -> DenoiserCondition:
        """``condition`` with another moving image ``(B, 1, *S)``: only the moving image's encoder runs."""
        if not self.image_encoders:
            return replace(condition, moving=moving)
        check_image_pair(condition.fixed, moving, self.config.spatial_dims, self.size_multiple)
        moving_features = self.image_encoders[-1](moving)
        features = tuple(tuple((block[0], new) for block, new in zip(stage, new_stage))
                         for stage, new_stage in zip(condition.features, moving_features))
        return DenoiserCondition(fixed=condition.fixed, moving=moving, features=features)

    def predict(self, sample: Tensor, timestep: Tensor, condition: DenoiserCondition) -> Tensor:
        """The network on a checked batch (see :meth:`DenoiserForward.forward`)."""
        if bool(self.image_encoders) != bool(condition.features):
            raise ValueError("`condition` does not fit this model; build it with this model's `encode_condition`")
        temb = self.time_embedding(self.time_proj(timestep).to(sample.dtype))
        field = sample
        if self.config.self_conditioning:
            estimate = torch.zeros_like(sample) if condition.estimate is None else condition.estimate.to(sample)
            field = torch.cat([sample, estimate], dim=1)
        x_in = torch.cat([field, condition.fixed, condition.moving], dim=1)
        hidden = self.backbone(field if self.image_encoders else x_in, temb, condition.features)
        return self.decoder(x_in, hidden, temb)
