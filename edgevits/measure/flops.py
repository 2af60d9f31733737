"""Parameter and multiply-accumulate counts."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from ..layers import to_2tuple


def _cpu_flash_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch's counter knows the CUDA attention kernels but not the CPU one that F.scaled_dot_product_attention
# dispatches to without a mask; without this entry the attention products would count as zero on CPU.
EXTRA_FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_sdpa_flops}


def flop_counter() -> FlopCounterMode:
    """A ``FlopCounterMode`` (no display) that also counts the CPU scaled-dot-product-attention kernel."""
    return FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS)


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
        with flop_counter() as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2
