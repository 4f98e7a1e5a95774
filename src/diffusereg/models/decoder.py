"""SwinUNETR-style convolutional decoder with time-shifted ResBlocks (paper 2.0.2, Table 2 "RT").

The layout is MONAI's SwinUNETR decoder: ResBlocks ``encoder1..4`` and ``encoder10`` on the
full-resolution input and the encoder's hidden states, then five up blocks (transposed
convolution, skip concatenation, ResBlock). Each ResBlock can take the timestep embedding,
which gives a per-channel scale and shift of its normalised feature map (FiLM / adaGN).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.layers.factories import Conv
from torch import Tensor, nn


class TimeResBlock(nn.Module):
    """Two 3x3 convolutions with a residual path; optionally modulated by the timestep.

    ``h = act(norm1(conv1(x)) * (1 + scale) + shift)``, ``out = act(norm2(conv2(h)) + skip(x))``
    where ``(scale, shift) = Linear(SiLU(temb))`` per channel (omitted when ``time_embed_dim`` is None).

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels.
        time_embed_dim: width of the timestep embedding, or None for a time-free block.
        norm_num_groups: GroupNorm groups (must divide ``out_channels``).
    """

    def __init__(
        self, spatial_dims: int, in_channels: int, out_channels: int, time_embed_dim: int | None, norm_num_groups: int
    ) -> None:
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]
        self.conv1 = conv(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(norm_num_groups, out_channels)
        self.conv2 = conv(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(norm_num_groups, out_channels)
        self.act = nn.LeakyReLU(0.01)
        self.skip = (
            nn.Identity()
            if in_channels == out_channels
            else nn.Sequential(
                conv(in_channels, out_channels, 1, bias=False), nn.GroupNorm(norm_num_groups, out_channels)
            )
        )
        self.time = (
            None if time_embed_dim is None else nn.Sequential(nn.SiLU(), nn.Linear(time_embed_dim, 2 * out_channels))
        )

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        """``x`` ``(B, in, *s)``, ``temb`` ``(B, time_embed_dim)`` -> ``(B, out, *s)``."""
        h = self.norm1(self.conv1(x))
        if self.time is not None:
            scale, shift = self.time(temb).reshape(*temb.shape[:1], -1, *(1,) * (x.ndim - 2)).chunk(2, dim=1)
            h = h * (1 + scale) + shift
        h = self.norm2(self.conv2(self.act(h)))
        return self.act(h + self.skip(x))


class TimeUpBlock(nn.Module):
    """Upsample by 2 with a transposed convolution, concatenate the skip, then a :class:`TimeResBlock`."""

    def __init__(
        self, spatial_dims: int, in_channels: int, out_channels: int, time_embed_dim: int | None, norm_num_groups: int
    ) -> None:
        super().__init__()
        self.up = Conv[Conv.CONVTRANS, spatial_dims](in_channels, out_channels, 2, stride=2, bias=False)
        self.block = TimeResBlock(spatial_dims, 2 * out_channels, out_channels, time_embed_dim, norm_num_groups)

    def forward(self, x: Tensor, skip: Tensor, temb: Tensor) -> Tensor:
        """``x`` ``(B, in, *s)``, ``skip`` ``(B, out, *2s)`` -> ``(B, out, *2s)``."""
        return self.block(torch.cat([self.up(x), skip], dim=1), temb)


class SwinUNETRDecoder(nn.Module):
    """MONAI SwinUNETR decoder layout with :class:`TimeResBlock` everywhere.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the full-resolution input ``x_in``.
        out_channels: output channels (``ndim`` for a field).
        feature_size: ``C``, channels of the encoder's first hidden state.
        time_embed_dim: width of the timestep embedding, or None for time-free ResBlocks.
        norm_num_groups: GroupNorm groups (must divide ``feature_size``).

    The output convolution (1x1) is zero-initialised, so an untrained denoiser predicts zero
    noise and the first updates come from the loss rather than from a random output layer.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        feature_size: int,
        time_embed_dim: int | None,
        norm_num_groups: int,
    ) -> None:
        super().__init__()
        c = feature_size
        args = (spatial_dims,)
        tail = (time_embed_dim, norm_num_groups)
        self.encoder1 = TimeResBlock(*args, in_channels, c, *tail)
        self.encoder2 = TimeResBlock(*args, c, c, *tail)
        self.encoder3 = TimeResBlock(*args, 2 * c, 2 * c, *tail)
        self.encoder4 = TimeResBlock(*args, 4 * c, 4 * c, *tail)
        self.encoder10 = TimeResBlock(*args, 16 * c, 16 * c, *tail)
        self.decoder5 = TimeUpBlock(*args, 16 * c, 8 * c, *tail)
        self.decoder4 = TimeUpBlock(*args, 8 * c, 4 * c, *tail)
        self.decoder3 = TimeUpBlock(*args, 4 * c, 2 * c, *tail)
        self.decoder2 = TimeUpBlock(*args, 2 * c, c, *tail)
        self.decoder1 = TimeUpBlock(*args, c, c, *tail)
        self.out = Conv[Conv.CONV, spatial_dims](c, out_channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x_in: Tensor, hidden: Sequence[Tensor], temb: Tensor) -> Tensor:
        """Decode.

        Args:
            x_in: full-resolution input ``(B, in_channels, *S)``.
            hidden: the five encoder hidden states ``(B, C * 2**k, *S / 2**(k+1))``, ``k = 0..4``.
            temb: timestep embedding ``(B, time_embed_dim)``.

        Returns:
            ``(B, out_channels, *S)``.
        """
        enc0 = self.encoder1(x_in, temb)
        enc1 = self.encoder2(hidden[0], temb)
        enc2 = self.encoder3(hidden[1], temb)
        enc3 = self.encoder4(hidden[2], temb)
        dec4 = self.encoder10(hidden[4], temb)
        dec3 = self.decoder5(dec4, hidden[3], temb)
        dec2 = self.decoder4(dec3, enc3, temb)
        dec1 = self.decoder3(dec2, enc2, temb)
        dec0 = self.decoder2(dec1, enc1, temb)
        return self.out(self.decoder1(dec0, enc0, temb))
