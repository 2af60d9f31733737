"""EfficientFormerV2 (Li et al., ICCV 2023): a unified local FFN everywhere, attention in the last two stages.

Matches the official snap-research/EfficientFormer code (``models/efficientformer_v2.py``) and timm's port, with
three differences a user can rely on: ``distillation=False`` works, any input size divisible by 32 works (the bias
tables are resized bicubically, per runtime size), and the attention bias is never served stale.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..layers import (ConvNorm, DeployModule, DropPath, FusedConv, LayerScale, channels_last_weights_, scale_output_,
                      to_2tuple)
from ..layers.attention.attention4d import Attention4D, Attention4DDownsample
from .base import ClassifierModel, ModelConfig, Variant, conv_stem, drop_path_rates, stage_info

Ratios = tuple[tuple[float, ...], ...]


@dataclass(frozen=True, kw_only=True)
class EfficientFormerV2Config(ModelConfig):
    embed_dims: tuple[int, ...] = (32, 48, 96, 176)
    depths: tuple[int, ...] = (2, 2, 6, 4)
    mlp_ratios: Ratios = ((4, 4), (4, 4), (4, 3, 3, 3, 4, 4), (4, 3, 3, 4))  # one expansion ratio per block
    vit_num: int = 2  # the last vit_num blocks of stages 3 and 4 carry attention
    layer_scale_init: float = 1e-5

    def __post_init__(self):
        super().__post_init__()
        if len(self.embed_dims) != 4 or len(self.depths) != 4:
            raise ValueError("EfficientFormerV2 has four stages: embed_dims and depths need four entries")
        if tuple(len(r) for r in self.mlp_ratios) != tuple(self.depths):
            raise ValueError(f"mlp_ratios needs one ratio per block: depths {self.depths}, got lengths "
                             f"{tuple(len(r) for r in self.mlp_ratios)}")
        if not 0 <= self.vit_num <= min(self.depths[2:]):
            raise ValueError(f"vit_num must be in [0, {min(self.depths[2:])}], got {self.vit_num}")
        h, w = to_2tuple(self.img_size)
        if h % 32 or w % 32:
            raise ValueError(f"img_size must be divisible by 32, got {self.img_size}")


class ConvMlp(nn.Module):
    """The unified FFN: 1x1 conv + BN -> GELU -> dw3x3 conv + BN -> GELU -> 1x1 conv + BN."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = ConvNorm(dim, hidden, 1, bias=True)
        self.mid = ConvNorm(hidden, hidden, 3, groups=hidden, bias=True)
        self.act = nn.GELU()
        self.drop = nn.Dropout(drop)
        self.fc2 = ConvNorm(hidden, dim, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.mid(self.act(self.fc1(x))))
        return self.drop(self.fc2(self.drop(x)))

    def fuse(self) -> "ConvMlpDeploy":
        """The BNs are folded by then (the ConvNorms' own fuse); the GELUs become the convs' post-ops."""
        if type(self.act) is not nn.GELU or self.act.approximate != "none":
            raise NotImplementedError("the deploy form of ConvMlp fuses the exact GELU only")
        return ConvMlpDeploy(self.fc1, self.mid, self.fc2)


class ConvMlpDeploy(DeployModule, nn.Module):
    """Deploy form of ``ConvMlp``: three ``FusedConv`` (GELU as the first two's post-op); ``forward(x, residual)``
    adds a residual inside the last conv."""

    def __init__(self, fc1: nn.Conv2d, mid: nn.Conv2d, fc2: nn.Conv2d):
        super().__init__()
        self.fc1, self.mid, self.fc2 = FusedConv(fc1, "gelu"), FusedConv(mid, "gelu"), FusedConv(fc2)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc2(self.mid(self.fc1(x)), residual)


class EfficientFormerV2Block(nn.Module):
    """``x + ls1 * Attention4D(x)`` (attention blocks only), then ``x + ls2 * ConvMlp(x)``.

    The official code calls these AttnFFN and FFN; one class covers both (``attn`` None for FFN).
    """

    def __init__(self, dim: int, mlp_ratio: float, drop_path: float, layer_scale_init: float,
                 attn: nn.Module | None = None, drop: float = 0.0):
        super().__init__()
        self.token_mixer = attn
        self.layer_scale_1 = LayerScale((dim, 1, 1), layer_scale_init) if attn is not None else None
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), drop)
        self.layer_scale_2 = LayerScale((dim, 1, 1), layer_scale_init)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.token_mixer is not None:
            x = x + self.drop_path(self.layer_scale_1(self.token_mixer(x)))
        return x + self.drop_path(self.layer_scale_2(self.mlp(x)))

    @torch.no_grad()
    def fuse(self) -> "EfficientFormerV2BlockDeploy":
        return EfficientFormerV2BlockDeploy(self)


class EfficientFormerV2BlockDeploy(DeployModule, nn.Module):
    """Deploy form of the block: the layer scales folded into the last conv of each branch (whose BN is folded by
    then), and each skip connection summed inside that conv."""

    def __init__(self, src: EfficientFormerV2Block):
        super().__init__()
        # in their deploy forms by now; copied, since the layer scales fold into them (fuse() leaves its source as
        # it was)
        self.token_mixer, self.mlp = copy.deepcopy((src.token_mixer, src.mlp))
        scale_output_(self.mlp.fc2.conv, src.layer_scale_2.gamma)
        if self.token_mixer is not None:
            scale_output_(self.token_mixer.proj.conv, src.layer_scale_1.gamma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.token_mixer is not None:
            x = self.token_mixer(x, residual=x)
        return self.mlp(x, residual=x)


class Downsample(nn.Module):
    """conv3x3 s2 + BN between stages; before the last stage, plus Attention4DDownsample (official ``asub``)."""

    def __init__(self, in_dim: int, out_dim: int, attn_resolution: tuple[int, int] | None = None):
        super().__init__()
        self.conv = ConvNorm(in_dim, out_dim, 3, stride=2, bias=True)
        self.attn = Attention4DDownsample(in_dim, out_dim, resolution=attn_resolution) if attn_resolution else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return out if self.attn is None else self.attn(x) + out

    def fuse(self) -> "DownsampleDeploy":
        return DownsampleDeploy(self.conv, self.attn)  # the BN is folded by then, the attention in its deploy form


class DownsampleDeploy(DeployModule, nn.Module):
    """Deploy form of ``Downsample``: the conv branch is summed inside the attention's output conv."""

    def __init__(self, conv: nn.Conv2d, attn: nn.Module | None):
        super().__init__()
        self.conv, self.attn = FusedConv(conv), attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) if self.attn is None else self.attn(x, residual=self.conv(x))


class EfficientFormerV2Stage(nn.Module):
    def __init__(self, blocks: list[nn.Module], downsample: nn.Module | None):
        super().__init__()
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class EfficientFormerV2(ClassifierModel):
    """EfficientFormerV2 classifier; ``forward`` returns logits (a (cls, dist) pair while training with
    distillation)."""

    family = "efficientformer_v2"

    def __init__(self, config: EfficientFormerV2Config):
        super().__init__(config)
        dims, depths = config.embed_dims, config.depths
        img_h, img_w = to_2tuple(config.img_size)
        self.stem = conv_stem(config.in_chans, dims[0], nn.GELU)
        rates = drop_path_rates(config.drop_path_rate, depths)
        stages = []
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            res = (img_h // 2 ** (i + 2), img_w // 2 ** (i + 2))  # this stage's grid at the training size
            downsample = None
            if i > 0:
                prev_res = (res[0] * 2, res[1] * 2)
                downsample = Downsample(dims[i - 1], dim, prev_res if i == 3 else None)
            blocks = []
            for j in range(depth):
                attn = None
                if i >= 2 and j >= depth - config.vit_num:
                    if i == 2:  # stride attention: the table covers the grid after the stride-2 conv
                        attn = Attention4D(dim, resolution=(res[0] // 2, res[1] // 2), stride=2)
                    else:
                        attn = Attention4D(dim, resolution=res)
                blocks.append(EfficientFormerV2Block(dim, config.mlp_ratios[i][j], rates[i][j],
                                                     config.layer_scale_init, attn))
            stages.append(EfficientFormerV2Stage(blocks, downsample))
        self.stages = nn.ModuleList(stages)
        self.feature_info = [stage_info(i, dim, 2 ** (i + 2)) for i, dim in enumerate(dims)]
        self._init_heads(nn.BatchNorm2d(dims[-1]))
        self._init_weights()

    def _init_weights(self) -> None:
        # Official: truncated normal (std 0.02) for the Linears and the FFN convs; PyTorch defaults elsewhere.
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and ".mlp." in f".{name}."):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @torch.no_grad()
    def finish_deploy_(self) -> None:
        """Deploy form (after the children are fused): heads merged, the stem's GELUs as its convs' post-ops, and the
        model switched to channels-last maps. On CPU, PyTorch runs depthwise convs and the bilinear upsample on
        channels-first maps through internal layout conversions that allocate and copy large temporaries on every
        call; channels-last maps avoid them. Outputs are unchanged; the stage outputs come back with channels-last
        strides."""
        super().finish_deploy_()
        self.stem = nn.Sequential(FusedConv(self.stem[0], "gelu"), FusedConv(self.stem[2], "gelu"))
        channels_last_weights_(self)
        self.channels_last = True


_RATIOS = {
    "s0": ((4, 4), (4, 4), (4, 3, 3, 3, 4, 4), (4, 3, 3, 4)),
    "s1": ((4,) * 3, (4,) * 3, (4, 4, 3, 3, 3, 3, 4, 4, 4), (4, 4, 3, 3, 4, 4)),
    "s2": ((4,) * 4, (4,) * 4, (4, 4, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4), (4, 4, 3, 3, 3, 3, 4, 4)),
    "l": ((4,) * 5, (4,) * 5, (4, 4, 4, 4, 3, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4), (4, 4, 4, 3, 3, 3, 3, 4, 4, 4)),
}


def _variant(key, dims, depths, vit_num, drop_path, params_m, gmacs, top1, latency_ms):
    config = EfficientFormerV2Config(embed_dims=dims, depths=depths, mlp_ratios=_RATIOS[key], vit_num=vit_num,
                                     drop_path_rate=drop_path)
    return Variant(config, dict(params_m=params_m, gmacs=gmacs, top1=top1, latency_ms=latency_ms,
                                latency_device="iPhone 12 (Core ML)"))


MODEL = EfficientFormerV2
VARIANTS = {
    "efficientformerv2_s0": _variant("s0", (32, 48, 96, 176), (2, 2, 6, 4), 2, 0.0, 3.600, 0.396, 76.2, 0.9),
    "efficientformerv2_s1": _variant("s1", (32, 48, 120, 224), (3, 3, 9, 6), 2, 0.0, 6.186, 0.652, 79.7, 1.1),
    "efficientformerv2_s2": _variant("s2", (32, 64, 144, 288), (4, 4, 12, 8), 4, 0.02, 12.710, 1.247, 82.0, 1.6),
    "efficientformerv2_l": _variant("l", (40, 80, 192, 384), (5, 5, 15, 10), 6, 0.1, 26.322, 2.553, 83.5, 2.7),
}
