"""EfficientViT-MSRA (Liu et al., CVPR 2023): sandwich blocks around cascaded group attention.

Matches the official microsoft/Cream ``EfficientViT/classification/model/efficientvit.py`` (and timm's
``efficientvit_msra``). Not MIT's EfficientViT, which shares the name.

Layout: a stride-16 stem of four 3x3 stride-2 conv+BN (ReLU between), then three stages. A block is
dw3x3 -> FFN -> local window attention -> dw3x3 -> FFN, each a residual branch. Stages 2 and 3 open with a
downsample: [dw3x3, FFN] at the old width, PatchMerging (1x1 -> ReLU -> dw3x3 s2 -> ReLU -> squeeze-excite -> 1x1),
[dw3x3, FFN] at the new width. The head is BN1d + Linear on the pooled features.

Any input size works (the stride-2 convs round up, the windows pad): windows are clipped to the stage's map at the
training size (``img_size``) and padded as in the official code and timm, so a model built at 224 runs at 384 or
192x288 with the windows, and bias tables, it was trained with; building it for another ``img_size`` resizes the
tables on load where the window changes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import ConvNorm, DropPath, NormLinear, to_2tuple
from ..layers.attention.cascaded import LocalWindowAttention
from ..registry import register_model
from .base import ClassifierModel, ModelConfig


@dataclass(frozen=True, kw_only=True)
class EfficientViTConfig(ModelConfig):
    distillation: bool = False  # the released checkpoints have a single head
    embed_dims: tuple[int, ...] = (64, 128, 192)
    depths: tuple[int, ...] = (1, 2, 3)
    num_heads: tuple[int, ...] = (4, 4, 4)
    key_dims: tuple[int, ...] = (16, 16, 16)
    window_sizes: tuple[int, ...] = (7, 7, 7)
    kernels: tuple[int, ...] = (5, 5, 5, 5)  # query depthwise kernel of each head

    def __post_init__(self):
        super().__post_init__()
        n = len(self.embed_dims)
        if not (len(self.depths) == len(self.num_heads) == len(self.key_dims) == len(self.window_sizes) == n):
            raise ValueError("embed_dims, depths, num_heads, key_dims and window_sizes need one entry per stage")
        if max(self.num_heads) > len(self.kernels):
            raise ValueError(f"kernels {self.kernels} needs one entry per head (up to {max(self.num_heads)})")
        for dim, heads in zip(self.embed_dims, self.num_heads):
            if dim % heads:
                raise ValueError(f"embed dim {dim} is not divisible by {heads} heads")


def _make_divisible(v: float, divisor: int = 8) -> int:
    return max(divisor, int(v + divisor / 2) // divisor * divisor)


class DWConvResidual(ConvNorm):
    """``x + BN(dw3x3(x))``. The deploy form is a single depthwise conv (identity added to the centre tap)."""

    def __init__(self, dim: int, bn_weight_init: float = 1.0, drop_path: float = 0.0):
        super().__init__(dim, dim, 3, groups=dim, bn_weight_init=bn_weight_init)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(super().forward(x))

    @torch.no_grad()
    def fuse(self) -> nn.Module:
        conv = super().fuse()
        conv.weight[:, 0, 1, 1] += 1.0
        return _DeployConv(conv)


class _DeployConv(nn.Module):
    """A folded conv, optionally followed by an in-place ReLU, for the deploy form."""

    def __init__(self, conv: nn.Conv2d, relu: bool = False):
        super().__init__()
        with torch.no_grad():
            self.register_buffer("weight", conv.weight.detach().clone())
            self.register_buffer("bias", conv.bias.detach().clone())
        self.stride, self.padding, self.groups = tuple(conv.stride), tuple(conv.padding), conv.groups
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, 1, self.groups)
        return torch.relu_(x) if self.relu else x

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[1] * self.groups}, {self.weight.shape[0]}, kernel={tuple(self.weight.shape[2:])}"
                f", stride={tuple(self.stride)}, groups={self.groups}, relu={self.relu}")


class FFN(nn.Module):
    """``x + BN(1x1(ReLU(BN(1x1(x)))))``, expansion 2, the last BN starting at 0."""

    def __init__(self, dim: int, hidden: int, drop_path: float = 0.0):
        super().__init__()
        self.pw1 = ConvNorm(dim, hidden, 1)
        self.pw2 = ConvNorm(hidden, dim, 1, bn_weight_init=0.0)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.pw2(torch.relu(self.pw1(x))))

    def fuse(self) -> nn.Module:
        if isinstance(self.pw1, nn.Conv2d) and isinstance(self.pw2, nn.Conv2d):
            return _FusedFFN(self.pw1, self.pw2)
        return self


def _channels_last_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B*H*W, C): a view when ``x`` is stored channels-last (a copy otherwise)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def _from_rows(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B*H*W, C') rows back to a (B, C', H, W) map stored channels-last (a view)."""
    b, _, h, w = like.shape
    return rows.view(b, h, w, -1).permute(0, 3, 1, 2)


class _FusedFFN(nn.Module):
    """Deploy FFN on the channels-last rows of the map: two matrix products whatever the batch, the residual
    accumulated by the second one."""

    def __init__(self, pw1: nn.Conv2d, pw2: nn.Conv2d):
        super().__init__()
        with torch.no_grad():
            self.register_buffer("w1", pw1.weight.flatten(1).t().detach().contiguous())  # (C, hidden)
            self.register_buffer("b1", pw1.bias.detach().clone())
            self.register_buffer("w2", pw2.weight.flatten(1).t().detach().contiguous())  # (hidden, C)
            self.register_buffer("b2", pw2.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _channels_last_rows(x)  # (BHW, C)
        hidden = torch.relu_(torch.addmm(self.b1, rows, self.w1))  # (BHW, hidden)
        return _from_rows(torch.addmm(rows, hidden, self.w2).add_(self.b2), x)


class _Pointwise(nn.Module):
    """Deploy 1x1 conv (optionally followed by ReLU) as a matrix product on the channels-last rows of the map."""

    def __init__(self, conv: nn.Conv2d, relu: bool = False):
        super().__init__()
        with torch.no_grad():
            self.register_buffer("weight", conv.weight.flatten(1).t().detach().contiguous())  # (C_in, C_out)
            self.register_buffer("bias", conv.bias.detach().clone())
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = torch.addmm(self.bias, _channels_last_rows(x), self.weight)
        return _from_rows(torch.relu_(rows) if self.relu else rows, x)


class SqueezeExcite(nn.Module):
    """x * sigmoid(fc2(ReLU(fc1(mean(x))))) with 1x1 convs (timm's SEModule as EfficientViT uses it)."""

    def __init__(self, channels: int, rd_ratio: float = 0.25):
        super().__init__()
        rd = _make_divisible(channels * rd_ratio)
        self.fc1 = nn.Conv2d(channels, rd, 1)
        self.fc2 = nn.Conv2d(rd, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(s)

    def fuse(self) -> nn.Module:
        return _FusedSqueezeExcite(self)


class _FusedSqueezeExcite(nn.Module):
    """Deploy squeeze-excite: the two 1x1 convs on the pooled vector as Linear products."""

    def __init__(self, src: SqueezeExcite):
        super().__init__()
        with torch.no_grad():
            for name in ("fc1", "fc2"):
                conv = getattr(src, name)
                self.register_buffer(f"{name}_weight", conv.weight.flatten(1).detach().contiguous())
                self.register_buffer(f"{name}_bias", conv.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.linear(torch.relu_(F.linear(x.mean((2, 3)), self.fc1_weight, self.fc1_bias)),
                     self.fc2_weight, self.fc2_bias)  # (B, C)
        return x * torch.sigmoid_(s)[:, :, None, None]


class PatchMerging(nn.Module):
    """1x1 (x4) -> ReLU -> dw3x3 stride 2 -> ReLU -> squeeze-excite -> 1x1 to ``out_dim``."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        hidden = dim * 4
        self.conv1 = ConvNorm(dim, hidden, 1)
        self.conv2 = ConvNorm(hidden, hidden, 3, stride=2, groups=hidden)
        self.se = SqueezeExcite(hidden, 0.25)
        self.conv3 = ConvNorm(hidden, out_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.se(torch.relu(self.conv2(torch.relu(self.conv1(x))))))

    def fuse(self) -> nn.Module:
        if all(isinstance(getattr(self, n), nn.Conv2d) for n in ("conv1", "conv2", "conv3")):
            return nn.Sequential(_Pointwise(self.conv1, relu=True), _DeployConv(self.conv2, relu=True), self.se,
                                 _Pointwise(self.conv3))
        return self


class Stem(nn.Sequential):
    """Four 3x3 stride-2 conv+BN with ReLU between (stride 16)."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__(ConvNorm(in_chans, dim // 8, 3, stride=2), nn.ReLU(),
                         ConvNorm(dim // 8, dim // 4, 3, stride=2), nn.ReLU(),
                         ConvNorm(dim // 4, dim // 2, 3, stride=2), nn.ReLU(),
                         ConvNorm(dim // 2, dim, 3, stride=2))

    def fuse(self) -> nn.Module:
        convs = [m for m in self if not isinstance(m, nn.ReLU)]
        if all(isinstance(m, nn.Conv2d) for m in convs):
            return _DeployStem(convs)
        return self


class _DeployStem(nn.Module):
    """Deploy stem: switches the input to channels-last memory, the layout the rest of the deploy form computes in
    (same values, fewer copies), and runs the folded convs with in-place ReLUs."""

    def __init__(self, convs: list[nn.Conv2d]):
        super().__init__()
        self.convs = nn.ModuleList(_DeployConv(c, relu=i < len(convs) - 1) for i, c in enumerate(convs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        for conv in self.convs:
            x = conv(x)
        return x


class Downsample(nn.Module):
    """[dw3x3, FFN] at ``dim``, PatchMerging to ``out_dim`` (stride 2), [dw3x3, FFN] at ``out_dim``."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.res1 = nn.Sequential(DWConvResidual(dim), FFN(dim, dim * 2))
        self.patchmerge = PatchMerging(dim, out_dim)
        self.res2 = nn.Sequential(DWConvResidual(out_dim), FFN(out_dim, out_dim * 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res2(self.patchmerge(self.res1(x)))


class EfficientViTBlock(nn.Module):
    """dw3x3 -> FFN -> local window attention -> dw3x3 -> FFN, each branch residual (the "sandwich")."""

    def __init__(self, dim: int, key_dim: int, num_heads: int, resolution: int, window: int,
                 kernels: tuple[int, ...], drop_path: float = 0.0):
        super().__init__()
        attn_ratio = dim / (key_dim * num_heads)  # value channels = dim / heads
        self.dw0 = DWConvResidual(dim, 0.0, drop_path)
        self.ffn0 = FFN(dim, dim * 2, drop_path)
        self.mixer = LocalWindowAttention(dim, key_dim, num_heads, attn_ratio, resolution, window, kernels)
        self.drop_path = DropPath(drop_path)
        self.dw1 = DWConvResidual(dim, 0.0, drop_path)
        self.ffn1 = FFN(dim, dim * 2, drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ffn0(self.dw0(x))
        y = self.mixer(x)
        x = x + (self.drop_path(y) if self.training else y)
        return self.ffn1(self.dw1(x))

    def fuse(self) -> nn.Module:
        self.drop_path = nn.Identity()  # the identity in eval; gone from the deploy form
        return self


class EfficientViTStage(nn.Module):
    def __init__(self, in_dim: int, dim: int, depth: int, downsample: bool, key_dim: int, num_heads: int,
                 resolution: int, window: int, kernels: tuple[int, ...], drop_paths: list[float]):
        super().__init__()
        self.downsample = Downsample(in_dim, dim) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[EfficientViTBlock(dim, key_dim, num_heads, resolution, window, kernels,
                                                        drop_paths[j]) for j in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class EfficientViT(ClassifierModel):
    """EfficientViT-MSRA classifier; ``forward`` returns logits (a (cls, dist) pair while training with the
    optional distillation head)."""

    family = "efficientvit"
    stride = 1  # no input multiple needed (feature strides are 16, 32, 64; see feature_info)

    def __init__(self, config: EfficientViTConfig):
        super().__init__(config)
        dims = config.embed_dims
        c0 = dims[0]
        self.stem = Stem(config.in_chans, c0)
        resolution = min(to_2tuple(config.img_size)) // 16  # the map side at the training size: sizes bias tables
        total = sum(config.depths)
        rates = [config.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        stages, start, prev, reduction = [], 0, c0, 16
        self.feature_info = []
        for i, dim in enumerate(dims):
            if i > 0:
                resolution, reduction = (resolution - 1) // 2 + 1, reduction * 2
            depth = config.depths[i]
            stages.append(EfficientViTStage(prev, dim, depth, i > 0, config.key_dims[i], config.num_heads[i],
                                            resolution, config.window_sizes[i], config.kernels,
                                            rates[start:start + depth]))
            self.feature_info.append(dict(num_chs=dim, reduction=reduction, module=f"stages.{i}"))
            start, prev = start + depth, dim
        self.stages = nn.ModuleList(stages)
        self.num_features = dims[-1]
        self.norm = nn.Identity()  # no final norm: the head's BN1d normalises
        self._init_heads()

    def _make_head(self, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        head = NormLinear(self.num_features, num_classes)
        nn.init.trunc_normal_(head.linear.weight, std=0.02)
        nn.init.zeros_(head.linear.bias)
        return head

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


_PUBLISHED = dict(latency_device="V100 (throughput, img/s)")


def _variant(name, dims, depths, heads, kernels, params_m, gmacs, top1, throughput):
    cfg = EfficientViTConfig(embed_dims=dims, depths=depths, num_heads=heads, kernels=kernels)
    register_model(name, EfficientViT, cfg, family="efficientvit", timm_name=name,
                   published=dict(params_m=params_m, gmacs=gmacs, top1=top1, throughput=throughput, **_PUBLISHED))


_variant("efficientvit_m0", (64, 128, 192), (1, 2, 3), (4, 4, 4), (5, 5, 5, 5), 2.349, 0.079, 63.2, 27644)
_variant("efficientvit_m1", (128, 144, 192), (1, 2, 3), (2, 3, 3), (7, 5, 3, 3), 2.981, 0.167, 68.4, 20093)
_variant("efficientvit_m2", (128, 192, 224), (1, 2, 3), (4, 3, 2), (7, 5, 3, 3), 4.188, 0.201, 70.8, 18218)
_variant("efficientvit_m3", (128, 240, 320), (1, 2, 3), (4, 3, 4), (5, 5, 5, 5), 6.901, 0.263, 73.4, 16644)
_variant("efficientvit_m4", (128, 256, 384), (1, 2, 3), (4, 4, 4), (7, 5, 3, 3), 8.804, 0.299, 74.3, 15914)
_variant("efficientvit_m5", (192, 288, 384), (1, 3, 4), (3, 3, 4), (7, 5, 3, 3), 12.474, 0.522, 77.1, 10621)
