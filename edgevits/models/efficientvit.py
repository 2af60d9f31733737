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

from ..layers import ConvNorm, DeployModule, DropPath, FusedConv, FusedLinear, NormLinear, folded_conv, to_2tuple
from ..layers.attention.cascaded import LocalWindowAttention
from ..layers.kernels import KernelCache, fused_kernels_usable, gemm_rows, map_rows, rows_map
from .base import ClassifierModel, ModelConfig, Variant, drop_path_rates, stage_info


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
    def fuse(self) -> FusedConv:
        """One depthwise conv: the BN folded, the identity added to the centre tap."""
        conv = super().fuse()
        conv.weight[:, 0, 1, 1] += 1.0
        return FusedConv(conv)


class FFN(nn.Module):
    """``x + BN(1x1(ReLU(BN(1x1(x)))))``, expansion 2, the last BN starting at 0."""

    def __init__(self, dim: int, hidden: int, drop_path: float = 0.0):
        super().__init__()
        self.pw1 = ConvNorm(dim, hidden, 1)
        self.pw2 = ConvNorm(hidden, dim, 1, bn_weight_init=0.0)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.pw2(torch.relu(self.pw1(x))))

    def fuse(self) -> "FFNDeploy":
        return FFNDeploy(folded_conv(self.pw1), folded_conv(self.pw2))


class FFNDeploy(KernelCache, DeployModule, nn.Module):
    """Deploy FFN on channels-last maps: two 1x1 convs as matrix products on the map's rows whatever the batch
    (``gemm_rows``, the fast path of ``FusedConv``), the ReLU fused into the first, the residual accumulated by the
    second. Both products run on one view of the rows: at batch 1 the per-call overhead of two separate layers costs
    about 1 ms of EfficientViT-M0's 9."""

    def __init__(self, pw1: nn.Conv2d, pw2: nn.Conv2d):
        super().__init__()
        self.pw1, self.pw2 = FusedConv(pw1, "relu"), FusedConv(pw2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the convs' parameters through the module dicts: nn.Module's attribute lookups cost about 1.5 us each, a
        # third of the FFN's time at batch 1
        p1 = self._modules["pw1"]._modules["conv"]._parameters
        p2 = self._modules["pw2"]._modules["conv"]._parameters
        w1 = p1["weight"]
        if not (fused_kernels_usable(x, w1) and x.is_contiguous(memory_format=torch.channels_last)):
            return self.pw2(self.pw1(x), residual=x)  # the same layers, ordinary ops
        rows = map_rows(x)
        hidden = gemm_rows(self, rows, w1, p1["bias"], "relu", kind="gemm1")
        return rows_map(gemm_rows(self, hidden, p2["weight"], p2["bias"], residual=rows, kind="gemm2"), x)


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

    def fuse(self) -> "SqueezeExciteDeploy":
        return SqueezeExciteDeploy(self)


class SqueezeExciteDeploy(DeployModule, nn.Module):
    """Deploy squeeze-excite: the two 1x1 convs on the pooled vector as ``FusedLinear`` products."""

    def __init__(self, src: SqueezeExcite):
        super().__init__()
        self.fc1, self.fc2 = FusedLinear.from_conv1x1(src.fc1), FusedLinear.from_conv1x1(src.fc2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.fc2(self.fc1(x.mean((2, 3)), act="relu"))  # (B, C)
        return x * torch.sigmoid(s)[:, :, None, None]


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

    def fuse(self) -> "PatchMergingDeploy":
        return PatchMergingDeploy(self)


class PatchMergingDeploy(DeployModule, nn.Module):
    """Deploy patch merging: every conv a ``FusedConv`` with its ReLU as a post-op."""

    def __init__(self, src: PatchMerging):
        super().__init__()
        self.conv1 = FusedConv(folded_conv(src.conv1), "relu")
        self.conv2 = FusedConv(folded_conv(src.conv2), "relu")
        self.se = src.se  # in its deploy form by now
        self.conv3 = FusedConv(folded_conv(src.conv3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.se(self.conv2(self.conv1(x))))


class Stem(nn.Sequential):
    """Four 3x3 stride-2 conv+BN with ReLU between (stride 16)."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__(ConvNorm(in_chans, dim // 8, 3, stride=2), nn.ReLU(),
                         ConvNorm(dim // 8, dim // 4, 3, stride=2), nn.ReLU(),
                         ConvNorm(dim // 4, dim // 2, 3, stride=2), nn.ReLU(),
                         ConvNorm(dim // 2, dim, 3, stride=2))

    def fuse(self) -> "StemDeploy":
        return StemDeploy([folded_conv(m) for m in self if not isinstance(m, nn.ReLU)])


class StemDeploy(DeployModule, nn.Module):
    """Deploy stem: switches the input to channels-last memory, the layout the rest of the deploy form computes in
    (same values, fewer copies), and runs the folded convs with their ReLUs as post-ops."""

    def __init__(self, convs: list[nn.Conv2d]):
        super().__init__()
        self.convs = nn.ModuleList(FusedConv(c, "relu" if i < len(convs) - 1 else None) for i, c in enumerate(convs))

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

    def fuse(self) -> "EfficientViTBlockDeploy":
        return EfficientViTBlockDeploy(self)


class EfficientViTBlockDeploy(DeployModule, nn.Module):
    """Deploy form of the block: its branches' deploy forms, no stochastic depth."""

    def __init__(self, src: EfficientViTBlock):
        super().__init__()
        self.dw0, self.ffn0, self.mixer, self.dw1, self.ffn1 = src.dw0, src.ffn0, src.mixer, src.dw1, src.ffn1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ffn0(self.dw0(x))
        x = x + self.mixer(x)
        return self.ffn1(self.dw1(x))


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
        self.stem = Stem(config.in_chans, dims[0])
        resolution = min(to_2tuple(config.img_size)) // 16  # the map side at the training size: sizes bias tables
        rates = drop_path_rates(config.drop_path_rate, config.depths)
        stages, self.feature_info = [], []
        for i, dim in enumerate(dims):
            if i > 0:  # each stage halves the map (the stride-2 conv rounds up)
                resolution = (resolution - 1) // 2 + 1
            stages.append(EfficientViTStage(dims[max(i - 1, 0)], dim, config.depths[i], i > 0, config.key_dims[i],
                                            config.num_heads[i], resolution, config.window_sizes[i], config.kernels,
                                            rates[i]))
            self.feature_info.append(stage_info(i, dim, 16 * 2 ** i))
        self.stages = nn.ModuleList(stages)
        self._init_heads(nn.Identity())  # no final norm: the head's BN1d normalises

    def _make_head(self, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        head = NormLinear(self.num_features, num_classes)
        nn.init.trunc_normal_(head.linear.weight, std=0.02)
        nn.init.zeros_(head.linear.bias)
        return head

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def _variant(dims, depths, heads, kernels, params_m, gmacs, top1, throughput):
    return Variant(EfficientViTConfig(embed_dims=dims, depths=depths, num_heads=heads, kernels=kernels),
                   dict(params_m=params_m, gmacs=gmacs, top1=top1, throughput=throughput,
                        latency_device="V100 (throughput, img/s)"))


MODEL = EfficientViT
VARIANTS = {
    "efficientvit_m0": _variant((64, 128, 192), (1, 2, 3), (4, 4, 4), (5, 5, 5, 5), 2.349, 0.079, 63.2, 27644),
    "efficientvit_m1": _variant((128, 144, 192), (1, 2, 3), (2, 3, 3), (7, 5, 3, 3), 2.981, 0.167, 68.4, 20093),
    "efficientvit_m2": _variant((128, 192, 224), (1, 2, 3), (4, 3, 2), (7, 5, 3, 3), 4.188, 0.201, 70.8, 18218),
    "efficientvit_m3": _variant((128, 240, 320), (1, 2, 3), (4, 3, 4), (5, 5, 5, 5), 6.901, 0.263, 73.4, 16644),
    "efficientvit_m4": _variant((128, 256, 384), (1, 2, 3), (4, 4, 4), (7, 5, 3, 3), 8.804, 0.299, 74.3, 15914),
    "efficientvit_m5": _variant((192, 288, 384), (1, 3, 4), (3, 3, 4), (7, 5, 3, 3), 12.474, 0.522, 77.1, 10621),
}
