"""EfficientFormer V1 (Li et al., NeurIPS 2022): pooling mixers at every stride, self-attention only at stride 32.

Matches the official snap-research/EfficientFormer code (and timm's port): a conv stem, four stages of Meta4D blocks
(``x + ls1 * (AvgPool3x3(x) - x)``, then a 1x1-conv MLP with BatchNorms) joined by strided conv+BN downsamplers;
the last ``num_vit`` blocks of the last stage are Meta3D blocks on tokens (pre-LayerNorm MHSA with a
relative-position bias, pre-LayerNorm MLP). A final LayerNorm, a mean over the tokens and two DeiT heads.

Beyond the official code: any input size divisible by 32 (the bias table is resized bicubically to the token grid
met at run time), a bias that is never stale (see ``edgevits.layers.bias``), and a deploy form
(``edgevits.fuse_model``) with every BatchNorm, layer scale and in-block LayerNorm affine folded away.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import (ConvNorm, DeployModule, DropPath, FusedLinear, LayerScale, Mlp, channels_last_weights_,
                      fuse_conv_bn, scale_output_, to_2tuple)
from ..layers.attention.mhsa import MHSA, MHSADeploy
from .base import ClassifierModel, ModelConfig, Variant, conv_stem, drop_path_rates, stage_info


@dataclass(frozen=True, kw_only=True)
class EfficientFormerConfig(ModelConfig):
    embed_dims: tuple[int, ...] = (48, 96, 224, 448)
    depths: tuple[int, ...] = (3, 2, 6, 4)
    num_vit: int = 1  # the last num_vit blocks of the last stage are Meta3D (attention) blocks
    mlp_ratio: float = 4.0
    pool_size: int = 3
    layer_scale_init: float = 1e-5
    key_dim: int = 32
    num_heads: int = 8
    attn_ratio: float = 4.0

    def __post_init__(self):
        super().__post_init__()
        if len(self.embed_dims) != len(self.depths) or min(self.depths) < 1:
            raise ValueError("embed_dims and depths need one entry per stage, each depth >= 1")
        if not 0 <= self.num_vit <= self.depths[-1]:
            raise ValueError(f"num_vit must be between 0 and the last depth ({self.depths[-1]}), got {self.num_vit}")
        h, w = to_2tuple(self.img_size)
        if h % 32 or w % 32:
            raise ValueError(f"img_size must be divisible by 32 (it sizes the 1/32 attention-bias grid); got {h}x{w}")


class Flat(nn.Module):
    """(B, C, H, W) map -> (B, H*W, C) tokens, ahead of the first Meta3D block (no parameters)."""

    def forward(self, x: torch.Tensor, hw=None) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


class ConvMlpNorm(nn.Module):
    """1x1 conv -> BN -> GELU -> 1x1 conv -> BN on (B, C, H, W) (official names fc1, norm1, fc2, norm2)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.norm1 = nn.BatchNorm2d(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        self.norm2 = nn.BatchNorm2d(dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.norm2(self.fc2(self.drop(self.act(self.norm1(self.fc1(x)))))))


class Meta4D(nn.Module):
    """``x + ls1 * (AvgPool(x) - x)`` (pooling excludes the zero padding), then ``x + ls2 * ConvMlpNorm(x)``."""

    def __init__(self, dim: int, pool_size: int = 3, mlp_ratio: float = 4.0, drop: float = 0.0,
                 drop_path: float = 0.0, layer_scale_init: float = 1e-5):
        super().__init__()
        self.pool = nn.AvgPool2d(pool_size, 1, pool_size // 2, count_include_pad=False)
        self.mlp = ConvMlpNorm(dim, int(dim * mlp_ratio), drop)
        self.ls1 = LayerScale((dim,), layer_scale_init)  # (C,) as in the official files; viewed as (C, 1, 1)
        self.ls2 = LayerScale((dim,), layer_scale_init)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, hw=None) -> torch.Tensor:
        x = x + self.drop_path(self.ls1.gamma.view(-1, 1, 1) * (self.pool(x) - x))
        return x + self.drop_path(self.ls2.gamma.view(-1, 1, 1) * self.mlp(x))

    @torch.no_grad()
    def fuse(self) -> "Meta4DDeploy":
        fc1 = fuse_conv_bn(self.mlp.fc1, self.mlp.norm1)
        fc2 = fuse_conv_bn(self.mlp.fc2, self.mlp.norm2)
        scale_output_(fc2, self.ls2.gamma)
        return Meta4DDeploy(self.ls1.gamma, fc1, fc2, self.pool.kernel_size)


class Meta4DDeploy(DeployModule, nn.Module):
    """Deploy form of Meta4D, written for eager speed at small batches on CPU.

    BatchNorms and ``ls2`` are folded into the two 1x1 convs, which run as GEMMs on channels-last memory (no
    im2col, no layout reorders), with GELU and the residual add fused into them where oneDNN's kernels exist;
    the token mixer and its residual are one ``lerp`` (``x + g * (pool(x) - x) == lerp(x, pool(x), g)``); the
    average pool runs on channels-last memory, where PyTorch's CPU kernel is several times faster than on NCHW.
    Input and output are (B, C, H, W) maps with channels-last strides, so consecutive blocks, the strided
    downsampling convs and ``Flat`` (which becomes a view) never copy.
    """

    def __init__(self, gamma: torch.Tensor, fc1: nn.Conv2d, fc2: nn.Conv2d, pool_size: int):
        super().__init__()
        self.register_buffer("gamma", gamma.detach().clone().view(-1, 1, 1))
        self.fc1 = FusedLinear.from_conv1x1(fc1)
        self.fc2 = FusedLinear.from_conv1x1(fc2)
        self.pool_size = pool_size

    def forward(self, x: torch.Tensor, hw=None) -> torch.Tensor:
        k = self.pool_size
        x = x.contiguous(memory_format=torch.channels_last)  # a no-op after the first block
        x = torch.lerp(x, F.avg_pool2d(x, k, 1, k // 2, count_include_pad=False), self.gamma)
        t = x.permute(0, 2, 3, 1)  # (B, H, W, C): a contiguous view of the channels-last map
        t = self.fc2(self.fc1(t, act="gelu"), residual=t)
        return t.permute(0, 3, 1, 2)  # (B, C, H, W), channels-last strides


class Meta3D(nn.Module):
    """Tokens (B, N, C): ``x + ls1 * MHSA(LN(x))``, then ``x + ls2 * Mlp(LN(x))``."""

    def __init__(self, dim: int, resolution: tuple[int, int], key_dim: int, num_heads: int, attn_ratio: float,
                 mlp_ratio: float = 4.0, drop: float = 0.0, drop_path: float = 0.0, layer_scale_init: float = 1e-5):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MHSA(dim, key_dim, num_heads, attn_ratio, resolution)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.ls1 = LayerScale((dim,), layer_scale_init)
        self.ls2 = LayerScale((dim,), layer_scale_init)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, hw: tuple[int, int] | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x), hw)))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))

    @torch.no_grad()
    def fuse(self) -> "Meta3DDeploy":
        """Fold the LayerNorm affines into the following Linears and the layer scales into the preceding ones (the
        attention is in its deploy form by now: ``MHSADeploy``, whose projections are still Linears). The folds
        write into a copy: ``fuse()`` leaves its source as it was."""
        src = copy.deepcopy(self)
        _fold_ln_affine(src.norm1, src.attn.qkv)
        _fold_ln_affine(src.norm2, src.mlp.fc1)
        scale_output_(src.attn.proj, src.ls1.gamma)
        scale_output_(src.mlp.fc2, src.ls2.gamma)
        return Meta3DDeploy(src.norm1, src.attn, src.norm2, src.mlp.fc1, src.mlp.fc2)


class Meta3DDeploy(DeployModule, nn.Module):
    """Deploy form of Meta3D: plain LayerNorms (their affines live in ``qkv`` and ``fc1``), layer scales folded
    into ``proj`` and ``fc2``, GELU and the residual adds fused into the GEMMs where oneDNN's kernels exist."""

    def __init__(self, norm1: nn.LayerNorm, attn: MHSADeploy, norm2: nn.LayerNorm, fc1: nn.Linear, fc2: nn.Linear):
        super().__init__()
        self.norm1, self.attn, self.norm2 = norm1, attn, norm2
        self.fc1, self.fc2 = FusedLinear.from_linear(fc1), FusedLinear.from_linear(fc2)

    def forward(self, x: torch.Tensor, hw: tuple[int, int] | None = None) -> torch.Tensor:
        x = self.attn(self.norm1(x), hw, residual=x)
        return self.fc2(self.fc1(self.norm2(x), act="gelu"), residual=x)


@torch.no_grad()
def _fold_ln_affine(norm: nn.LayerNorm, linear: nn.Linear) -> None:
    """``linear(LN(x))`` -> ``linear'(LN_plain(x))``: the LN keeps its normalisation, its affine moves forward."""
    if norm.weight is None:
        return
    bias = linear.bias if linear.bias is not None else linear.weight.new_zeros(linear.out_features)
    linear.bias = nn.Parameter(bias + linear.weight @ norm.bias if norm.bias is not None else bias.clone())
    linear.weight.mul_(norm.weight.view(1, -1))
    norm.weight, norm.bias = None, None
    norm.elementwise_affine = False


class EfficientFormerStage(nn.Module):
    """Optional downsampler (3x3 s2 conv + BN), Meta4D blocks, then ``Flat`` and Meta3D blocks when
    ``num_vit > 0``. Always returns a (B, C, H, W) map."""

    def __init__(self, in_dim: int, dim: int, depth: int, num_vit: int, downsample: bool, drop_paths: list[float],
                 resolution: tuple[int, int], cfg: EfficientFormerConfig):
        super().__init__()
        self.downsample = ConvNorm(in_dim, dim, 3, stride=2, bias=True) if downsample else nn.Identity()
        blocks: list[nn.Module] = []
        if num_vit == depth:
            blocks.append(Flat())
        for i in range(depth):
            if i >= depth - num_vit:
                blocks.append(Meta3D(dim, resolution, cfg.key_dim, cfg.num_heads, cfg.attn_ratio, cfg.mlp_ratio,
                                     cfg.drop_rate, drop_paths[i], cfg.layer_scale_init))
            else:
                blocks.append(Meta4D(dim, cfg.pool_size, cfg.mlp_ratio, cfg.drop_rate, drop_paths[i],
                                     cfg.layer_scale_init))
                if num_vit and i == depth - num_vit - 1:
                    blocks.append(Flat())  # at the official index, so that block numbers match the checkpoints
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        b, c, h, w = x.shape
        for block in self.blocks:
            x = block(x, (h, w))
        if x.dim() == 3:  # (B, N, C) tokens -> (B, C, H, W), a view
            x = x.transpose(1, 2).reshape(b, c, h, w)
        return x


class EfficientFormer(ClassifierModel):
    """EfficientFormer V1 classifier; ``forward`` returns logits (a (cls, dist) pair while training with
    distillation). ``forward_features`` returns the final LayerNorm's output as tokens (B, N, C)."""

    family = "efficientformer"

    def __init__(self, config: EfficientFormerConfig):
        super().__init__(config)
        dims, depths = config.embed_dims, config.depths
        self.stem = conv_stem(config.in_chans, dims[0], nn.ReLU)
        h, w = to_2tuple(config.img_size)
        resolution = (h // 32, w // 32)
        rates, last = drop_path_rates(config.drop_path_rate, depths), len(dims) - 1
        self.stages = nn.ModuleList(
            EfficientFormerStage(dims[max(i - 1, 0)], dim, depth, config.num_vit if i == last else 0, i > 0, rates[i],
                                 resolution, config) for i, (dim, depth) in enumerate(zip(dims, depths)))
        self.feature_info = [stage_info(i, dim, 2 ** (i + 2)) for i, dim in enumerate(dims)]
        self._init_heads(nn.LayerNorm(dims[-1]))
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                # The official trunc_normal_(std=0.02) clips at +-2, i.e. 100 standard deviations: the same
                # distribution as a plain normal draw, which is 2-3x faster (it matters for L7's 82M weights).
                m.weight.normal_(0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.norm(x.flatten(2).transpose(1, 2))  # (B, N, C)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)

    @torch.no_grad()
    def finish_deploy_(self) -> None:
        """Deploy form (after the children are fused): besides the common folding, switch the convolutional
        part to channels-last memory. The stem and downsampling convs get channels-last weights, so that oneDNN
        does not re-lay out the weights on every call (for the last downsampler that re-layout alone costs more
        than the convolution)."""
        super().finish_deploy_()
        for module in [self.stem, *(stage.downsample for stage in self.stages)]:
            channels_last_weights_(module)
        self.channels_last = True


def _variant(dims, depths, num_vit, params_m, gmacs, top1, latency_ms):
    return Variant(EfficientFormerConfig(embed_dims=dims, depths=depths, num_vit=num_vit),
                   dict(params_m=params_m, gmacs=gmacs, top1=top1, latency_ms=latency_ms,
                        latency_device="iPhone 12 (Core ML, NPU)"))


MODEL = EfficientFormer
VARIANTS = {
    "efficientformer_l1": _variant((48, 96, 224, 448), (3, 2, 6, 4), 1, 12.290, 1.30, 79.2, 1.6),
    "efficientformer_l3": _variant((64, 128, 320, 512), (4, 4, 12, 6), 4, 31.406, 3.93, 82.4, 3.0),
    "efficientformer_l7": _variant((96, 192, 384, 768), (6, 6, 18, 8), 8, 82.229, 10.16, 83.3, 7.0),
}
