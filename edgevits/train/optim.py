"""Optimisation: AdamW parameter groups, gradient clipping, the learning-rate schedule and the values a run derives
from its config."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .config import TrainConfig


HEAD_PREFIXES = ("head.", "head_dist.")  # the classifier(s): what a fine-tuning run learns at the full rate


def param_groups(model: nn.Module, weight_decay: float, backbone_lr_scale: float | None = 1.0,
                 split_head: bool = True) -> list[dict]:
    """AdamW groups: no weight decay on norms, biases, layer scales and attention-bias tables; the backbone's
    learning rate is ``backbone_lr_scale`` x the schedule's, the classifier's the schedule's (each group carries its
    ``lr_scale`` and whether it is ``backbone``; groups without parameters are left out). ``split_head=False``: the
    two groups of training states saved before the head had its own (everything counted as backbone)."""
    scale = 1.0 if backbone_lr_scale is None else backbone_lr_scale
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(".bias") or "attention_bias" in name or "layer_scale" in name
        backbone = not split_head or not name.startswith(HEAD_PREFIXES)
        key = (backbone, skip)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": 0.0 if skip else weight_decay, "backbone": backbone,
                           "lr_scale": scale if backbone else 1.0}
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups, key=lambda k: (not k[0], k[1]))]


def _unitwise_norm(t: torch.Tensor) -> torch.Tensor:
    """L2 norm per output unit (dims 1.. of a weight), or of the whole tensor for biases and scales."""
    if t.ndim <= 1:
        return t.norm()
    return torch.linalg.vector_norm(t, dim=tuple(range(1, t.ndim)), keepdim=True)


@torch.no_grad()
def clip_gradients(params, value: float, mode: str = "agc", eps: float = 1e-3) -> None:
    """Clip gradients in place. ``agc`` (adaptive gradient clipping, Brock et al. 2021): each unit's gradient norm
    is scaled down to at most ``value`` x its weight norm (weight norms below ``eps`` count as ``eps``);
    ``norm``: the global gradient norm to ``value``; ``value``: each element to [-value, value]."""
    params = [p for p in params if p.grad is not None]
    if mode == "norm":
        nn.utils.clip_grad_norm_(params, value)
    elif mode == "value":
        nn.utils.clip_grad_value_(params, value)
    elif mode == "agc":
        for p in params:
            limit = _unitwise_norm(p.detach()).clamp_(min=eps) * value
            norm = _unitwise_norm(p.grad)
            p.grad.mul_(torch.where(norm > limit, limit / norm.clamp(min=1e-6), torch.ones_like(norm)))
    else:
        raise ValueError(f"unknown clip mode {mode!r}")


@dataclass(frozen=True)
class Schedule:
    """Per-step learning rate: linear warm-up, then cosine down to ``min_lr``."""

    peak: float
    total_steps: int
    warmup_steps: int
    warmup_lr: float
    min_lr: float

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr + (self.peak - self.warmup_lr) * step / self.warmup_steps
        t = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return self.min_lr + 0.5 * (self.peak - self.min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


MIN_LR_FRACTION = 0.01  # the cosine floor, as a fraction of the peak, when --min-lr is not below the peak


def resolve(cfg: TrainConfig, world_size: int, steps_per_epoch: int) -> dict:
    """The values the run derives from its config (also written to config.json). The schedule never rises: the
    cosine ends at ``min_lr`` only when it is below the peak, else at ``MIN_LR_FRACTION`` x the peak (the papers'
    1e-5 / 1e-3); the warm-up starts at ``warmup_lr`` or at the peak, whichever is lower."""
    global_batch = cfg.batch_size * world_size
    total = cfg.epochs * steps_per_epoch
    ema = min(cfg.ema_decay, max(1 - 5 / max(total, 1), 0.9)) if cfg.ema_decay > 0 else 0.0
    lr = cfg.lr if cfg.lr is not None else 1e-3 * global_batch / 1024
    return {"lr": lr, "min_lr": cfg.min_lr if cfg.min_lr < lr else lr * MIN_LR_FRACTION,
            "warmup_lr": min(cfg.warmup_lr, lr), "global_batch": global_batch,
            "world_size": world_size, "steps_per_epoch": steps_per_epoch, "total_steps": total,
            "warmup_epochs": min(cfg.warmup_epochs, cfg.epochs // 5), "ema_decay": max(ema, 0.0)}
