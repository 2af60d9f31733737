"""Exponential moving average of a model's weights (buffers such as BN statistics are copied)."""
from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEma(nn.Module):
    """Keeps ``module``, a frozen copy updated as ``ema = decay * ema + (1 - decay) * model`` after each step.

    The decay ramps up as ``min(decay, (1 + step) / (10 + step))`` so the first steps do not pin the average to the
    random initialisation. Floating-point buffers (BN running statistics) are averaged too; integer ones are copied.
    """

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.steps = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        src = model.state_dict()
        for name, value in self.module.state_dict().items():
            new = src[name].detach()
            if value.dtype.is_floating_point:
                value.mul_(d).add_(new.to(value.dtype), alpha=1 - d)
            else:
                value.copy_(new)

    def state(self) -> dict:
        return {"weights": {k: v.detach().clone() for k, v in self.module.state_dict().items()}, "steps": self.steps}

    def load_state(self, state: dict) -> None:
        self.module.load_state_dict(state["weights"])
        self.steps = int(state["steps"])
