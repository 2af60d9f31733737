"""Comparing a runner's outputs with a reference: the one relative-error measure and the one parity check that
export, ``deploy()`` and the tests use."""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from ..errors import ExportError


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (computed in float64): the error relative to the largest reference value."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def parity(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(relative error of the values, relative error of their input-dependent part: values minus their mean over
    the first axis, the batch)."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return rel_err(a, b), rel_err(a - a.mean(0), b - b.mean(0))


@torch.no_grad()
def check_parity(run: Callable[[torch.Tensor], object], reference: Callable[[torch.Tensor], torch.Tensor],
                 inputs: Iterable[torch.Tensor], atol: float, what: str = "output",
                 error: type[Exception] = ExportError) -> float:
    """Run ``run`` and ``reference`` on every input; return the worst relative error (``rel_err``), or raise
    ``error`` naming the batch size when the shapes differ or the error exceeds ``atol``."""
    worst = 0.0
    for x in inputs:
        ref = torch.as_tensor(reference(x)).float()
        out = torch.as_tensor(run(x)).float()
        if tuple(out.shape) != tuple(ref.shape):
            raise error(f"{what} shape {tuple(out.shape)} != PyTorch {tuple(ref.shape)} at batch {x.shape[0]}")
        err = rel_err(out.cpu(), ref.cpu())
        if not err <= atol:  # (a NaN fails too)
            raise error(f"{what} differs from PyTorch by {err:.2e} (relative) at batch {x.shape[0]} (> {atol:g})")
        worst = max(worst, err)
    return worst
