"""Feed-forward blocks shared by the families."""
from __future__ import annotations

import copy

import torch
from torch import nn

from .conv import fuse_bn_conv
from .kernels import FusedLinear, fusable_act
from .misc import DeployModule


class Mlp(nn.Module):
    """Token MLP: Linear -> act -> Linear on (B, N, C) (EfficientFormer's Meta3D)."""

    def __init__(self, dim: int, hidden: int, act: type[nn.Module] = nn.GELU, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act()
        self.drop = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class PreNormConvMlp(nn.Module):
    """BN2d -> 1x1 -> act -> 1x1 on (B, C, H, W) (SwiftFormer's MLP). ``fuse()`` folds the BN into ``fc1``."""

    def __init__(self, dim: int, hidden: int, act: type[nn.Module] = nn.GELU, drop: float = 0.0):
        super().__init__()
        self.norm = nn.BatchNorm2d(dim)
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = act()
        self.drop = nn.Dropout(drop)
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(self.norm(x))))))

    @torch.no_grad()
    def fuse(self) -> "PreNormConvMlpDeploy":
        return PreNormConvMlpDeploy(fuse_bn_conv(self.norm, self.fc1), self.fc2, copy.deepcopy(self.act))


class PreNormConvMlpDeploy(DeployModule, nn.Module):
    """Deploy form of ``PreNormConvMlp``: the BN folded into ``fc1``, both 1x1 convs as ``FusedLinear`` (an exact
    GELU or a ReLU fused into the first, an optional residual added by the second). ``forward`` takes the same
    (B, C, H, W) maps as the source; ``forward_tokens`` takes channels-last tokens (..., C), the layout a deploy
    block keeps its map in."""

    def __init__(self, fc1: nn.Conv2d, fc2: nn.Conv2d, act: nn.Module | None = None):
        super().__init__()
        self.fc1, self.fc2 = FusedLinear.from_conv1x1(fc1), FusedLinear.from_conv1x1(fc2)
        act = nn.GELU() if act is None else act
        self.fused_act = fusable_act(act)
        self.act = None if self.fused_act else act  # any other activation runs as its own module

    def forward_tokens(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.act is None:
            hidden = self.fc1(x, act=self.fused_act)
        else:
            hidden = self.act(self.fc1(x))
        return self.fc2(hidden, residual=residual)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        res = None if residual is None else residual.permute(0, 2, 3, 1)
        return self.forward_tokens(x.permute(0, 2, 3, 1), res).permute(0, 3, 1, 2)
