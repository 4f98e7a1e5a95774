"""Reference backbone for the paper's Table 2 "Unet" row: a conditional diffusion UNet on concatenated inputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from monai.networks.nets import DiffusionModelUNet
from torch import Tensor

from diffusereg.models.interface import DenoiserCondition, DenoiserForward, check_image_pair


class ConditionalUNetDenoiser(DenoiserForward, ModelMixin, ConfigMixin):
    """MONAI ``DiffusionModelUNet`` predicting field noise from ``concat(field, fixed, moving)``.

    Same interface as :class:`~diffusereg.models.DiffuseRegDenoiser`; ``encode_condition`` only
    checks and holds the images (there is no image encoder to cache).

    Args:
        spatial_dims: 2 or 3.
        channels: channels per resolution level; each spatial size must be a multiple of
            ``2 ** (len(channels) - 1)``.
        attention_levels: self-attention per level (default only at the coarsest).
        num_res_blocks: ResBlocks per level.
        norm_num_groups: GroupNorm groups (must divide every entry of ``channels``).
        num_head_channels: channels per attention head.
        field_mean, field_std: per-axis field statistics for the pipeline (not used here).
    """

    @register_to_config
    def __init__(
        self,
        spatial_dims: int = 3,
        channels: Sequence[int] = (32, 64, 64, 64),
        attention_levels: Sequence[bool] = (False, False, False, True),
        num_res_blocks: int = 2,
        norm_num_groups: int = 32,
        num_head_channels: int = 32,
        field_mean: Sequence[float] | None = None,
        field_std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.register_to_config(
            channels=list(channels),
            attention_levels=list(attention_levels),
            field_mean=[float(v) for v in field_mean] if field_mean is not None else [0.0] * spatial_dims,
            field_std=[float(v) for v in field_std] if field_std is not None else [1.0] * spatial_dims,
        )
        self.size_multiple = 2 ** (len(channels) - 1)
        self.unet = DiffusionModelUNet(
            spatial_dims=spatial_dims,
            in_channels=spatial_dims + 2,
            out_channels=spatial_dims,
            num_res_blocks=num_res_blocks,
            channels=tuple(channels),
            attention_levels=tuple(attention_levels),
            norm_num_groups=norm_num_groups,
            num_head_channels=num_head_channels,
        )

    def encode_condition(self, fixed: Tensor, moving: Tensor) -> DenoiserCondition:
        """Check and wrap the images ``(B, 1, *S)``; returns a :class:`DenoiserCondition` without features."""
        check_image_pair(fixed, moving, self.config.spatial_dims, self.size_multiple)
        return DenoiserCondition(fixed=fixed, moving=moving)

    def predict(self, sample: Tensor, timestep: Tensor, condition: DenoiserCondition) -> Tensor:
        """The UNet on ``concat(field, fixed, moving)`` of a checked batch."""
        return self.unet(torch.cat([sample, condition.fixed, condition.moving], dim=1), timestep)
