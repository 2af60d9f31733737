"""Parameter and multiply-accumulate counts."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .layers import to_2tuple


def count_params(model: nn.Module) -> int:
    """Number of parameters (the distillation head included, as the papers count)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, img_size: int | tuple[int, int] = 224, in_chans: int = 3) -> int:
    """Multiply-accumulates of one eval-mode forward pass on one image, counted by ``torch.utils.flop_counter``
    (convolutions and matrix products; FLOPs / 2)."""
    h, w = to_2tuple(img_size)
    was_training = model.training
    model.eval()
    try:
        x = torch.zeros(1, in_chans, h, w, device=next(model.parameters()).device)
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2
