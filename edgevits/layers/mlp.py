"""Feed-forward blocks shared by the families."""
from __future__ import annotations

import torch
from torch import nn

from .conv import fuse_bn_conv


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

    def fuse(self) -> nn.Module:
        if isinstance(self.norm, nn.BatchNorm2d):
            self.fc1 = fuse_bn_conv(self.norm, self.fc1)
            self.norm = nn.Identity()
        return self
