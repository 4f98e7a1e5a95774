"""One-shot registration network (VoxelMorph): the teacher whose fields are phi0, and a baseline."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from monai.networks.blocks import Warp
from monai.networks.nets import VoxelMorph, VoxelMorphUNet
from torch import Tensor, nn

from diffusereg.models.interface import check_image_pair
from diffusereg.spatial import compose, warp


class RegistrationNet(ModelMixin, ConfigMixin):
    """MONAI VoxelMorph (UNet + optional scaling and squaring) predicting a displacement field.

    The field follows the library convention: voxels of the fixed grid, channel ``i`` along array
    axis ``i``, and ``warp(m, u)(x) = m(x + u(x))`` (MONAI's ``Warp`` adds the field to an
    ``ij``-ordered voxel grid and samples with ``align_corners=True``).

    Args:
        spatial_dims: 2 or 3.
        channels: UNet channels, in (down, up) pairs; each spatial size must be a multiple of
            ``2 ** (len(channels) // 2)``. The default is the original VoxelMorph.
        unet_out_channels: channels leaving the UNet.
        final_conv_channels: channels of the convolutions between the UNet and the field.
        integration_steps: 0 predicts the displacement directly; ``k > 0`` predicts a stationary
            velocity field and integrates it with ``k`` scaling-and-squaring steps (diffeomorphic
            in the continuum, far fewer folds in practice).

    The last convolution starts at N(0, 1e-5) weights and zero bias (as in VoxelMorph), so an
    untrained network returns a near-identity transform.
    """

    @register_to_config
    def __init__(
        self,
        spatial_dims: int = 3,
        channels: Sequence[int] = (16, 32, 32, 32, 32, 32),
        unet_out_channels: int = 32,
        final_conv_channels: Sequence[int] = (16, 16),
        integration_steps: int = 7,
    ) -> None:
        super().__init__()
        self.register_to_config(channels=list(channels), final_conv_channels=list(final_conv_channels))
        self.size_multiple = 2 ** (len(channels) // 2)
        backbone = VoxelMorphUNet(
            spatial_dims=spatial_dims,
            in_channels=2,
            unet_out_channels=unet_out_channels,
            channels=tuple(channels),
            final_conv_channels=tuple(final_conv_channels),
        )
        out = backbone.net[1].final_conv_out.conv
        nn.init.normal_(out.weight, std=1e-5)
        nn.init.zeros_(out.bias)
        with warnings.catch_warnings():  # MONAI's Warp says at every construction that it uses grid_sample
            warnings.simplefilter("ignore")
            self.voxelmorph = VoxelMorph(backbone, integration_steps=integration_steps, spatial_dims=spatial_dims)

    def forward(self, fixed: Tensor, moving: Tensor) -> Tensor:
        """Register ``moving`` to ``fixed``.

        Args:
            fixed: ``(B, 1, *S)``, intensities in ``[0, 1]``.
            moving: ``(B, 1, *S)``.

        Returns:
            Displacement field ``(B, ndim, *S)`` in voxels on the fixed grid.
        """
        check_image_pair(fixed, moving, self.config.spatial_dims, self.size_multiple)
        _, field = self.voxelmorph(moving, fixed)
        return field

    def velocity(self, fixed: Tensor, moving: Tensor) -> Tensor:
        """The stationary velocity field ``(B, ndim, *S)`` (voxels) that :meth:`forward` integrates
        (``integration_steps`` scaling-and-squaring steps); with ``integration_steps=0`` the
        displacement itself. Inputs as in :meth:`forward`."""
        check_image_pair(fixed, moving, self.config.spatial_dims, self.size_multiple)
        return self.voxelmorph.backbone(torch.cat([moving, fixed], dim=1))

    def recursive(self, fixed: Tensor, moving: Tensor, passes: int, one_shot: Tensor | None = None) -> list[Tensor]:
        """The network applied ``passes`` times recursively: warp the moving image by the field so
        far, register the warped image again, compose the fields (a recursive cascade).

        Args:
            fixed, moving: ``(B, 1, *S)``, intensities in ``[0, 1]``.
            passes: number of passes, at least 1.
            one_shot: the first pass's field ``self(fixed, moving)`` when the caller has it already.

        Returns:
            The field after each pass (``[0]`` is the one-shot field, ``[-1]`` after all
            ``passes``), each a displacement ``(B, ndim, *S)`` in voxels on the fixed grid.
        """
        if passes < 1:
            raise ValueError(f"passes must be at least 1, got {passes}")
        fields = [self(fixed, moving) if one_shot is None else one_shot]
        for _ in range(passes - 1):
            fields.append(compose(fields[-1], self(fixed, warp(moving, fields[-1]))))
        return fields

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> RegistrationNet:
        """Drop MONAI ``Warp``'s cached sampling grids (plain attributes) so ``.to()`` cannot leave them behind."""
        for module in self.modules():
            if isinstance(module, Warp):
                module.ref_grid = None
        return super()._apply(fn, recurse)
