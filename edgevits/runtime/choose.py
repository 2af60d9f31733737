"""The choice behind ``edgevits.deploy``: the fastest verified way to run a model on this machine, behind the
model's signature."""
from __future__ import annotations

import copy
import shutil
import statistics
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import BackendUnavailable, ConfigError
from ..fuse import fuse_model
from ..layers import to_2tuple
from .backends import BACKEND_FORMAT, BACKENDS, FIXED_BATCH_BACKENDS, GRAPH_BACKENDS, make_runner
from .export import GRAPH_FORMS
from .parity import check_parity
from .timing import describe_error, time_interleaved

AUTO_CANDIDATES = ("eager", "eager_cl", "onnxruntime", "openvino", "executorch", "litert")


class Deployed:
    """A callable ``x -> logits`` running ``backend``; inputs of another image size than the one it was built
    for run on the PyTorch deploy form (exported graphs fix the image size; ExecuTorch and LiteRT graphs the batch
    size too: another batch runs on the deploy form as well)."""

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
        check = getattr(self.model, "check_input", None)
        if check is not None:  # the model's own input errors, whatever the backend
            check(x)
        fixed = getattr(self._runner, "fixed_batch", None)
        if tuple(x.shape[-2:]) != self.img_size or (fixed is not None and x.shape[0] != fixed):
            with torch.inference_mode():
                return self.model(x)
        return self._runner(x)

    def __repr__(self) -> str:
        return f"Deployed(backend={self.backend!r}, img_size={self.img_size}, timings_ms={self.timings_ms})"


class _Rejected(Exception):
    """A candidate whose outputs differ from the deploy form's."""


# Default parity tolerance (max abs difference over max abs logit) per model dtype: the candidates run other
# kernels than the reference (channels-last, fused graphs), which agree to about the dtype's rounding.
PARITY_ATOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where ``model``'s weights live and their floating dtype (CPU float32 for a model without any)."""
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.float32


Progress = Callable[[int, int, str], None]  # (steps done, steps in all, what runs now)


def _verified_runners(model: nn.Module, deployed: nn.Module, names, checks: list[torch.Tensor], atol: float,
                      threads: int | None, workdir: Path, progress: Progress, cache: bool) -> tuple[dict, dict]:
    """Build each candidate and check it against the deploy form on ``checks`` (the first is the timed batch);
    returns ``(runners, errors)``: the verified runners, and why each other candidate was not kept."""
    with torch.inference_mode():
        refs = {c.shape[0]: deployed(c) for c in checks}
    runners, errors = {}, {}
    for i, name in enumerate(names):
        progress(i, len(names) + 1, f"{name}: " + ("exporting and checking" if name in GRAPH_BACKENDS
                                                    else "building and checking"))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if name in GRAPH_BACKENDS:  # the formulation each runtime runs fastest (made by make_runner)
                    source = deployed if GRAPH_FORMS[BACKEND_FORMAT[name]] == "deploy" else model
                    runner = make_runner(source, name, checks[0], threads, workdir / name, cache=cache)
                else:  # a copy: eager_cl changes its model's memory format
                    runner = make_runner(fuse_model(deployed), name, checks[0], threads, workdir / name)
                ok = checks[:1] if name in FIXED_BATCH_BACKENDS else checks  # (those take the timed batch only)
                check_parity(runner, lambda c: refs[c.shape[0]], ok, atol, "output", _Rejected)
            runners[name] = runner
        except (BackendUnavailable, _Rejected) as e:
            errors[name] = str(e)
        except Exception as e:  # a backend that cannot handle this model is skipped, with the reason kept
            errors[name] = describe_error(e)
    return runners, errors


def deploy(model: nn.Module, backend: str = "auto", img_size: int | tuple[int, int] | None = None,
           batch_size: int = 1, threads: int | None = None, candidates: tuple[str, ...] = AUTO_CANDIDATES,
           atol: float | None = None, repeats: int = 10, workdir: str | Path | None = None,
           progress: Progress | None = None, cache: bool = True) -> Deployed:
    """Return a callable running ``model`` on the fastest backend verified on this machine.

    With ``backend="auto"`` every candidate that can run here is built, checked against the PyTorch deploy form on
    random batches of two sizes (``batch_size`` and 2, or 1 when that is 2; ExecuTorch and LiteRT, whose graphs
    have a fixed batch, at ``batch_size`` only) on the model's device and in its dtype (relative error <=
    ``atol``, default ``PARITY_ATOL`` for the dtype, else rejected), and timed at ``batch_size`` (interleaved); the
    fastest wins. The PyTorch candidates run the deploy form; the graph runtimes the form each runs fastest
    (``export.GRAPH_FORMS``), for CPU float32 models only (rejected with that reason otherwise); a runtime whose
    package is not installed is rejected with the extra to install. A named backend is built and checked the same
    way (an error if it fails the check).
    Why each candidate was not used is kept in ``Deployed.rejected``. Without ``workdir`` the exported graphs go to
    a temporary folder, of which only the chosen graph backend's files are kept (``Deployed.workdir``; None when a
    PyTorch backend wins). ``progress(done, total, label)`` is called as each candidate is built and before the
    timing (the graph backends' exports take most of the time: 5-30 s each). With ``cache`` the exported graphs
    are kept in edgevits' cache and reused by later calls on the same weights (``export_onnx(cache=True)``).
    """
    progress = progress or (lambda *_: None)
    deployed = fuse_model(model)
    device, dtype = _device_dtype(deployed)
    atol = PARITY_ATOL.get(dtype, 1e-4) if atol is None else atol
    h, w = to_2tuple(img_size or getattr(getattr(model, "config", None), "img_size", 224))
    in_chans = getattr(getattr(model, "config", None), "in_chans", 3)
    names = candidates if backend == "auto" else (backend,)
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        raise ConfigError(f"unknown backend {', '.join(map(repr, unknown)) or '(none given)'}; choose from "
                          f"{', '.join(BACKENDS)}")
    own_workdir = workdir is None  # ours to tidy: only the chosen graph backend's files are kept
    workdir = str(workdir or tempfile.mkdtemp(prefix="edgevits-deploy-"))
    x = torch.randn(batch_size, in_chans, h, w, device=device, dtype=dtype)  # timed; fixes compile's shapes
    other = 2 if batch_size == 1 else 1  # parity at two batch sizes, one of them the timed one (compile's shapes)
    checks = [x, torch.randn(other, in_chans, h, w, device=device, dtype=dtype)]
    runners, errors = _verified_runners(copy.deepcopy(model).eval(), deployed, names, checks, atol, threads,
                                        Path(workdir), progress, cache)
    if not runners:
        raise BackendUnavailable(f"no backend could run {type(model).__name__}: "
                                 + "; ".join(f"{n}: {why}" for n, why in errors.items()))
    progress(len(names), len(names) + 1, f"timing {', '.join(runners)}")
    times, failed = time_interleaved(runners, x, warmup=2, repeats=repeats, min_repeats=3, budget_s=5.0,
                                     device=str(device))
    errors.update({n: f"failed while timed: {why}" for n, why in failed.items()})
    if not times:
        raise BackendUnavailable(f"no backend could run {type(model).__name__}: "
                                 + "; ".join(f"{n}: {why}" for n, why in errors.items()))
    timings = {n: statistics.median(t) * 1e3 for n, t in times.items()}
    best = min(timings, key=timings.get)
    if own_workdir:  # the candidates' exported graphs would otherwise pile up in the temp folder, call after call
        for name in names:
            if name != best:
                shutil.rmtree(Path(workdir) / name, ignore_errors=True)
        if best not in GRAPH_BACKENDS:
            shutil.rmtree(workdir, ignore_errors=True)
            workdir = None
    progress(len(names) + 1, len(names) + 1, f"chose {best}")
    return Deployed(runners[best], best, deployed, (h, w), timings, errors, workdir)
