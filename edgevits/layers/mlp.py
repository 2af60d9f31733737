"""Feed-forward blocks shared by the families."""
from __future__ import annotations

import torch
from torch import nn

from .conv import fuse_bn_conv
from .kernels import FusedLinear
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
        if type(self.act) is not nn.GELU or self.act.approximate != "none":
            raise NotImplementedError("the deploy form of PreNormConvMlp fuses the exact GELU only")
        return PreNormConvMlpDeploy(fuse_bn_conv(self.norm, self.fc1), self.fc2)


class PreNormConvMlpDeploy(DeployModule, nn.Module):
    """Deploy form of ``PreNormConvMlp`` on channels-last tokens (..., C): the BN folded into ``fc1``, both 1x1 convs
    as ``FusedLinear`` (GELU fused into the first, an optional residual added by the second)."""

    def __init__(self, fc1: nn.Conv2d, fc2: nn.Conv2d):
        super().__init__()
        self.fc1, self.fc2 = FusedLinear.from_conv1x1(fc1), FusedLinear.from_conv1x1(fc2)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc2(self.fc1(x, act="gelu"), residual=residual)
