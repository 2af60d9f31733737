"""Multi-head self-attention on tokens, optionally with a learned relative-position bias (EfficientFormer V1)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..bias import RelPosBias
from ..kernels import FusedLinear
from ..misc import DeployModule, batched_matmul, to_2tuple
from .adapters import infer_hw


class MHSA(nn.Module):
    """Multi-head self-attention on tokens (B, N, C) -> (B, N, C).

    ``qkv`` projects every token to, per head, a query and a key of ``key_dim`` and a value of
    ``attn_ratio * key_dim`` channels (the official split order [q, k, v] inside each head's slice);
    ``softmax(q k^T / sqrt(key_dim) + B) v`` is computed per head and ``proj`` maps the concatenated values back
    to ``dim``.

    ``resolution`` (int or (H, W)) is the token grid at the training resolution: it sizes the relative-position
    bias table ``rel_pos.attention_biases`` (heads, H*W). ``resolution=None`` means no bias: plain MHSA.
    ``forward(x, hw)`` takes the token grid (H, W) of ``x``; at a grid other than the training one the table is
    resized bicubically (see ``edgevits.layers.bias``). In this (train/eval) form the bias is gathered from the
    live parameter on every call, so it is never stale; ``edgevits.fuse_model`` replaces it by a gathered buffer.

    Cost: O(N^2 d) for the attention itself (N tokens, d = heads * (key_dim + value_dim) channels) plus
    O(N C d) for the projections; memory O(heads N^2). Quadratic in the number of tokens, which is why
    EfficientFormer only uses it at stride 32.

    ``use_sdpa``: attention through ``F.scaled_dot_product_attention`` (the default, fastest in PyTorch) or as
    plain matmul-softmax-matmul, which the graph export form uses: exported SDPA with a bias carries guard ops for
    fully masked rows (any, where, logical_not) that mobile delegates leave to slow fallback kernels.
    """

    use_sdpa = True

    def __init__(self, dim: int, key_dim: int = 32, num_heads: int = 8, attn_ratio: float = 4.0,
                 resolution: int | tuple[int, int] | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.val_dim = int(attn_ratio * key_dim)
        self.scale = key_dim ** -0.5
        self.qkv = nn.Linear(dim, num_heads * (2 * key_dim + self.val_dim))
        self.proj = nn.Linear(num_heads * self.val_dim, dim)
        self.rel_pos = RelPosBias(num_heads, to_2tuple(resolution)) if resolution is not None else None

    def forward(self, x: torch.Tensor, hw: tuple[int, int] | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, self.num_heads, -1).transpose(1, 2)  # (B, heads, N, 2*key_dim + val_dim)
        kd = self.key_dim  # slices rather than split: XNNPACK's delegate takes slices
        q, k, v = qkv[..., :kd], qkv[..., kd:2 * kd], qkv[..., 2 * kd:]
        bias = None
        if self.rel_pos is not None:
            grid = infer_hw(n, hw)
            bias = self.rel_pos(grid, grid).to(q.dtype)  # (heads, N, N)
        if self.use_sdpa:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)  # (B, heads, N, val_dim)
        else:
            attn = batched_matmul(q, k.transpose(-2, -1)) * self.scale
            out = batched_matmul((attn if bias is None else attn + bias).softmax(dim=-1), v)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, key_dim={self.key_dim}, val_dim={self.val_dim}"

    @torch.no_grad()
    def fuse(self) -> "MHSADeploy":
        return MHSADeploy(self)


class MHSADeploy(DeployModule, nn.Module):
    """Deploy form of ``MHSA``: the projections as ``FusedLinear`` and the bias gathered once (``RelPosBiasDeploy``,
    fused before this module); ``forward(x, hw, residual)`` adds a residual inside the output projection.
    ``qkv`` and ``proj`` stay Linears, so an enclosing block can fold a norm's affine or a layer scale into them."""

    def __init__(self, src: MHSA):
        super().__init__()
        self.num_heads, self.key_dim, self.val_dim, self.scale = src.num_heads, src.key_dim, src.val_dim, src.scale
        self.qkv, self.proj = FusedLinear.from_linear(src.qkv), FusedLinear.from_linear(src.proj)
        self.rel_pos = src.rel_pos

    def forward(self, x: torch.Tensor, hw: tuple[int, int] | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, self.num_heads, -1).transpose(1, 2)
        kd = self.key_dim  # slices rather than split: XNNPACK's delegate takes slices
        q, k, v = qkv[..., :kd], qkv[..., kd:2 * kd], qkv[..., 2 * kd:]  # (B, heads, N, d) each
        bias = self.rel_pos(*(2 * [infer_hw(n, hw)])) if self.rel_pos is not None else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)  # (B, heads, N, val_dim)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1), residual=residual)
