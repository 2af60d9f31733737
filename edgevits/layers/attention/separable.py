"""Separable self-attention (MobileViT-v2, Mehta & Rastegari 2022): linear in the number of tokens."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SeparableAttention(nn.Module):
    """Separable self-attention on tokens (B, N, C) -> (B, N, C).

    One Linear produces a score per token and a key and a value per token: ``s, K, V = qkv_proj(x)`` with
    s (B, N, 1). The scores are soft-maxed over the tokens, the context vector ``c = sum_n softmax(s)_n K_n``
    (B, 1, C) is one vector for the whole input, and ``out = out_proj(ReLU(V) * c)``.

    Cost: O(N C^2) for the two Linears plus O(N C) for the scores, the context and the gating: linear in N, no
    N x N matrix. MobileViT-v2 applies it to unfolded patches with 1x1 convolutions (one softmax per pixel
    position of a patch); here it acts on a plain token sequence (one softmax over all tokens), which is the
    setting of SwiftFormer's comparison. ``hw`` is accepted for the common interface and unused.
    """

    def __init__(self, dim: int, bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.dim = dim
        self.qkv_proj = nn.Linear(dim, 1 + 2 * dim, bias=bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.out_proj = nn.Linear(dim, dim, bias=bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, hw: tuple[int, int] | None = None) -> torch.Tensor:
        scores, key, value = self.qkv_proj(x).split([1, self.dim, self.dim], dim=-1)  # (B,N,1), (B,N,C), (B,N,C)
        scores = self.attn_drop(scores.softmax(dim=1))  # over the tokens
        context = (scores * key).sum(dim=1, keepdim=True)  # (B, 1, C)
        return self.proj_drop(self.out_proj(F.relu(value) * context))
