"""Transposed self-attention (cross-covariance attention of XCiT, used by EdgeNeXt): attention over channels."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def default_heads(dim: int, max_heads: int = 8) -> int:
    """The largest head count <= ``max_heads`` that divides ``dim`` (e.g. 8 for 64, 5 for 220)."""
    return next(h for h in range(min(max_heads, dim), 0, -1) if dim % h == 0)


class TransposedAttention(nn.Module):
    """Transposed (cross-covariance) self-attention on tokens (B, N, C) -> (B, N, C).

    Per head, q and k are (C/h, N) matrices L2-normalised along the tokens; the attention map is the
    (C/h x C/h) cross-covariance ``softmax(temperature * q k^T)`` over channels, applied to v, then ``proj``.

    Cost: O(N C^2) (the qkv and output Linears, and the C/h x C/h maps built from N tokens: N C^2 / h each):
    linear in N, quadratic in the width. Memory holds h (C/h)^2 attention entries, independent of N.
    ``num_heads=None`` picks the largest count <= 8 dividing ``dim``. ``hw`` is accepted for the common
    interface and unused.
    """

    def __init__(self, dim: int, num_heads: int | None = None, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        num_heads = num_heads or default_heads(dim)
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, hw: tuple[int, int] | None = None) -> torch.Tensor:
        b, n, c = x.shape
        # (B, N, 3C) -> (3, B, heads, C/heads, N): channels as the "sequence", tokens as the feature axis
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 4, 1)
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)  # (B, heads, C/h, C/h)
        attn = self.attn_drop((attn * self.temperature).softmax(dim=-1))
        out = (attn @ v).permute(0, 3, 1, 2).reshape(b, n, c)  # (B, heads, C/h, N) -> (B, N, C)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}"
