"""Cascaded group attention and local window attention (EfficientViT-MSRA, Liu et al., CVPR 2023).

Both work on feature maps (B, C, H, W), not on token sequences.

``CascadedGroupAttention`` splits the channels into one chunk per head. Head ``i`` attends over the tokens of
``chunk_i + out_{i-1}`` (the previous head's output cascades into the next head's input), with its own 1x1
q/k/v projection (conv + BN), a depthwise conv + BN on the query only, and a learned relative-position bias. The
head outputs are concatenated and projected back (ReLU -> 1x1 conv + BN).

``LocalWindowAttention`` applies it inside non-overlapping windows (7x7 in the released models, clipped to the
stage's map at the training size: 4x4 in the last stage at 224): the map is padded at the bottom/right to a
multiple of the window, cut into windows that are stacked along the batch dimension, attended, put back and
cropped. A map of exactly one window is attended globally.

Deploy form (``fuse()``, called by ``edgevits.fuse_model``): ``CascadedGroupAttentionDeploy`` and
``LocalWindowAttentionDeploy``, on tokens in channels-last order. Every conv + BN is folded, the softmax scale is
folded into the query's depthwise conv, and the bias tables are gathered once. Since each head's q/k/v projection
is a 1x1 conv, ``qkv_i(chunk_i + out_{i-1}) = qkv_i(chunk_i) + W_i out_{i-1}``: the projections of all the input
chunks are computed together by one batched matrix product, and only the correction ``W_i out_{i-1}`` (one
``addmm``) stays in the sequential cascade. The query's depthwise conv runs as a batched product with per-channel
(N, N) matrices on windows of up to 49 tokens. That roughly halves the number of small ops per head, which is what
limits these models at batch 1.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..bias import RelPosBias
from ..conv import ConvNorm, folded_conv
from ..kernels import FusedLinear
from ..misc import DeployModule, tensor_stamp

Size = tuple[int, int]


class CascadedGroupAttention(nn.Module):
    """Cascaded group attention on a map (B, C, H, W) -> (B, C, H, W) (each batch item is one window).

    Args:
        dim: channels C (split evenly over the heads).
        key_dim: query/key channels per head (16 in the released models).
        num_heads: heads.
        attn_ratio: value channels per head = ``int(attn_ratio * key_dim)``; None (the default) gives
            ``dim / num_heads``, what EfficientViT uses and what the cascade needs (each head's output is added to
            the next head's input chunk).
        resolution: the window side at the training resolution; sizes the bias table (heads, resolution**2).
        kernels: the kernel of each head's depthwise conv on the query.

    At a window other than ``resolution`` x ``resolution`` the table is resized bicubically (``RelPosBias``).
    Cost: O(heads * N^2 * (key_dim + value_dim)) per window of N tokens plus the 1x1 projections.
    """

    def __init__(self, dim: int, key_dim: int = 16, num_heads: int = 4, attn_ratio: float | None = None,
                 resolution: int = 7, kernels: Sequence[int] = (5, 5, 5, 5)):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if len(kernels) < num_heads:
            raise ValueError(f"need one query kernel per head ({num_heads}), got {list(kernels)}")
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.val_dim = dim // num_heads if attn_ratio is None else int(attn_ratio * key_dim)
        if num_heads > 1 and self.val_dim != dim // num_heads:
            raise ValueError(f"the cascade adds each head's output ({self.val_dim} value channels) to the next "
                             f"head's input chunk ({dim // num_heads} channels): use attn_ratio=None or "
                             f"{dim / num_heads / key_dim:g}")
        self.scale = key_dim ** -0.5
        self.resolution = resolution
        self.kernels = tuple(int(k) for k in kernels[:num_heads])
        chunk = dim // num_heads
        self.qkvs = nn.ModuleList(ConvNorm(chunk, 2 * key_dim + self.val_dim, 1) for _ in range(num_heads))
        self.dws = nn.ModuleList(ConvNorm(key_dim, key_dim, k, groups=key_dim) for k in self.kernels)
        self.proj = ConvNorm(self.val_dim * num_heads, dim, 1, bn_weight_init=0.0)
        self.pos_bias = RelPosBias(num_heads, (resolution, resolution))

    # The graph export form (runtime.export.graph_form) sets this on its copy: heads and q/k/v taken as slices,
    # products as torch.bmm and the bias row as a slice, the same arithmetic in ops ExecuTorch's XNNPACK delegate
    # takes (split, select and matmul's expand fell outside it and cut EfficientViT-M0 into 79 partitions). Not the
    # default: the ONNX exporter takes 50 % longer on the sliced graph (M0: 39 vs 26 s).
    slice_heads = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        bias = self.pos_bias((h, w), (h, w))  # (heads, N, N), gathered from the live table on every call
        if self.slice_heads:
            return self._forward_sliced(x, bias)
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

    def _forward_sliced(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        c, kd, vd = x.shape[1] // self.num_heads, self.key_dim, self.val_dim
        outs = []
        feat = x[:, :c]
        for i, (qkv, dw) in enumerate(zip(self.qkvs, self.dws)):
            if i > 0:
                feat = feat + x[:, i * c:(i + 1) * c]
            t = qkv(feat)
            q, k, v = dw(t[:, :kd]).flatten(2), t[:, kd:2 * kd].flatten(2), t[:, 2 * kd:].flatten(2)  # (B, d, N)
            attn = torch.bmm(q.transpose(1, 2), k) * self.scale + bias[i:i + 1]  # (B, N, N)
            attn = attn.softmax(dim=-1)
            feat = torch.bmm(v, attn.transpose(1, 2)).view(b, vd, h, w)
            outs.append(feat)
        return self.proj(torch.relu(torch.cat(outs, dim=1)))

    def fuse(self) -> "CascadedGroupAttentionDeploy":
        return CascadedGroupAttentionDeploy(self)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, key_dim={self.key_dim}, val_dim={self.val_dim}, "
                f"kernels={self.kernels}, resolution={self.resolution}")


def dw_matrix(weight: torch.Tensor, size: Size) -> torch.Tensor:
    """The depthwise conv ``weight`` (C, 1, K, K) (zero padding K // 2, stride 1) on an (H, W) map, as one
    (C, N, N) matrix per channel: ``out[c, n] = sum_m M[c, n, m] * in[c, m]`` with N = H * W tokens."""
    k = weight.shape[-1]
    p = k // 2
    ys, xs = torch.meshgrid(torch.arange(size[0], device=weight.device), torch.arange(size[1], device=weight.device),
                            indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    dy = ys[None, :] - ys[:, None] + p  # (N, N): tap row used by output n for input m
    dx = xs[None, :] - xs[:, None] + p
    valid = (dy >= 0) & (dy < k) & (dx >= 0) & (dx < k)
    idx = dy.clamp(0, k - 1) * k + dx.clamp(0, k - 1)
    return weight.flatten(1)[:, idx] * valid  # (C, N, N)


class CascadedGroupAttentionDeploy(DeployModule, nn.Module):
    """Deploy form of ``CascadedGroupAttention``: same outputs, fewer and cheaper ops at small batch.

    It works on tokens in channels-last order (``forward_tokens``: (B, N, C) with the window's (H, W)), the layout
    in which every 1x1 conv is one matrix product whatever the batch:

    * ``qkv_weight``/``qkv_bias`` (heads, chunk, 2*key_dim + val_dim): every head's q/k/v projection (BN folded),
      applied to all the input chunks at once (one batched matrix product).
    * The cascade: head i adds ``out_{i-1} W_i`` to its precomputed projection (one ``addmm``).
    * The query's depthwise conv (BN and the softmax scale folded in) runs as one batched matrix product with a
      per-channel (N, N) matrix (``dw_matrix``), built once per window size: on 7x7 windows that is several times
      cheaper than a convolution call.
    * ``proj``: the output 1x1 conv with its BN folded (``FusedLinear``); ``pos_bias``: the gathered bias.
    """

    matrix_dw_max_tokens = 49  # windows up to this many tokens run the query conv as matrices

    def __init__(self, src: CascadedGroupAttention):
        super().__init__()
        self.num_heads, self.key_dim, self.val_dim = src.num_heads, src.key_dim, src.val_dim
        self.kernels = src.kernels
        self.resolution = src.resolution
        qkvs = [folded_conv(m) for m in src.qkvs]
        if src.num_heads > 1 and qkvs[0].in_channels != self.val_dim:
            raise ValueError(f"the cascade needs value channels == chunk channels ({self.val_dim} vs "
                             f"{qkvs[0].in_channels})")
        with torch.no_grad():
            weight = torch.stack([m.weight.flatten(1).t() for m in qkvs])  # (heads, chunk, 2k+d)
            self.register_buffer("qkv_weight", weight.detach().contiguous())
            self.register_buffer("qkv_bias", torch.stack([m.bias for m in qkvs])[:, None, :].detach().contiguous())
            # the softmax scale moves into the query: (s q)^T k == s (q^T k)
            for i, m in enumerate(folded_conv(m) for m in src.dws):
                self.register_buffer(f"dw_weight{i}", (m.weight * src.scale).detach().contiguous())
                dw_bias = (m.bias * src.scale)[:, None, None]  # (k, 1, 1)
                self.register_buffer(f"dw_bias{i}", dw_bias.detach().contiguous())
        self.proj = FusedLinear.from_conv1x1(folded_conv(src.proj))  # on (B, N, heads * d) tokens
        self.pos_bias = src.pos_bias  # already in its deploy form
        self._dw_cache: dict = {}

    def _dw_matrices(self, size: Size) -> list[torch.Tensor]:
        weights = [getattr(self, f"dw_weight{i}") for i in range(self.num_heads)]
        if torch.compiler.is_compiling():  # compile and export trace fake tensors: no storage to key a cache on;
            return [dw_matrix(w, size) for w in weights]  # the graph builds the matrices from the weights instead
        key = tuple(tensor_stamp(w) for w in weights)
        hit = self._dw_cache.get(size)
        if hit is None or hit[0] != key:
            with torch.no_grad():
                hit = (key, [dw_matrix(w, size) for w in weights])
            self._dw_cache[size] = hit
        return hit[1]

    def _apply(self, fn, recurse=True):  # .to()/.half() move the buffers; cached matrices would not follow
        self._dw_cache = {}
        return super()._apply(fn, recurse)

    def forward_tokens(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        """(B, N, C) tokens of windows of size (H, W), N = H * W -> (B, N, C); the same values as
        ``CascadedGroupAttention`` on the corresponding (B, C, H, W) windows."""
        b, n, c = x.shape
        heads, kd = self.num_heads, self.key_dim
        bias = self.pos_bias(size, size)  # (heads, N, N)
        dws = self._dw_matrices(size) if size[0] * size[1] <= self.matrix_dw_max_tokens else None
        # every head's projection of its own chunk at once: (heads, B*N, chunk) @ (heads, chunk, 2k+d)
        pre = torch.baddbmm(self.qkv_bias, x.reshape(b * n, heads, c // heads).transpose(0, 1), self.qkv_weight)
        outs = []
        feat = None
        for i in range(heads):
            t = pre[i]  # (B*N, 2k+d)
            if feat is not None:  # the cascade: + out_{i-1} W_i, (B*N, d) @ (d, 2k+d)
                t = torch.addmm(t, feat.view(b * n, -1), self.qkv_weight[i])
            t = t.view(b, n, -1)
            if dws is not None:
                # query depthwise conv as (k, N, N) @ (k, N, B) -> (k, N, B), then (B, N, k) for the scores; with
                # B > 1 the copies give every product unit-stride operands, so that each runs as one batched GEMM
                q = t[..., :kd].permute(2, 1, 0)
                q = torch.baddbmm(getattr(self, f"dw_bias{i}"), dws[i], q.contiguous() if b > 1 else q)
                q = q.permute(2, 1, 0).contiguous() if b > 1 else q.permute(2, 1, 0)
            else:  # the conv itself, on the channels-last view of the query: (B, H, W, k) -> (B, N, k)
                q = F.conv2d(t[..., :kd].reshape(b, size[0], size[1], kd).permute(0, 3, 1, 2),
                             getattr(self, f"dw_weight{i}"), getattr(self, f"dw_bias{i}").view(-1),
                             padding=self.kernels[i] // 2, groups=kd)
                q = q.permute(0, 2, 3, 1).reshape(b, n, kd)
            attn = torch.baddbmm(bias[i], q, t[..., kd:2 * kd].transpose(1, 2)).softmax(dim=-1)  # (B, N, N)
            feat = torch.bmm(attn, t[..., 2 * kd:])  # (B, N, d)
            outs.append(feat)
        return self.proj(torch.relu_(torch.cat(outs, dim=-1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x.permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, N, C)
        return self.forward_tokens(tokens, (h, w)).view(b, h, w, c).permute(0, 3, 1, 2)


class LocalWindowAttention(nn.Module):
    """Cascaded group attention inside square windows of a map (B, C, H, W) -> (B, C, H, W).

    The window side is ``min(window, resolution)``, fixed when the layer is built (``resolution`` is the stage's
    map side at the training size), as in the official code and timm: the bias table is learned for exactly that
    window. A map of exactly one window is attended globally; any other map (larger, smaller or not square) is
    zero-padded at the bottom/right to a multiple of the window, cut into windows stacked along the batch,
    attended, put back and cropped to H x W. So the layer takes any input size and never resizes a table at run
    time; building the model for another ``img_size`` changes the window and resizes the tables on load.
    """

    def __init__(self, dim: int, key_dim: int = 16, num_heads: int = 4, attn_ratio: float | None = None,
                 resolution: int = 14, window: int = 7, kernels: Sequence[int] = (5, 5, 5, 5)):
        super().__init__()
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = min(window, resolution)
        self.attn = CascadedGroupAttention(dim, key_dim, num_heads, attn_ratio, self.window, kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        ws = self.window
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

    def fuse(self) -> "LocalWindowAttentionDeploy":
        return LocalWindowAttentionDeploy(self.window, self.attn)  # its attention is in its deploy form by now

    def extra_repr(self) -> str:
        return f"window={self.window}"


class LocalWindowAttentionDeploy(DeployModule, nn.Module):
    """Deploy form of ``LocalWindowAttention``: windows are cut from the channels-last view of the map, so a map
    stored channels-last (as the deploy form of EfficientViT keeps them) is partitioned with at most one copy and
    the output comes back channels-last. Same outputs as the train/eval form."""

    def __init__(self, window: int, attn: CascadedGroupAttentionDeploy):
        super().__init__()
        self.window = window
        self.attn = attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        ws = self.window
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C): a view when x is channels-last
        pad_b, pad_r = (-h) % ws, (-w) % ws
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        nh, nw = (h + pad_b) // ws, (w + pad_r) // ws
        # (B, nH*ws, nW*ws, C) -> (B, nH, nW, ws, ws, C) -> (B*nH*nW, ws*ws, C): windows stacked on the batch
        x = x.reshape(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
        x = self.attn.forward_tokens(x, (ws, ws))
        x = x.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, nh * ws, nw * ws, c)
        if pad_b or pad_r:
            x = x[:, :h, :w]
        return x.permute(0, 3, 1, 2)  # (B, C, H, W), channels-last memory

    def extra_repr(self) -> str:
        return f"window={self.window}"


__all__ = ["CascadedGroupAttention", "CascadedGroupAttentionDeploy", "LocalWindowAttention",
           "LocalWindowAttentionDeploy", "dw_matrix"]
