"""Adapters between the two layouts attentions use: tokens (B, N, C) and maps (B, C, H, W)."""
from __future__ import annotations

import math

import torch
from torch import nn


def infer_hw(n: int, hw: tuple[int, int] | None) -> tuple[int, int]:
    """The (H, W) grid of ``n`` tokens: ``hw`` when given, else the square root when ``n`` is a square."""
    if hw is not None:
        h, w = int(hw[0]), int(hw[1])
        if h * w != n:
            raise ValueError(f"hw={tuple(hw)} does not match the {n} tokens given")
        return h, w
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{n} tokens do not form a square grid: pass hw=(H, W) to the attention's forward")
    return side, side


class MapToTokens(nn.Module):
    """Runs a map attention ((B, C, H, W) -> (B, C, H, W)) on tokens: ``forward(x, hw=None)``, x (B, N, C).

    The wrapped module is kept as ``.attn`` (its state-dict keys gain that prefix). Cost: that of the wrapped
    module, plus two transposes.
    """

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.attn = attn

    def forward(self, x: torch.Tensor, hw: tuple[int, int] | None = None) -> torch.Tensor:
        b, n, c = x.shape
        h, w = infer_hw(n, hw)
        y = self.attn(x.transpose(1, 2).reshape(b, c, h, w))  # (B, C, H, W)
        return y.flatten(2).transpose(1, 2)  # (B, N, C)


class TokensToMap(nn.Module):
    """Runs a token attention (``forward(x, hw)`` on (B, N, C)) on a (B, C, H, W) map; the 2-D wrapper for
    dropping any token attention into a convolutional network. Cost: that of the wrapped module."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.attn = attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.attn(x.flatten(2).transpose(1, 2), (h, w))  # (B, N, C)
        return y.transpose(1, 2).reshape(b, c, h, w)
