"""Cascaded group attention and local window attention (EfficientViT-MSRA, Liu et al., CVPR 2023).

Both work on feature maps (B, C, H, W), not on token sequences.

``CascadedGroupAttention`` splits the channels into one chunk per head. Head ``i`` attends over the tokens of
``chunk_i + out_{i-1}`` (the previous head's output cascades into the next head's input), with its own 1x1
q/k/v projection (conv + BN), a depthwise conv + BN on the query only, and a learned relative-position bias. The
head outputs are concatenated and projected back (ReLU -> 1x1 conv + BN).

``LocalWindowAttention`` applies it inside non-overlapping windows (7x7 in the released models): the map is padded
at the bottom/right to a multiple of the window, cut into windows that are stacked along the batch dimension,
attended, put back and cropped. A map no larger than the window is attended globally.

Deploy form (``fuse()``, called by ``edgevits.fuse_model``): ``FusedCascadedGroupAttention``. Every conv + BN is
folded, the softmax scale is folded into the query's depthwise conv, and the bias tables are gathered once. Since
each head's q/k/v projection is a 1x1 conv, ``qkv_i(chunk_i + out_{i-1}) = qkv_i(chunk_i) + W_i out_{i-1}``: the
projections of all the input chunks are computed together by one grouped conv, and only the correction
``W_i out_{i-1}`` (one batched matrix product) stays in the sequential cascade. That cuts the number of small ops
per head roughly in half, which is what limits these models at batch 1.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..bias import RelPosBias
from ..conv import ConvNorm, fuse_conv_bn

Size = tuple[int, int]


class CascadedGroupAttention(nn.Module):
    """Cascaded group attention on a map (B, C, H, W) -> (B, C, H, W) (each batch item is one window).

    Args:
        dim: channels C (split evenly over the heads).
        key_dim: query/key channels per head (16 in the released models).
        num_heads: heads.
        attn_ratio: value channels per head = ``int(attn_ratio * key_dim)`` (EfficientViT uses
            ``dim / (key_dim * num_heads)``, so values have ``dim / num_heads`` channels).
        resolution: the window side at the training resolution; sizes the bias table (heads, resolution**2).
        kernels: the kernel of each head's depthwise conv on the query.

    At a window other than ``resolution`` x ``resolution`` the table is resized bicubically (``RelPosBias``).
    Cost: O(heads * N^2 * (key_dim + value_dim)) per window of N tokens plus the 1x1 projections.
    """

    def __init__(self, dim: int, key_dim: int = 16, num_heads: int = 4, attn_ratio: float = 4.0,
                 resolution: int = 7, kernels: Sequence[int] = (5, 5, 5, 5)):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if len(kernels) < num_heads:
            raise ValueError(f"need one query kernel per head ({num_heads}), got {list(kernels)}")
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.val_dim = int(attn_ratio * key_dim)
        self.scale = key_dim ** -0.5
        self.resolution = resolution
        self.kernels = tuple(int(k) for k in kernels[:num_heads])
        chunk = dim // num_heads
        self.qkvs = nn.ModuleList(ConvNorm(chunk, 2 * key_dim + self.val_dim, 1) for _ in range(num_heads))
        self.dws = nn.ModuleList(ConvNorm(key_dim, key_dim, k, groups=key_dim) for k in self.kernels)
        self.proj = ConvNorm(self.val_dim * num_heads, dim, 1, bn_weight_init=0.0)
        self.pos_bias = RelPosBias(num_heads, (resolution, resolution))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        bias = self.pos_bias((h, w), (h, w))  # (heads, N, N), gathered from the live table on every call
        chunks = x.chunk(self.num_heads, dim=1)
        outs = []
        feat = chunks[0]
        for i, (qkv, dw) in enumerate(zip(self.qkvs, self.dws)):
            if i > 0:
                feat = feat + chunks[i]  # the previous head's output cascades into this head's input
            q, k, v = qkv(feat).split([self.key_dim, self.key_dim, self.val_dim], dim=1)
            q = dw(q)
            q, k, v = q.flatten(2), k.flatten(2), v.flatten(2)  # (B, d, N)
            attn = (q.transpose(1, 2) @ k) * self.scale + bias[i]  # (B, N, N)
            attn = attn.softmax(dim=-1)
            feat = (v @ attn.transpose(1, 2)).view(b, self.val_dim, h, w)
            outs.append(feat)
        return self.proj(torch.relu(torch.cat(outs, dim=1)))

    def fuse(self) -> "FusedCascadedGroupAttention":
        return FusedCascadedGroupAttention(self)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, key_dim={self.key_dim}, val_dim={self.val_dim}, "
                f"kernels={self.kernels}, resolution={self.resolution}")


def _folded(module: nn.Module) -> nn.Conv2d:
    """A conv with its BN folded in, whether ``module`` is still a ConvNorm or already fused."""
    if isinstance(module, ConvNorm):
        return fuse_conv_bn(module.conv, module.bn)
    if isinstance(module, nn.Conv2d):
        return module
    raise TypeError(f"expected a ConvNorm or a fused Conv2d, got {type(module).__name__}")


class FusedCascadedGroupAttention(nn.Module):
    """Deploy form of ``CascadedGroupAttention``: same outputs, fewer and larger ops.

    * ``qkv_in``: one grouped 1x1 conv giving every head's projection of its own input chunk (BN folded).
    * ``cascade``: (heads-1, 2*key_dim + val_dim, val_dim) weights of the correction ``W_i out_{i-1}``.
    * ``dw_weight``/``dw_bias``: each head's query depthwise conv with the BN and the softmax scale folded in.
    * ``proj``: the output 1x1 conv with its BN folded; ``pos_bias``: the gathered bias (FrozenRelPosBias).
    """

    def __init__(self, src: CascadedGroupAttention):
        super().__init__()
        self.num_heads, self.key_dim, self.val_dim = src.num_heads, src.key_dim, src.val_dim
        self.kernels = src.kernels
        self.resolution = src.resolution
        heads = self.num_heads
        qkvs = [_folded(m) for m in src.qkvs]
        chunk = qkvs[0].in_channels
        with torch.no_grad():
            weight = torch.cat([m.weight for m in qkvs], dim=0)  # (heads * (2k + d), chunk, 1, 1)
            bias = torch.cat([m.bias for m in qkvs], dim=0)
            self.qkv_in = nn.Conv2d(chunk * heads, weight.shape[0], 1, groups=heads)
            self.qkv_in.weight.copy_(weight)
            self.qkv_in.bias.copy_(bias)
            if heads > 1:
                if chunk != self.val_dim:
                    raise ValueError("the cascade needs value channels == input chunk channels "
                                     f"({self.val_dim} vs {chunk})")
                cascade = torch.stack([m.weight.flatten(1) for m in qkvs[1:]])  # (heads-1, 2k+d, d)
            else:
                cascade = weight.new_zeros(0, weight.shape[0], chunk)
            self.register_buffer("cascade", cascade.contiguous())
            dws = [_folded(m) for m in src.dws]
            for i, m in enumerate(dws):  # the softmax scale moves into the query: (s*q) k == s*(q k)
                self.register_buffer(f"dw_weight{i}", (m.weight * src.scale).contiguous())
                self.register_buffer(f"dw_bias{i}", (m.bias * src.scale).contiguous())
        self.proj = _folded(src.proj)
        pos = src.pos_bias
        self.pos_bias = pos.fuse() if isinstance(pos, RelPosBias) else pos

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        n = h * w
        kd, vd = self.key_dim, self.val_dim
        bias = self.pos_bias((h, w), (h, w))  # (heads, N, N)
        pre = self.qkv_in(x).view(b, self.num_heads, 2 * kd + vd, n)  # every head's projection of its chunk
        outs = []
        feat = None
        for i in range(self.num_heads):
            t = pre[:, i]  # (B, 2k+d, N)
            if feat is not None:  # + W_i out_{i-1}: the cascaded part, (2k+d, d) @ (B, d, N)
                t = torch.matmul(self.cascade[i - 1], feat).add_(t)
            q = F.conv2d(t[:, :kd].reshape(b, kd, h, w), getattr(self, f"dw_weight{i}"),
                         getattr(self, f"dw_bias{i}"), padding=self.kernels[i] // 2, groups=kd)
            attn = torch.baddbmm(bias[i], q.view(b, kd, n).transpose(1, 2), t[:, kd:2 * kd]).softmax(dim=-1)
            feat = torch.bmm(t[:, 2 * kd:], attn.transpose(1, 2))  # (B, d, N)
            outs.append(feat)
        return self.proj(torch.relu(torch.cat(outs, dim=1).view(b, -1, h, w)))

    def fuse(self) -> "FusedCascadedGroupAttention":
        return self


class LocalWindowAttention(nn.Module):
    """Cascaded group attention inside ``window`` x ``window`` windows of a map (B, C, H, W) -> (B, C, H, W).

    The effective window is ``min(window, H, W)`` (as the official code clips it to the stage resolution); where it
    differs from the training window ``resolution`` the bias table is resized. A map that is exactly one window is
    attended globally; otherwise it is zero-padded at the bottom/right to a multiple of the window, the windows are
    attended as one batch, and the result is cropped back to H x W.
    """

    def __init__(self, dim: int, key_dim: int = 16, num_heads: int = 4, attn_ratio: float = 4.0,
                 resolution: int = 14, window: int = 7, kernels: Sequence[int] = (5, 5, 5, 5)):
        super().__init__()
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self.attn = CascadedGroupAttention(dim, key_dim, num_heads, attn_ratio, min(window, resolution), kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        ws = min(self.window, h, w)
        if h == ws and w == ws:
            return self.attn(x)
        pad_b, pad_r = (-h) % ws, (-w) % ws
        if pad_b or pad_r:
            x = F.pad(x, (0, pad_r, 0, pad_b))
        nh, nw = (h + pad_b) // ws, (w + pad_r) // ws
        # (B, C, nH*ws, nW*ws) -> (B, nH, nW, C, ws, ws) -> (B*nH*nW, C, ws, ws): windows stacked on the batch
        x = x.view(b, c, nh, ws, nw, ws).permute(0, 2, 4, 1, 3, 5).reshape(b * nh * nw, c, ws, ws)
        x = self.attn(x)
        x = x.view(b, nh, nw, c, ws, ws).permute(0, 3, 1, 4, 2, 5).reshape(b, c, nh * ws, nw * ws)
        if pad_b or pad_r:
            x = x[:, :, :h, :w]
        return x

    def extra_repr(self) -> str:
        return f"window={self.window}"


__all__ = ["CascadedGroupAttention", "FusedCascadedGroupAttention", "LocalWindowAttention"]
