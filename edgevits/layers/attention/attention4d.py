"""EfficientFormerV2's attentions on (B, C, H, W) maps: Attention4D and Attention4DDownsample.

Both add a learned relative-position bias (``RelPosBias``) to the attention logits. The bias table is defined at
the training resolution and resized bicubically to whatever resolution the input has, so any input size divisible
by 32 works. In the train/eval form the bias is gathered from the live parameter on every call (never stale);
``fuse()`` returns a deploy module with every BatchNorm folded, the query scale folded into the query conv, the
query/key/value convolutions merged into one, and the bias gathered once (``RelPosBiasDeploy``); the deploy
modules work on channels-last maps and run their convs as ``FusedConv`` (oneDNN post-op kernels on CPU).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..bias import RelPosBias, RelPosBiasDeploy
from ..conv import ConvNorm, folded_conv, merge_convs
from ..kernels import FusedConv, fusable_act
from ..misc import DeployModule, batched_matmul, gelu_, to_2tuple

Size = tuple[int, int]


class InplaceGELU(nn.Module):
    """Exact (erf) GELU that overwrites its input when no gradient is needed: the deploy forms apply it to
    freshly computed conv outputs, so no new buffer is allocated and first-touched (on CPU the early stages'
    maps exceed the L2 cache and a fresh buffer costs page faults)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_(x)


def deploy_act(act: nn.Module) -> nn.Module:
    """The in-place variant of an exact GELU, any other activation unchanged."""
    return InplaceGELU() if type(act) is nn.GELU and act.approximate == "none" else act


def _mix_heads(weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv over the head axis of (B, heads, Nq, Nk) maps, as one batched matrix product plus ``bias``
    ((heads, Nq*Nk) or (heads, 1)), without the im2col a Conv2d with 8 channels goes through."""
    b, h, nq, nk = x.shape
    out = torch.baddbmm(bias.expand(b, h, -1), weight.expand(b, h, h), x.reshape(b, h, nq * nk))
    return out.view(b, h, nq, nk)


def _head_dims(attn: nn.Module, key_dim: int, num_heads: int, attn_ratio: int) -> int:
    """Set the head sizes of an EfficientFormerV2 attention (``num_heads``, ``key_dim``, the query ``scale``, ``d``
    value channels per head, ``dh`` in all); returns the query/key channels of all heads."""
    attn.num_heads, attn.key_dim, attn.scale = num_heads, key_dim, key_dim ** -0.5
    attn.d = attn_ratio * key_dim
    attn.dh = attn.d * num_heads
    return key_dim * num_heads


class Attention4D(nn.Module):
    """Multi-head self-attention on a (B, C, H, W) map with talking heads and a local value branch.

    ``attn = th2(softmax(th1(q k^T * key_dim**-0.5 + bias)))``, ``out = proj(GELU(attn v + dw3x3(v)))``, where
    q, k, v are 1x1 conv + BN, ``th1``/``th2`` are 1x1 convs across the heads, proj is 1x1 conv + BN.
    With ``stride=2`` (EfficientFormerV2's stage 3, "stride attention") a dw3x3 s2 conv + BN first halves the map
    and a bilinear x2 upsample restores it after the attention (before the activation).

    Args:
        dim: channels in and out.
        resolution: the attention grid at the training resolution (after the stride); sizes the bias table.
    """

    def __init__(self, dim: int, key_dim: int = 32, num_heads: int = 8, attn_ratio: int = 4,
                 resolution: int | Size = 7, stride: int | None = None, act: type[nn.Module] = nn.GELU):
        super().__init__()
        kh = _head_dims(self, key_dim, num_heads, attn_ratio)
        self.stride = stride
        self.stride_conv = ConvNorm(dim, dim, 3, stride=stride, groups=dim, bias=True) if stride else None
        self.q = ConvNorm(dim, kh, 1, bias=True)
        self.k = ConvNorm(dim, kh, 1, bias=True)
        self.v = ConvNorm(dim, self.dh, 1, bias=True)
        self.v_local = ConvNorm(self.dh, self.dh, 3, groups=self.dh, bias=True)
        self.talking_head1 = nn.Conv2d(num_heads, num_heads, 1)
        self.talking_head2 = nn.Conv2d(num_heads, num_heads, 1)
        self.act = act()
        self.proj = ConvNorm(self.dh, dim, 1, bias=True)
        self.pos_bias = RelPosBias(num_heads, to_2tuple(resolution))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        if self.stride_conv is not None:
            x = self.stride_conv(x)
        h, w = x.shape[-2:]
        n = h * w
        q = self.q(x).reshape(B, self.num_heads, self.key_dim, n).transpose(-2, -1)  # (B, heads, N, key_dim)
        k = self.k(x).reshape(B, self.num_heads, self.key_dim, n)  # (B, heads, key_dim, N)
        v = self.v(x)
        v_local = self.v_local(v)
        v = v.reshape(B, self.num_heads, self.d, n).transpose(-2, -1)  # (B, heads, N, d)
        attn = batched_matmul(q, k) * self.scale + self.pos_bias((h, w), (h, w))  # (B, heads, N, N)
        attn = self.talking_head1(attn)
        # softmax over a flat view: ExecuTorch 1.5's XNNPACK lowering keeps a conv's output channels-last and
        # then applies a 4-D softmax(dim=-1) to the wrong axis (12-24 % relative error on EfficientFormerV2-S0);
        # a view costs nothing in PyTorch
        attn = self.talking_head2(attn.flatten(0, 2).softmax(dim=-1).view_as(attn))
        out = batched_matmul(attn, v).transpose(-2, -1).reshape(B, self.dh, h, w) + v_local
        if self.stride_conv is not None:
            out = F.interpolate(out, size=(H, W), mode="bilinear", align_corners=False)
        return self.proj(self.act(out))

    @torch.no_grad()
    def fuse(self) -> "Attention4DDeploy":
        return Attention4DDeploy(self)


class Attention4DDeploy(DeployModule, nn.Module):
    """Deploy form of ``Attention4D``: same outputs, fewer and cheaper operations.

    BNs folded into their convs; q, k, v one conv with the 1/sqrt(key_dim) scale folded into q; the first talking
    head folded into the bias table (``th1(s + b) = W1 s + (W1 b + b1)``: head mixing commutes with the per-head
    resize and gather), both talking heads applied as one batched matrix product instead of a Conv2d over
    (B, heads, N, N); the bias gathered once.
    """

    def __init__(self, src: Attention4D):
        super().__init__()
        self.num_heads, self.key_dim, self.d, self.dh = src.num_heads, src.key_dim, src.d, src.dh
        kh = self.key_dim * self.num_heads
        self.splits = [kh, kh, self.dh]
        self.stride_conv = FusedConv(folded_conv(src.stride_conv)) if src.stride_conv is not None else None
        qkv = [folded_conv(src.q), folded_conv(src.k), folded_conv(src.v)]
        self.qkv = FusedConv(merge_convs(qkv, [src.scale, 1.0, 1.0]))
        # act(v_local(v) + attn v), the activation fused into v_local unless the bilinear upsample comes first
        fused = fusable_act(src.act) if src.stride_conv is None else None
        self.v_local = FusedConv(folded_conv(src.v_local), fused)
        self.act = None if fused else deploy_act(src.act)
        heads = self.num_heads
        w1 = src.talking_head1.weight.detach().reshape(heads, heads)
        b1 = src.talking_head1.bias.detach()
        self.register_buffer("th1_weight", w1.clone())
        self.register_buffer("th2_weight", src.talking_head2.weight.detach().reshape(heads, heads).clone())
        self.register_buffer("th2_bias", src.talking_head2.bias.detach().reshape(heads, 1).clone())
        mixed = RelPosBias(heads, src.pos_bias.table_size).to(w1.device, w1.dtype)
        mixed.attention_biases.copy_(w1 @ src.pos_bias.table + b1[:, None])  # pos_bias: in its deploy form by now
        self.pos_bias = RelPosBiasDeploy(mixed)
        self.proj = FusedConv(folded_conv(src.proj))  # the enclosing block passes its residual to it

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``residual`` is added to the output inside the last conv (the block's skip connection)."""
        # Written for channels-last maps (the deploy model's layout): per-head views are taken from the
        # (B, h, w, C) memory order and the attention output is written back in it, so no map changes layout.
        B, _, H, W = x.shape
        if self.stride_conv is not None:
            x = self.stride_conv(x)
        h, w = x.shape[-2:]
        n, heads = h * w, self.num_heads
        qkv = self.qkv(x)
        v_map = qkv[:, -self.dh:].contiguous(memory_format=torch.channels_last)
        tokens = qkv.permute(0, 2, 3, 1).reshape(B, n, -1)  # (B, N, 2*kh + dh): a view for channels-last maps
        q, k, v = tokens.split(self.splits, dim=-1)
        q = q.reshape(B, n, heads, self.key_dim).transpose(1, 2)  # (B, heads, N, key_dim)
        k = k.reshape(B, n, heads, self.key_dim).permute(0, 2, 3, 1)  # (B, heads, key_dim, N)
        v = v.reshape(B, n, heads, self.d).transpose(1, 2)  # (B, heads, N, d)
        bias = self.pos_bias((h, w), (h, w)).reshape(heads, n * n)
        attn = _mix_heads(self.th1_weight, q @ k, bias).softmax(dim=-1)
        attn = _mix_heads(self.th2_weight, attn, self.th2_bias)
        out = (attn @ v).transpose(1, 2).reshape(B, h, w, self.dh).permute(0, 3, 1, 2)  # channels-last strides
        out = self.v_local(v_map, residual=out)
        if self.stride_conv is not None:
            # PyTorch's CPU bilinear kernel converts a channels-first input to channels-last and back on every
            # call (slow transposing copies of the (dh, H, W) output); on a channels-last input it runs directly.
            out = F.interpolate(out, size=(H, W), mode="bilinear", align_corners=False)
        return self.proj(out if self.act is None else self.act(out), residual)


class LocalGlobalQuery(nn.Module):
    """EfficientFormerV2's downsampling query: ``proj(dw3x3_s2(x) + x[..., ::2, ::2])`` (the 'pool' is an
    AvgPool2d with kernel 1 and stride 2, i.e. a subsampling), proj = 1x1 conv + BN."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.local = nn.Conv2d(in_dim, in_dim, 3, stride=2, padding=1, groups=in_dim)
        self.pool = nn.AvgPool2d(1, 2, 0)
        self.proj = ConvNorm(in_dim, out_dim, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.local(x) + self.pool(x))


class Attention4DDownsample(nn.Module):
    """Attention that halves the map: queries from ``LocalGlobalQuery`` on the (H/2, W/2) grid, keys and values
    at (H, W); ``out = proj(GELU(softmax(q k^T * key_dim**-0.5 + bias) v + dw3x3_s2(v)))``. No talking heads.

    The bias table lives on the key grid (``resolution``, e.g. 14x14 at 224); query (i, j) sits at key position
    (2i, 2j), so its offset to key (y, x) is (|2i - y|, |2j - x|).
    """

    def __init__(self, dim: int, out_dim: int, key_dim: int = 16, num_heads: int = 8, attn_ratio: int = 4,
                 resolution: int | Size = 14, act: type[nn.Module] = nn.GELU):
        super().__init__()
        kh = _head_dims(self, key_dim, num_heads, attn_ratio)
        res = to_2tuple(resolution)
        self.q = LocalGlobalQuery(dim, kh)
        self.k = ConvNorm(dim, kh, 1, bias=True)
        self.v = ConvNorm(dim, self.dh, 1, bias=True)
        self.v_local = ConvNorm(self.dh, self.dh, 3, stride=2, groups=self.dh, bias=True)
        self.act = act()
        self.proj = ConvNorm(self.dh, out_dim, 1, bias=True)
        self.pos_bias = RelPosBias(num_heads, res, q_size=((res[0] + 1) // 2, (res[1] + 1) // 2), k_size=res,
                                   stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        q = self.q(x)
        h2, w2 = q.shape[-2:]
        q = q.reshape(B, self.num_heads, self.key_dim, h2 * w2).transpose(-2, -1)  # (B, heads, N/4, key_dim)
        k = self.k(x).reshape(B, self.num_heads, self.key_dim, H * W)  # (B, heads, key_dim, N)
        v = self.v(x)
        v_local = self.v_local(v)
        v = v.reshape(B, self.num_heads, self.d, H * W).transpose(-2, -1)  # (B, heads, N, d)
        attn = (batched_matmul(q, k) * self.scale + self.pos_bias((h2, w2), (H, W), 2)).softmax(dim=-1)
        out = batched_matmul(attn, v).transpose(-2, -1).reshape(B, self.dh, h2, w2) + v_local  # (B, dh, h2, w2)
        return self.proj(self.act(out))

    @torch.no_grad()
    def fuse(self) -> "Attention4DDownsampleDeploy":
        return Attention4DDownsampleDeploy(self)


class Attention4DDownsampleDeploy(DeployModule, nn.Module):
    """Deploy form of ``Attention4DDownsample``: the query's subsampling folded into the centre tap of its dw
    conv (a 3x3 s2 p1 conv's centre tap at output (i, j) reads input (2i, 2j)), BNs folded, the query scale folded
    into the query projection, k and v merged into one conv, the bias gathered once."""

    def __init__(self, src: Attention4DDownsample):
        super().__init__()
        self.num_heads, self.key_dim, self.d, self.dh = src.num_heads, src.key_dim, src.d, src.dh
        local = src.q.local
        q_local = nn.Conv2d(local.in_channels, local.out_channels, 3, stride=2, padding=1, groups=local.groups,
                            device=local.weight.device, dtype=local.weight.dtype)
        q_local.weight.copy_(local.weight)
        q_local.weight[:, 0, 1, 1] += 1.0
        q_local.bias.copy_(local.bias)
        self.q_local = FusedConv(q_local)
        self.q_proj = FusedConv(merge_convs([folded_conv(src.q.proj)], [src.scale]))
        self.kv = FusedConv(merge_convs([folded_conv(src.k), folded_conv(src.v)]))
        self.splits = [self.key_dim * self.num_heads, self.dh]
        fused = fusable_act(src.act)  # act(v_local(v) + attn v), fused into v_local where it can be
        self.v_local = FusedConv(folded_conv(src.v_local), fused)
        self.act = None if fused else deploy_act(src.act)
        self.pos_bias = src.pos_bias  # already in its deploy form
        self.proj = FusedConv(folded_conv(src.proj))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``residual`` is added to the output inside the last conv (the downsample's conv branch)."""
        # channels-last friendly, as Attention4DDeploy.forward
        B, _, H, W = x.shape
        heads, n = self.num_heads, H * W
        q = self.q_proj(self.q_local(x))
        h2, w2 = q.shape[-2:]
        q = q.permute(0, 2, 3, 1).reshape(B, h2 * w2, heads, self.key_dim).transpose(1, 2)  # (B, heads, N/4, kd)
        kv = self.kv(x)
        k, v = kv.permute(0, 2, 3, 1).reshape(B, n, -1).split(self.splits, dim=-1)
        k = k.reshape(B, n, heads, self.key_dim).permute(0, 2, 3, 1)  # (B, heads, key_dim, N)
        v = v.reshape(B, n, heads, self.d).transpose(1, 2)  # (B, heads, N, d)
        attn = (q @ k + self.pos_bias((h2, w2), (H, W), 2)).softmax(dim=-1)  # (B, heads, N/4, N)
        out = (attn @ v).transpose(1, 2).reshape(B, h2, w2, self.dh).permute(0, 3, 1, 2)  # channels-last strides
        v_map = kv[:, -self.dh:].contiguous(memory_format=torch.channels_last)
        out = self.v_local(v_map, residual=out)
        return self.proj(out if self.act is None else self.act(out), residual)
