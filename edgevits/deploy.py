"""``edgevits.deploy``: the fastest verified way to run a model on this machine, behind the model's signature."""
from __future__ import annotations

import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from .backends import BackendUnavailable, make_runner
from .fuse import fuse_model
from .layers import to_2tuple

AUTO_CANDIDATES = ("eager", "eager_cl", "onnxruntime", "openvino")


class Deployed:
    """A callable ``x -> logits`` running ``backend``; inputs of another image size than the one it was built
    for run on the PyTorch deploy form (exported graphs fix the image size, not the batch)."""

    def __init__(self, runner, backend: str, fallback: nn.Module, img_size: tuple[int, int], timings: dict,
                 errors: dict, workdir: str | None):
        self._runner = runner
        self.backend = backend
        self.model = fallback
        self.img_size = img_size
        self.timings_ms = timings  # median ms per verified candidate, as measured when choosing
        self.rejected = errors  # candidate -> why it was not used
        self.workdir = workdir

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            with torch.inference_mode():
                return self.model(x)
        return self._runner(x)

    def __repr__(self) -> str:
        return f"Deployed(backend={self.backend!r}, img_size={self.img_size}, timings_ms={self.timings_ms})"


def deploy(model: nn.Module, backend: str = "auto", img_size: int | tuple[int, int] | None = None,
           batch_size: int = 1, threads: int | None = None, candidates: tuple[str, ...] = AUTO_CANDIDATES,
           atol: float = 1e-4, repeats: int = 10, workdir: str | Path | None = None) -> Deployed:
    """Return a callable running ``model``'s deploy form on the fastest backend verified on this machine.

    With ``backend="auto"`` every candidate that can run here is built, checked against the PyTorch deploy form on
    a random batch (relative error <= ``atol``, else rejected), and timed at ``batch_size`` (interleaved); the
    fastest wins. A named backend is built and checked the same way (an error if it fails the check).
    """
    from .bench import time_interleaved
    deployed = fuse_model(model)
    h, w = to_2tuple(img_size or getattr(getattr(model, "config", None), "img_size", 224))
    in_chans = getattr(getattr(model, "config", None), "in_chans", 3)
    names = candidates if backend == "auto" else (backend,)
    workdir = str(workdir or tempfile.mkdtemp(prefix="edgevits-deploy-"))
    x = torch.randn(batch_size, in_chans, h, w)
    with torch.inference_mode():
        ref = deployed(x)
    runners, errors = {}, {}
    for name in names:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                runner = make_runner(fuse_model(deployed), name, x, threads, Path(workdir) / name)
                out = runner(x)
            err = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-6))
            if err > atol:
                errors[name] = f"output differs from PyTorch by {err:.2e}"
                continue
            runners[name] = runner
        except BackendUnavailable as e:
            errors[name] = str(e)
        except Exception as e:  # a backend that cannot handle this model is skipped, with the reason kept
            errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    if not runners:
        raise RuntimeError(f"no backend could run {type(model).__name__}: {errors}")
    times = time_interleaved(runners, x, warmup=2, repeats=repeats, min_repeats=3, budget_s=5.0)
    timings = {n: statistics.median(t) * 1e3 for n, t in times.items()}
    best = min(timings, key=timings.get)
    return Deployed(runners[best], best, deployed, (h, w), timings, errors, workdir)
