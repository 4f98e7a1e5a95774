"""The two Swin encoders of DiffuseReg: the image encoder and the field backbone (paper 2.0.2-2.0.3).

The image encoder is a plain Swin Transformer (MONAI blocks, SwinUNETR layout) run on one image;
it records, for every block, the normalised input of that block's window attention. The field
backbone mirrors it block for block, but each of its blocks is a :class:`FusionSwinBlock` whose
attention also sees the time token and the image features recorded at the same stage and block.

All tensors inside are channels-last ``(B, *s, C)``; stage ``i`` runs at ``S / (patch * 2**i)``
with ``feature_size * 2**i`` channels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from monai.networks.blocks import MLPBlock, PatchEmbed
from monai.networks.nets.swin_unetr import (
    PatchMerging,
    SwinTransformerBlock,
    compute_mask,
    get_window_size,
    window_partition,
    window_reverse,
)
from torch import Tensor, nn

from diffusereg.models.fusion_attention import FusionWindowAttention, fusion_attention_mask
from diffusereg.models.interface import BlockFeatures


def _channels_last(x: Tensor) -> Tensor:
    return rearrange(x, "b c ... -> b ... c")


def _channels_first(x: Tensor) -> Tensor:
    return rearrange(x, "b ... c -> b c ...")


def _shifts(window_size: Sequence[int], depth: int) -> list[tuple[int, ...]]:
    """Swin's alternation: even blocks unshifted, odd blocks shifted by half a window."""
    return [tuple(0 if j % 2 == 0 else w // 2 for w in window_size) for j in range(depth)]


def _padded(spatial: Sequence[int], window: Sequence[int]) -> list[int]:
    return [math.ceil(s / w) * w for s, w in zip(spatial, window)]


@dataclass(frozen=True)
class SwinLayout:
    """The shape of a Swin encoder, shared by the image encoder and the field backbone.

    Attributes:
        spatial_dims: 2 or 3.
        feature_size: channels after patch embedding (doubles per stage).
        depths: blocks per stage.
        num_heads: attention heads per stage.
        window_size: attention window per spatial axis.
        patch_size: patch-embedding stride.
        mlp_ratio: hidden width of the block MLP relative to its channels.
    """

    spatial_dims: int
    feature_size: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_size: tuple[int, ...]
    patch_size: int
    mlp_ratio: float

    @property
    def dims(self) -> list[int]:
        """Channels of each stage."""
        return [self.feature_size * 2**i for i in range(len(self.depths))]

    def patch_embed(self, in_channels: int) -> PatchEmbed:
        return PatchEmbed(self.patch_size, in_channels, self.feature_size, norm_layer=None,  # type: ignore[arg-type]
                          spatial_dims=self.spatial_dims)


class ImageSwinEncoder(nn.Module):
    """Swin Transformer on one image that returns the pre-attention features of every block.

    The very last block contributes only its normalised input (nothing reads its output), so it
    is built as that block's LayerNorm alone and the last stage has no patch merging.
    """

    def __init__(self, layout: SwinLayout) -> None:
        super().__init__()
        self.window_size = tuple(layout.window_size)
        self.shift_size = tuple(w // 2 for w in layout.window_size)
        self.patch_embed = layout.patch_embed(1)
        dims, depths, last = layout.dims, layout.depths, len(layout.depths) - 1
        self.stages = nn.ModuleList(
            nn.ModuleList(
                SwinTransformerBlock(dim, heads, self.window_size, shift, mlp_ratio=layout.mlp_ratio)
                for shift in _shifts(layout.window_size, depth)[: depth - 1 if i == last else depth]
            )
            for i, (dim, depth, heads) in enumerate(zip(dims, depths, layout.num_heads))
        )
        self.merges = nn.ModuleList(PatchMerging(dim, spatial_dims=layout.spatial_dims) for dim in dims[:-1])
        self.final_norm = nn.LayerNorm(dims[-1])

    def forward(self, image: Tensor) -> tuple[tuple[Tensor, ...], ...]:
        """Per-stage, per-block features ``[stage][block]`` of shape ``(B, *s, C)`` from ``image`` ``(B, 1, *S)``."""
        x = _channels_last(self.patch_embed(image))
        features = []
        for i, blocks in enumerate(self.stages):
            window, shift = get_window_size(x.shape[1:-1], self.window_size, self.shift_size)
            mask = compute_mask(_padded(x.shape[1:-1], window), window, shift, x.device)
            stage = []
            for block in blocks:
                stage.append(block.norm1(x))
                x = block(x, mask)
            if i < len(self.merges):
                x = self.merges[i](x)
            else:
                stage.append(self.final_norm(x))
            features.append(tuple(stage))
        return tuple(features)


class FusionSwinBlock(nn.Module):
    """Swin block whose (shifted) window attention fuses time and image tokens into the field tokens.

    Args:
        dim: channels of the field tokens (and of the image features and time token).
        num_heads: attention heads.
        window_size: configured window; clamped like Swin on small feature maps.
        shift_size: cyclic shift (zeros for an unshifted block).
        num_groups: token groups after the time token: conditions + the field (3 or 1).
        condition_mask: ``"window"``, ``"adjacent"`` or ``"none"`` (see :func:`fusion_attention_mask`).
        mlp_ratio: hidden width of the MLP relative to ``dim``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: Sequence[int],
        shift_size: Sequence[int],
        num_groups: int,
        condition_mask: str,
        mlp_ratio: float,
    ) -> None:
        super().__init__()
        self.window_size = tuple(window_size)
        self.shift_size = tuple(shift_size)
        self.num_groups = num_groups
        self.condition_mask = condition_mask
        self.norm1 = nn.LayerNorm(dim)
        self.attn = FusionWindowAttention(dim, num_heads, window_size, num_groups)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), act="GELU", dropout_mode="swin")

    def forward(self, x: Tensor, conditions: Sequence[Tensor], time_token: Tensor) -> Tensor:
        """Update the field tokens.

        Args:
            x: field tokens ``(B, *s, C)``.
            conditions: ``num_groups - 1`` normalised image features ``(B, *s, C)`` (fixed, moving).
            time_token: ``(B, C)``.

        Returns:
            ``(B, *s, C)``.
        """
        spatial = tuple(x.shape[1:-1])
        window, shift = get_window_size(spatial, self.window_size, self.shift_size)
        padded = _padded(spatial, window)
        shifted = any(s > 0 for s in shift)
        region = compute_mask(padded, window, shift, x.device) if shifted else None
        mask = fusion_attention_mask(window, region, self.condition_mask, self.num_groups, x.device)
        axes = tuple(range(1, len(spatial) + 1))

        def to_windows(t: Tensor) -> Tensor:
            pad = [p for s, q in zip(reversed(spatial), reversed(padded)) for p in (0, q - s)]
            t = F.pad(t, [0, 0, *pad])
            if shifted:
                t = torch.roll(t, shifts=tuple(-s for s in shift), dims=axes)
            return window_partition(t, window).reshape(t.shape[0], -1, math.prod(window), t.shape[-1])

        groups = [to_windows(t) for t in (*conditions, self.norm1(x))]
        b, nw = groups[0].shape[:2]
        time = time_token[:, None, None, :].expand(b, nw, 1, -1)
        field = self.attn(torch.cat([time, *groups], dim=2), mask, window)
        field = window_reverse(field.reshape(b * nw, *window, -1), window, [b, *padded])
        if shifted:
            field = torch.roll(field, shifts=shift, dims=axes)
        x = x + field[(slice(None), *(slice(0, s) for s in spatial))]
        return x + self.mlp(self.norm2(x))


class FieldSwinEncoder(nn.Module):
    """Backbone encoder for the noisy field: Swin stages of :class:`FusionSwinBlock` (SwinUNETR layout).

    Args:
        layout: the stages' shape, as the image encoder's.
        in_channels: channels patch-embedded at the input (``ndim``, or ``ndim + 2`` for concat fusion).
        time_embed_dim: width of the timestep embedding projected to one time token per stage.
        num_groups: token groups per window after the time token (3 = fixed, moving, field; 1 = field).
        condition_mask: see :func:`fusion_attention_mask`.
    """

    def __init__(self, layout: SwinLayout, in_channels: int, time_embed_dim: int, num_groups: int,
                 condition_mask: str) -> None:
        super().__init__()
        dims = layout.dims
        self.patch_embed = layout.patch_embed(in_channels)
        self.time_tokens = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(time_embed_dim, dim)) for dim in dims)
        self.stages = nn.ModuleList(
            nn.ModuleList(
                FusionSwinBlock(dim, heads, layout.window_size, shift, num_groups, condition_mask, layout.mlp_ratio)
                for shift in _shifts(layout.window_size, depth)
            )
            for dim, depth, heads in zip(dims, layout.depths, layout.num_heads)
        )
        self.merges = nn.ModuleList(PatchMerging(dim, spatial_dims=layout.spatial_dims) for dim in dims)

    def forward(self, x: Tensor, temb: Tensor, features: BlockFeatures = ()) -> list[Tensor]:
        """Encode the field.

        Args:
            x: ``(B, in_channels, *S)``.
            temb: timestep embedding ``(B, time_embed_dim)``.
            features: image features ``[stage][block] -> (fixed, moving)``; empty for concat fusion.

        Returns:
            ``len(depths) + 1`` layer-normed hidden states, channels-first: the patch embedding
            ``(B, C, *S/p)`` and each stage's merged output ``(B, 2**(i+1) C, *S/(p 2**(i+1)))``.
        """
        x = _channels_last(self.patch_embed(x))
        hidden = [x]
        for i, (blocks, merge, time_token) in enumerate(zip(self.stages, self.merges, self.time_tokens)):
            token = time_token(temb)
            for j, block in enumerate(blocks):
                x = block(x, features[i][j] if features else (), token)
            x = merge(x)
            hidden.append(x)
        return [_channels_first(F.layer_norm(h, h.shape[-1:])) for h in hidden]
