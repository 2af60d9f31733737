"""SwiftFormer (Shaker et al., ICCV 2023): conv encoders plus one efficient-additive-attention block per stage.

Matches the official Amshaker/SwiftFormer code. The attention revision is a config field: ``"current"`` (the
official code since 2023-07-26, the default) or ``"legacy"`` (first release / Hugging Face transformers).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..layers import (AdditiveAttention, ConvNorm, DeployModule, DropPath, FusedLinear, LayerScale, PreNormConvMlp,
                      channels_last_weights_, folded_conv, scale_output_)
from ..layers.attention import REGISTRY as ATTENTIONS
from ..layers.attention.additive import AdditiveAttentionDeploy
from .base import ClassifierModel, ModelConfig, Variant, conv_stem, drop_path_rates, stage_info


@dataclass(frozen=True, kw_only=True)
class SwiftFormerConfig(ModelConfig):
    embed_dims: tuple[int, ...] = (48, 56, 112, 220)
    depths: tuple[int, ...] = (3, 3, 6, 4)
    mlp_ratio: float = 4.0
    layer_scale_init: float = 1e-5
    attention: str = "additive"  # any token mixer from edgevits.layers.attention.REGISTRY (ablations)
    attention_revision: str = "current"  # "current" or "legacy" (additive attention only)

    def __post_init__(self):
        super().__post_init__()
        if len(self.embed_dims) != len(self.depths) or min(self.depths) < 1:
            raise ValueError("embed_dims and depths need one entry per stage, each depth >= 1")
        if self.attention_revision not in ("current", "legacy"):
            raise ValueError(f"attention_revision must be 'current' or 'legacy', got {self.attention_revision!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"unknown attention {self.attention!r}; choose from {', '.join(sorted(ATTENTIONS))}")


class ConvEncoder(nn.Module):
    """x + gamma * pw2(GELU(pw1(BN(dw3x3(x))))). Also SwiftFormer's local representation (hidden = dim)."""

    def __init__(self, dim: int, hidden: int, drop_path: float = 0.0, layer_scale_init: float = 1.0):
        super().__init__()
        self.dw = ConvNorm(dim, dim, 3, groups=dim, bias=True)
        self.pw1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.pw2 = nn.Conv2d(hidden, dim, 1)
        self.layer_scale = LayerScale((dim, 1, 1), layer_scale_init)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.layer_scale(self.pw2(self.act(self.pw1(self.dw(x))))))

    @torch.no_grad()
    def fuse(self) -> "ConvEncoderDeploy":
        deployed = ConvEncoderDeploy(self.dw, self.pw1, self.pw2)
        scale_output_(deployed.pw2, self.layer_scale.gamma)  # into the deploy form's own copy
        return deployed


class ConvEncoderDeploy(DeployModule, nn.Module):
    """Deploy form of ConvEncoder on channels-last maps: BN and layer scale folded, the 1x1 convs run as Linears
    on the (B, H, W, C) view (one GEMM each, no layout copies). In and out: (B, C, H, W), channels-last strides."""

    def __init__(self, dw: nn.Module, pw1: nn.Conv2d, pw2: nn.Conv2d):
        super().__init__()
        self.dw = channels_last_weights_(folded_conv(dw))
        self.pw1, self.pw2 = FusedLinear.from_conv1x1(pw1), FusedLinear.from_conv1x1(pw2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)  # a no-op after the first block
        t = self.dw(x).permute(0, 2, 3, 1)  # (B, H, W, C) view
        t = self.pw2(self.pw1(t, act="gelu"), residual=x.permute(0, 2, 3, 1))
        return t.permute(0, 3, 1, 2)


class SwiftFormerBlock(nn.Module):
    """Local representation, then x + ls1 * attention(tokens), then x + ls2 * MLP(x)."""

    def __init__(self, dim: int, mlp_ratio: float, drop_path: float, layer_scale_init: float, attention: str,
                 revision: str):
        super().__init__()
        self.local = ConvEncoder(dim, dim, 0.0, 1.0)
        self.attn = AdditiveAttention(dim, revision) if attention == "additive" else ATTENTIONS[attention](dim)
        self.mlp = PreNormConvMlp(dim, int(dim * mlp_ratio))
        self.layer_scale_1 = LayerScale((dim, 1, 1), layer_scale_init)
        self.layer_scale_2 = LayerScale((dim, 1, 1), layer_scale_init)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.local(x)
        b, c, h, w = x.shape
        t = self.attn(x.flatten(2).transpose(1, 2), (h, w))  # (B, N, C) tokens; hw for attentions on the grid
        x = x + self.drop_path(self.layer_scale_1(t.transpose(1, 2).reshape(b, c, h, w)))
        return x + self.drop_path(self.layer_scale_2(self.mlp(x)))

    @torch.no_grad()
    def fuse(self) -> "SwiftFormerBlockDeploy":
        return SwiftFormerBlockDeploy(self)


class SwiftFormerBlockDeploy(DeployModule, nn.Module):
    """Deploy form of SwiftFormerBlock: after the local representation everything runs on the (B, N, C) token view
    of the channels-last map; the MLP's BN folds into its first Linear, the layer scales into the last Linear of
    their branch, and the residuals are added inside those Linears (for the other attentions of the zoo, the first
    scale stays a multiply and the residual an add)."""

    def __init__(self, src: SwiftFormerBlock):
        super().__init__()
        # the children are in their deploy forms by now (fuse_model fuses bottom-up); copied, since the layer
        # scales fold into them and fuse() leaves its source as it was
        self.local, self.attn, self.mlp = copy.deepcopy((src.local, src.attn, src.mlp))
        gamma1 = src.layer_scale_1.gamma.detach().reshape(-1)
        self.fused_attn = isinstance(self.attn, AdditiveAttentionDeploy)  # its final Linear takes scale, residual
        if self.fused_attn:
            scale_output_(self.attn.final, gamma1)
            self.register_buffer("gamma1", None)
        else:
            self.register_buffer("gamma1", gamma1.clone())
        scale_output_(self.mlp.fc2, src.layer_scale_2.gamma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.local(x).contiguous(memory_format=torch.channels_last)
        b, c, h, w = x.shape
        t = x.permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, N, C) view of the channels-last map
        if self.fused_attn:
            t = self.attn(t, (h, w), residual=t)
        else:
            t = t + self.attn(t, (h, w)) * self.gamma1
        t = self.mlp.forward_tokens(t, residual=t)
        return t.reshape(b, h, w, c).permute(0, 3, 1, 2)


class SwiftFormerStage(nn.Module):
    def __init__(self, in_dim: int, dim: int, depth: int, downsample: bool, drop_paths: list[float],
                 cfg: SwiftFormerConfig):
        super().__init__()
        self.downsample = ConvNorm(in_dim, dim, 3, stride=2, bias=True) if downsample else nn.Identity()
        blocks: list[nn.Module] = [ConvEncoder(dim, int(cfg.mlp_ratio * dim), drop_path=0.0, layer_scale_init=1.0)
                                   for _ in range(depth - 1)]
        # Only the attention block of each stage carries stochastic depth (as in the official code).
        blocks.append(SwiftFormerBlock(dim, cfg.mlp_ratio, drop_paths[-1], cfg.layer_scale_init, cfg.attention,
                                       cfg.attention_revision))
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class SwiftFormer(ClassifierModel):
    """SwiftFormer classifier; ``forward`` returns logits (a (cls, dist) pair while training with distillation)."""

    family = "swiftformer"

    def __init__(self, config: SwiftFormerConfig):
        super().__init__(config)
        dims, depths = config.embed_dims, config.depths
        self.stem = conv_stem(config.in_chans, dims[0], nn.ReLU)
        rates = drop_path_rates(config.drop_path_rate, depths)
        self.stages = nn.ModuleList(SwiftFormerStage(dims[max(i - 1, 0)], dim, depth, i > 0, rates[i], config)
                                    for i, (dim, depth) in enumerate(zip(dims, depths)))
        self.feature_info = [stage_info(i, dim, 2 ** (i + 2)) for i, dim in enumerate(dims)]
        self._init_heads(nn.BatchNorm2d(dims[-1]))
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @torch.no_grad()
    def finish_deploy_(self) -> None:
        """Deploy form: the common folding, plus channels-last weights for the stem and the downsamplers (the
        blocks' deploy forms run on channels-last maps)."""
        super().finish_deploy_()
        for module in [self.stem, *(stage.downsample for stage in self.stages)]:
            channels_last_weights_(module)
        self.channels_last = True


def _variant(dims, depths, params_m, gmacs, top1, latency_ms):
    return Variant(SwiftFormerConfig(embed_dims=dims, depths=depths),
                   dict(params_m=params_m, gmacs=gmacs, top1=top1, latency_ms=latency_ms,
                        latency_device="iPhone 14 (Core ML)"))


MODEL = SwiftFormer
VARIANTS = {  # the registry reads these (edgevits.registry); timm names them alike
    "swiftformer_xs": _variant((48, 56, 112, 220), (3, 3, 6, 4), 3.475, 0.602, 75.7, 0.7),
    "swiftformer_s": _variant((48, 64, 168, 224), (3, 3, 9, 6), 6.092, 0.985, 78.5, 0.8),
    "swiftformer_l1": _variant((48, 96, 192, 384), (4, 3, 10, 5), 12.058, 1.596, 80.9, 1.1),
    "swiftformer_l3": _variant((64, 128, 320, 512), (4, 4, 12, 6), 28.495, 4.008, 83.0, 1.9),
}
