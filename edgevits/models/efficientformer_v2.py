"""EfficientFormerV2 (Li et al., ICCV 2023): a unified local FFN everywhere, attention in the last two stages.

Matches the official snap-research/EfficientFormer code (``models/efficientformer_v2.py``) and timm's port, with
three differences a user can rely on: ``distillation=False`` works, any input size divisible by 32 works (the bias
tables are resized bicubically, per runtime size), and the attention bias is never served stale.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..layers import ConvNorm, DropPath, LayerScale, scale_output_, to_2tuple
from ..layers.attention.attention4d import Attention4D, Attention4DDownsample
from ..layers.onednn import FusedConv
from ..registry import register_model
from .base import ClassifierModel, ModelConfig

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

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``residual`` (deploy form only): added to the output inside the last conv."""
        if isinstance(self.fc2, FusedConv):
            return self.fc2(self.mid(self.fc1(x)), residual)
        x = self.act(self.mid(self.act(self.fc1(x))))
        x = self.drop(self.fc2(self.drop(x)))
        return x if residual is None else x + residual

    def fuse(self) -> nn.Module:
        """BNs are folded by then (the ConvNorms' own fuse); fold the GELUs in as post-ops."""
        if isinstance(self.fc2, nn.Conv2d) and type(self.act) is nn.GELU and self.act.approximate == "none":
            self.fc1, self.mid, self.fc2 = FusedConv(self.fc1, "gelu"), FusedConv(self.mid, "gelu"), FusedConv(self.fc2)
            self.act = nn.Identity()
        return self


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
        self.fused = False  # deploy form: the skip connections are summed inside the branches' last convs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and (self.drop_path.p == 0.0 or not self.training):
            # deploy form: each skip connection is summed inside the branch's last conv
            if self.token_mixer is not None:
                x = self.token_mixer(x, residual=x)
            return self.mlp(x, residual=x)
        if self.token_mixer is not None:
            x = x + self.drop_path(self.layer_scale_1(self.token_mixer(x)))
        return x + self.drop_path(self.layer_scale_2(self.mlp(x)))

    def fuse(self) -> nn.Module:
        """Fold the layer scales into the last conv of each branch (its BN is already folded by then)."""
        if isinstance(self.layer_scale_2, LayerScale):
            fc2 = self.mlp.fc2.conv if isinstance(self.mlp.fc2, FusedConv) else self.mlp.fc2
            scale_output_(fc2, self.layer_scale_2.gamma)
            self.layer_scale_2 = nn.Identity()
        proj = getattr(self.token_mixer, "proj", None)
        proj = proj.conv if isinstance(proj, FusedConv) else proj
        if isinstance(self.layer_scale_1, LayerScale) and isinstance(proj, nn.Conv2d):
            scale_output_(proj, self.layer_scale_1.gamma)
            self.layer_scale_1 = nn.Identity()
        self.fused = isinstance(self.mlp.fc2, FusedConv) and not isinstance(self.token_mixer, Attention4D) \
            and not isinstance(self.layer_scale_1, LayerScale) and not isinstance(self.layer_scale_2, LayerScale)
        return self


class Downsample(nn.Module):
    """conv3x3 s2 + BN between stages; before the last stage, plus Attention4DDownsample (official ``asub``)."""

    def __init__(self, in_dim: int, out_dim: int, attn_resolution: tuple[int, int] | None = None):
        super().__init__()
        self.conv = ConvNorm(in_dim, out_dim, 3, stride=2, bias=True)
        self.attn = Attention4DDownsample(in_dim, out_dim, resolution=attn_resolution) if attn_resolution else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.conv, FusedConv):  # deploy form: the conv branch is summed inside the attention's proj
            return self.conv(x) if self.attn is None else self.attn(x, residual=self.conv(x))
        out = self.conv(x)
        return out if self.attn is None else self.attn(x) + out

    def fuse(self) -> nn.Module:
        if isinstance(self.conv, nn.Conv2d) and not isinstance(self.attn, Attention4DDownsample):
            self.conv = FusedConv(self.conv)  # the BN is folded by then, the attention is in its deploy form
        return self


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
    stride = 32

    def __init__(self, config: EfficientFormerV2Config):
        super().__init__(config)
        dims, depths = config.embed_dims, config.depths
        img_h, img_w = to_2tuple(config.img_size)
        self.stem = nn.Sequential(ConvNorm(config.in_chans, dims[0] // 2, 3, stride=2, bias=True), nn.GELU(),
                                  ConvNorm(dims[0] // 2, dims[0], 3, stride=2, bias=True), nn.GELU())
        total = sum(depths)
        rates = [config.drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # official: per block
        stages, start = [], 0
        self.feature_info = []
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
                blocks.append(EfficientFormerV2Block(dim, config.mlp_ratios[i][j], rates[start + j],
                                                     config.layer_scale_init, attn))
            stages.append(EfficientFormerV2Stage(blocks, downsample))
            self.feature_info.append(dict(num_chs=dim, reduction=2 ** (i + 2), module=f"stages.{i}"))
            start += depth
        self.stages = nn.ModuleList(stages)
        self.num_features = dims[-1]
        self.norm = nn.BatchNorm2d(dims[-1])
        self._init_heads()
        self._init_weights()

    def _init_weights(self) -> None:
        # Official: truncated normal (std 0.02) for the Linears and the FFN convs; PyTorch defaults elsewhere.
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and ".mlp." in f".{name}."):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def fuse(self) -> "EfficientFormerV2":
        """Deploy form (after the children are fused): heads merged, and the model switched to channels-last
        maps. On CPU, PyTorch runs depthwise convs and the bilinear upsample on channels-first maps through
        internal layout conversions that allocate and copy large temporaries on every call; channels-last maps
        avoid them. Outputs are unchanged; the stage outputs come back with channels-last strides."""
        super().fuse()
        if len(self.stem) == 4:  # conv, GELU, conv, GELU -> two convs with the GELU as a post-op
            self.stem = nn.Sequential(FusedConv(self.stem[0], "gelu"), FusedConv(self.stem[2], "gelu"))
        self.to(memory_format=torch.channels_last)
        self.channels_last = True
        return self


_RATIOS = {
    "s0": ((4, 4), (4, 4), (4, 3, 3, 3, 4, 4), (4, 3, 3, 4)),
    "s1": ((4,) * 3, (4,) * 3, (4, 4, 3, 3, 3, 3, 4, 4, 4), (4, 4, 3, 3, 4, 4)),
    "s2": ((4,) * 4, (4,) * 4, (4, 4, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4), (4, 4, 3, 3, 3, 3, 4, 4)),
    "l": ((4,) * 5, (4,) * 5, (4, 4, 4, 4, 3, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4), (4, 4, 4, 3, 3, 3, 3, 4, 4, 4)),
}


def _variant(key, dims, depths, vit_num, drop_path, params_m, gmacs, top1, latency_ms):
    name = f"efficientformerv2_{key}"
    config = EfficientFormerV2Config(embed_dims=dims, depths=depths, mlp_ratios=_RATIOS[key], vit_num=vit_num,
                                     drop_path_rate=drop_path)
    register_model(name, EfficientFormerV2, config, family="efficientformer_v2", timm_name=name,
                   published=dict(params_m=params_m, gmacs=gmacs, top1=top1, latency_ms=latency_ms,
                                  latency_device="iPhone 12 (Core ML)"))


_variant("s0", (32, 48, 96, 176), (2, 2, 6, 4), 2, 0.0, 3.600, 0.396, 76.2, 0.9)
_variant("s1", (32, 48, 120, 224), (3, 3, 9, 6), 2, 0.0, 6.186, 0.652, 79.7, 1.1)
_variant("s2", (32, 64, 144, 288), (4, 4, 12, 8), 4, 0.02, 12.710, 1.247, 82.0, 1.6)
_variant("l", (40, 80, 192, 384), (5, 5, 15, 10), 6, 0.1, 26.322, 2.553, 83.5, 2.7)
