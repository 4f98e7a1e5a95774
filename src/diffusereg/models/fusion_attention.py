"""Masked window attention that fuses the time token and the image tokens into the field tokens.

DiffuseReg, sections 2.0.3-2.0.5: inside every (shifted) window of the backbone the sequence

    [time token, fixed tokens (N), moving tokens (N), field tokens (N)]

goes through one masked multi-head self-attention and only the field tokens are kept. The
time token sees and is seen by every token and carries no position bias. Among the image and
field tokens the Swin relative-position bias and the shifted-window region mask are tiled
3 x 3 over the groups, so a field token only sees image tokens of its own window region.

Tokens are ordered ``[time, group_1, ..., group_G]`` with ``G`` groups of ``N`` window tokens
each; the field is always the last group. ``G = 3`` for layer-wise fusion and ``G = 1``
(time + field only) for the input-concatenation ablation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers import trunc_normal_
from torch import Tensor, nn

CONDITION_MASKS = ("window", "adjacent", "none")


def _window_coords(window_size: Sequence[int], device: torch.device | None = None) -> Tensor:
    """Integer coordinates ``(ndim, N)`` of the ``N`` positions of a window, in window_partition order."""
    axes = [torch.arange(w, device=device) for w in window_size]
    return torch.stack(torch.meshgrid(*axes, indexing="ij")).flatten(1)


def relative_position_index(window_size: Sequence[int], table_window_size: Sequence[int]) -> Tensor:
    """Index ``(N, N)`` into a relative-position table sized for ``table_window_size``.

    ``window_size`` may be smaller than the table's window (Swin clamps the window on small
    feature maps); offsets are looked up at their true place in the table.
    """
    coords = _window_coords(window_size)
    rel = coords[:, :, None] - coords[:, None, :] + torch.tensor(table_window_size)[:, None, None] - 1
    spans = [2 * w - 1 for w in table_window_size]
    strides = torch.tensor([math.prod(spans[i + 1 :]) for i in range(len(spans))])
    return (rel * strides[:, None, None]).sum(0)


def fusion_attention_mask(
    window_size: Sequence[int],
    region_mask: Tensor | None = None,
    mode: str = "window",
    num_groups: int = 3,
    device: torch.device | str | None = None,
) -> Tensor:
    """Additive attention mask over ``[time, group_1, ..., group_G]`` tokens of each window.

    Args:
        window_size: window extent per spatial axis, ``N = prod(window_size)`` tokens per group.
        region_mask: MONAI ``compute_mask`` output ``(num_windows, N, N)`` for shifted windows
            (non-zero where two positions lie in different regions); ``None`` for unshifted windows.
        mode: ``"window"`` tiles the region mask over all group pairs; ``"adjacent"`` also blocks
            pairs from different groups farther apart than Chebyshev distance 1 in the window;
            ``"none"`` blocks nothing (full attention within the window).
        num_groups: ``G``, number of token groups after the time token.
        device: where the mask is built when ``region_mask`` is None (else ``region_mask``'s device).

    Returns:
        ``(num_windows, 1 + G*N, 1 + G*N)`` float mask, 0 where attention is allowed and ``-inf``
        where it is blocked (``num_windows = 1`` when ``region_mask`` is None; it broadcasts).
        Row and column 0 (the time token) are always open.
    """
    if mode not in CONDITION_MASKS:
        raise ValueError(f"condition mask must be one of {CONDITION_MASKS}, got {mode!r}")
    n = math.prod(window_size)
    device = region_mask.device if region_mask is not None else device
    if region_mask is None or mode == "none":
        blocked = torch.zeros(1, n, n, dtype=torch.bool, device=device)
    else:
        blocked = region_mask != 0
    blocked = blocked.repeat(1, num_groups, num_groups)
    if mode == "adjacent":
        coords = _window_coords(window_size, device)
        far = (coords[:, :, None] - coords[:, None, :]).abs().amax(0) > 1
        group = torch.arange(num_groups, device=device).repeat_interleave(n)
        cross_group = group[:, None] != group[None, :]
        blocked = blocked | (cross_group & far.repeat(num_groups, num_groups))
    blocked = F.pad(blocked, (1, 0, 1, 0), value=False)
    return torch.zeros(blocked.shape, device=device).masked_fill(blocked, float("-inf"))


class FusionWindowAttention(nn.Module):
    """Masked multi-head attention in which the field tokens attend to all tokens of their window.

    Only the field tokens' outputs are kept, so only they are projected to queries; the rows of
    the time and image tokens would be computed and thrown away (same result, ~G+1 times less
    attention work). Keys and values come from all ``1 + G*N`` tokens.

    Args:
        dim: channels ``C`` of every token.
        num_heads: attention heads (``dim`` must be divisible by it).
        window_size: the configured window; its relative-position table is shared by all group pairs.
        num_groups: ``G``, token groups after the time token (the field is the last one).
        qkv_bias: learnable bias on the query/key/value projections.
    """

    def __init__(
        self, dim: int, num_heads: int, window_size: Sequence[int], num_groups: int = 3, qkv_bias: bool = True
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.num_groups = num_groups
        self.window_size = tuple(window_size)
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros(math.prod(2 * w - 1 for w in window_size), num_heads)
        )
        trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.query = nn.Linear(dim, dim, bias=qkv_bias)
        self.key_value = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def position_bias(self, window_size: Sequence[int]) -> Tensor:
        """Relative-position bias ``(heads, 1 + G*N, 1 + G*N)``: tiled G x G, zero on the time row/column."""
        index = relative_position_index(window_size, self.window_size).to(self.relative_position_bias_table.device)
        n = index.shape[0]
        bias = self.relative_position_bias_table[index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1)
        return F.pad(bias.repeat(1, self.num_groups, self.num_groups), (1, 0, 1, 0))

    def forward(self, tokens: Tensor, mask: Tensor, window_size: Sequence[int]) -> Tensor:
        """Attend from the field tokens to every token of their window.

        Args:
            tokens: ``(B, num_windows, 1 + G*N, C)``, ordered ``[time, group_1, ..., field]``.
            mask: additive mask ``(num_windows or 1, 1 + G*N, 1 + G*N)`` from :func:`fusion_attention_mask`.
            window_size: the window actually used (may be smaller than the configured one).

        Returns:
            Updated field tokens ``(B, num_windows, N, C)``.
        """
        b, nw, length, c = tokens.shape
        n = math.prod(window_size)
        heads = self.num_heads

        def split_heads(x: Tensor) -> Tensor:
            return x.reshape(b, nw, x.shape[2], heads, c // heads).transpose(2, 3)

        q = split_heads(self.query(tokens[:, :, -n:]))
        k, v = (split_heads(t) for t in self.key_value(tokens).chunk(2, dim=-1))
        bias = self.position_bias(window_size)[:, -n:] + mask[:, None, -n:]  # (nW or 1, heads, N, L)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.proj(out.transpose(2, 3).reshape(b, nw, n, c))
