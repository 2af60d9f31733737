"""Cost of the attention zoo against the number of tokens (SwiftFormer's Figure 2, measured).

``analyze_attention`` measures, for every attention of ``edgevits.layers.attention.REGISTRY`` built at one width,
as the token count N grows:

- FLOPs of one forward pass, counted by ``torch.utils.flop_counter`` on the meta device (matrix products only:
  element-wise work such as softmax or normalisation is not counted; the CPU attention kernel is, see
  ``edgevits.measure.flops``);
- latency: the median over repeats of one batch-1 forward pass on the CPU, after warm-up, under
  ``torch.inference_mode``; at each N the attentions are timed round-robin (A, B, C, A, B, C, ...) so that load
  from other processes spreads over all of them alike;
- peak memory: the largest amount of tensor memory allocated, beyond what existed before the call (weights and
  input), during one forward pass, read from the allocation events of ``torch.profiler`` (``profile_memory``);
  the output tensor is included. This counts allocations through PyTorch's CPU allocator, which holds every
  tensor; scratch memory that a kernel library allocates on its own is not seen.

It then fits the exponent of each cost against N (least squares on log-log, over the points with N >=
``fit_from``; for latency also of the fastest repeat, the figure other processes disturb least) and finds the
token count at which additive attention becomes cheaper than plain MHSA.
Measurements that would take too long or too much memory (predicted from the previous points) are skipped with a
note rather than exhausting the machine; FLOPs are still counted for them (on the meta device, no memory used). An
attention that raises while measured is measured no further, with a note naming it and the error.
The CLI (``edgevits analyze attention``) prints a table and writes JSON and a log-log PNG plot.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import json
import math
import os
import platform
import statistics
import sys
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn

from ..layers.attention import REGISTRY
from ..runtime.allocator import reuse_freed_memory  # page faults would dominate memory-bound ops at large N (5x)
from ..runtime.settings import num_threads
from ..runtime.timing import time_interleaved
from ..fuse import fuse_model
from ..registry import create_model
from .flops import count_macs, count_params, flop_counter

DEFAULT_TOKENS = tuple(s * s for s in (7, 10, 14, 20, 28, 40, 56, 80, 112))  # 49 .. 12544
METRICS = ("flops", "latency_ms", "peak_mib")
BASELINE, CHALLENGER = "mhsa", "additive"


@dataclass
class AttentionAnalysis:
    """What ``analyze_attention`` measured. ``records`` has one dict per (attention, N): ``attention``,
    ``tokens``, ``flops``, ``latency_ms`` (median), ``latency_iqr_ms``, ``latency_min_ms``, ``repeats``, ``peak_mib``
    and ``skipped`` (why latency/memory were not measured, else None)."""

    dim: int
    tokens: list[int]
    names: list[str]
    fit_from: int
    records: list[dict] = field(default_factory=list)
    exponents: dict[str, dict[str, float | None]] = field(default_factory=dict)
    crossover: dict[str, dict] = field(default_factory=dict)
    environment: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def values(self, metric: str) -> dict[str, dict[int, float | None]]:
        """``{attention: {N: value}}`` for one of ``METRICS``."""
        out: dict[str, dict[int, float | None]] = {name: {} for name in self.names}
        for r in self.records:
            out[r["attention"]][r["tokens"]] = r[metric]
        return out

    def to_dict(self) -> dict:
        """Every field as plain JSON-ready data."""
        return asdict(self)

    def save_json(self, path: str) -> str:
        """Write ``to_dict()`` as JSON to ``path`` (its folder created); returns ``path``."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
        return path


def token_grid(n: int) -> tuple[int, int]:
    """The (H, W) grid handed to the attentions: square when ``n`` is a square, else one row."""
    side = math.isqrt(n)
    return (side, side) if side * side == n else (1, n)


def count_flops(module: nn.Module, tokens: int, dim: int) -> int:
    """FLOPs of one forward pass of a token attention on (1, tokens, dim); ``module`` should live on 'meta'."""
    device = next(module.parameters()).device
    x = torch.empty(1, tokens, dim, device=device)
    with torch.no_grad(), flop_counter() as counter:
        module(x, token_grid(tokens))
    return int(counter.get_total_flops())


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the profiler's C++ start/stop lines (written straight to file descriptor 2)."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def peak_memory_bytes(fn: Callable[[], object]) -> int:
    """Peak tensor memory allocated during ``fn()`` beyond what was allocated before it (CPU allocator events of
    ``torch.profiler``: running sum of allocations and frees in time order, its maximum)."""
    from torch.profiler import ProfilerActivity, profile
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def fit_exponent(points: list[tuple[int, float]]) -> float | None:
    """Slope of log(value) against log(N) by least squares; None with fewer than two usable points."""
    pts = [(math.log(n), math.log(v)) for n, v in points if v is not None and v > 0]
    if len(pts) < 2 or len({p[0] for p in pts}) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def _predict(history: list[tuple[int, float]], n: int) -> float | None:
    """Extrapolate a cost to ``n`` tokens from the last two measured points (exponent clamped to [1, 3])."""
    if not history:
        return None
    n1, v1 = history[-1]
    slope = 1.0
    if len(history) >= 2:
        n0, v0 = history[-2]
        if v0 > 0 and v1 > 0 and n1 != n0:
            slope = min(3.0, max(1.0, math.log(v1 / v0) / math.log(n1 / n0)))
    return v1 * (n / n1) ** slope


def _crossing(points: list[tuple[int, float]]) -> dict:
    """Where ``ratio = cost(additive) / cost(mhsa)`` falls below 1 for good, interpolated on log-log.

    ``points``: (N, ratio) in increasing N. Returns ``{"tokens": int | None, "status": ...}`` with status
    "below_range" (cheaper at every measured N), "crossed" or "not_reached" (never cheaper for good).
    """
    if not points:
        return {"tokens": None, "status": "not_measured"}
    last_bad = max((i for i, (_, r) in enumerate(points) if r >= 1.0), default=None)
    if last_bad is None:
        return {"tokens": points[0][0], "status": "below_range"}
    if last_bad == len(points) - 1:
        return {"tokens": None, "status": "not_reached"}
    (n0, r0), (n1, r1) = points[last_bad], points[last_bad + 1]
    t = math.log(r0) / (math.log(r0) - math.log(r1))  # where log(ratio) crosses 0 between the two points
    return {"tokens": int(round(math.exp(math.log(n0) + t * (math.log(n1) - math.log(n0))))), "status": "crossed",
            "between": [n0, n1]}


def _flops_crossover(add: nn.Module, mhsa: nn.Module, dim: int, hi: int) -> dict:
    """Smallest N in [1, hi] from which additive attention needs fewer counted FLOPs than MHSA (bisection on
    meta-device counts; the difference of the two polynomials in N changes sign at most once here)."""
    def cheaper(n: int) -> bool:
        return count_flops(add, n, dim) < count_flops(mhsa, n, dim)

    if cheaper(1):
        return {"tokens": 1, "status": "below_range"}
    if not cheaper(hi):
        return {"tokens": None, "status": "not_reached"}
    lo = 1  # not cheaper at lo, cheaper at hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if cheaper(mid) else (mid, hi)
    return {"tokens": hi, "status": "crossed"}


def _environment(threads: int) -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "threads": threads, "cpu_count": os.cpu_count(),
        "machine": f"{platform.system()} {platform.machine()} {platform.processor()}".strip(),
        "loadavg_start": list(load) if load else None,
    }


def analyze_attention(dim: int = 64, tokens: tuple[int, ...] | list[int] = DEFAULT_TOKENS,
                      names: list[str] | None = None, *, fit_from: int | None = None, threads: int | None = 1,
                      max_call_s: float = 1.0, max_mem_mib: float = 1024.0, target_s: float = 0.1,
                      min_repeats: int = 5, max_repeats: int = 50, seed: int = 0, reuse_memory: bool = True,
                      on_step: Callable[[int, int, str], None] | None = None) -> AttentionAnalysis:
    """Measure FLOPs, latency and peak memory of each attention against the token count; see the module doc.

    Args:
        dim: channel width C of the tokens (every attention is built as ``REGISTRY[name](dim)``).
        tokens: the token counts N to measure (batch 1).
        names: attentions to measure (default: all of ``REGISTRY``).
        fit_from: fit exponents over N >= this (default: the geometric mean of the smallest and largest N).
        threads: torch intra-op threads while timing (default 1: on a shared machine, a second thread waits for
            descheduled workers and batch-1 timings become scheduler noise; None leaves torch's setting).
        max_call_s, max_mem_mib: skip latency/memory at an N whose predicted per-call time or peak memory exceeds
            these (FLOPs are still counted).
        target_s, min_repeats, max_repeats: each timing takes about ``target_s`` seconds of repeats, within the
            bounds.
        reuse_memory: keep freed memory mapped while timing (see ``reuse_freed_memory``).
        on_step: called as ``on_step(done, total, label)`` after each (attention, N) pair, for a progress bar.
    Returns:
        an ``AttentionAnalysis``.
    """
    names = list(names or REGISTRY)
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise ValueError(f"unknown attention(s) {', '.join(unknown)}; choose from {', '.join(REGISTRY)}")
    tokens = sorted({int(n) for n in tokens})
    if not tokens or tokens[0] < 1:
        raise ValueError(f"token counts must be positive integers, got {tokens}")
    if fit_from is None:
        fit_from = int(math.sqrt(tokens[0] * tokens[-1]))
    with num_threads(threads):
        result = AttentionAnalysis(dim=dim, tokens=tokens, names=names, fit_from=fit_from,
                                   environment=_environment(torch.get_num_threads()))
        _analyze(result, seed, max_call_s, max_mem_mib, target_s, min_repeats, max_repeats, reuse_memory, on_step)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    result.environment["loadavg_end"] = list(load) if load else None
    return result


def _analyze(result: AttentionAnalysis, seed, max_call_s, max_mem_mib, target_s, min_repeats, max_repeats,
             reuse_memory, on_step) -> None:
    """Build the attentions, count, measure (``_measure``) and fit; fills ``result``."""
    names, tokens, dim, fit_from = result.names, result.tokens, result.dim, result.fit_from
    with torch.random.fork_rng(devices=[]):  # seeded weights; the caller's RNG state is left as it was
        torch.manual_seed(seed)
        modules = {name: REGISTRY[name](dim).eval() for name in names}
    metas = {name: copy.deepcopy(m).to("meta") for name, m in modules.items()}
    records = {(name, n): dict(attention=name, tokens=n, flops=count_flops(metas[name], n, dim), latency_ms=None,
                               latency_iqr_ms=None, latency_min_ms=None, repeats=0, peak_mib=None, skipped=None)
               for name in names for n in tokens}
    with reuse_freed_memory(reuse_memory) as reused:
        result.environment["reuse_freed_memory"] = reused
        _measure(result, modules, records, dim, (max_call_s, max_mem_mib), (target_s, min_repeats, max_repeats),
                 torch.Generator().manual_seed(seed), on_step)
    result.records = [records[(name, n)] for name in names for n in tokens]
    for name in names:
        result.exponents[name] = {
            metric: fit_exponent([(n, records[(name, n)][metric]) for n in tokens if n >= fit_from])
            for metric in METRICS + ("latency_min_ms",)}
    if BASELINE in names and CHALLENGER in names:
        lat = [(n, records[(CHALLENGER, n)]["latency_ms"] / records[(BASELINE, n)]["latency_ms"])
               for n in tokens if records[(CHALLENGER, n)]["latency_ms"] and records[(BASELINE, n)]["latency_ms"]]
        result.crossover = {
            "latency": {**_crossing(lat), "ratios": [[n, round(r, 4)] for n, r in lat]},
            "flops": _flops_crossover(metas[CHALLENGER], metas[BASELINE], dim, tokens[-1]),
        }
    else:
        result.notes.append(f"crossover needs both {CHALLENGER!r} and {BASELINE!r} among the attentions")


def _time_adaptive(runners: dict[str, Callable], x: torch.Tensor, target_s: float, min_repeats: int,
                   max_repeats: int) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Time ``runners`` round-robin, each for about ``target_s`` seconds of repeats (within ``min_repeats`` ..
    ``max_repeats``, sized from one first call each). Returns ``time_interleaved``'s ``(times, errors)``: a runner
    that raised in either pass is in ``errors`` only."""
    estimate, errors = time_interleaved(runners, x, warmup=1, repeats=1, min_repeats=1, budget_s=math.inf,
                                        settle=False)
    need = {name: int(min(max_repeats, max(min_repeats, math.ceil(target_s / max(t[0], 1e-6)))))
            for name, t in estimate.items()}
    times, late = time_interleaved({name: runners[name] for name in need}, x, warmup=0,
                                   repeats=max(need.values(), default=0), min_repeats=max_repeats, budget_s=math.inf,
                                   settle=False, counts=need)
    return times, {**errors, **late}


def _quartiles(ts: list[float]) -> tuple[float, float, float]:
    """Median, interquartile range and minimum of a list of timings."""
    ts = sorted(ts)
    q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
    return statistics.median(ts), q[2] - q[0], ts[0]


def _drop_costly(result, history, dropped: dict[str, str], n: int, max_call_s: float, max_mem_mib: float) -> None:
    """Add to ``dropped`` (attention -> why) those whose predicted time per call or peak memory at ``n`` tokens
    exceeds the limits, with a note for each."""
    for name, h in history.items():
        if name in dropped:
            continue
        t_pred, m_pred = _predict(h["t"], n), _predict(h["m"], n)
        if t_pred is not None and t_pred > max_call_s:
            dropped[name] = f"from N={n}: predicted {t_pred:.2f} s per call > {max_call_s} s"
        elif m_pred is not None and m_pred > max_mem_mib:
            dropped[name] = f"from N={n}: predicted peak {m_pred:.0f} MiB > {max_mem_mib:.0f} MiB"
        if name in dropped:
            result.notes.append(f"{name}: latency and memory not measured {dropped[name]}")


def _measure(result, modules, records, dim, limits, repeats, gen, on_step) -> None:
    """Latency (round-robin over the attentions at each N) and peak memory; fills ``records`` in place.

    ``limits``: (max_call_s, max_mem_mib); ``repeats``: (target_s, min_repeats, max_repeats); ``gen`` draws the
    inputs. An attention that raises is measured no further, as one predicted too costly: its records say why in
    ``skipped`` and a note names it and the error."""
    history: dict[str, dict[str, list]] = {name: {"t": [], "m": []} for name in modules}
    dropped: dict[str, str] = {}
    done, total = 0, len(modules) * len(result.tokens)
    for n in result.tokens:
        hw, x = token_grid(n), torch.randn(1, n, dim, generator=gen)
        _drop_costly(result, history, dropped, n, *limits)
        runners = {name: (lambda _x, m=m: m(x, hw)) for name, m in modules.items() if name not in dropped}
        with torch.inference_mode():
            times, errors = _time_adaptive(runners, x, *repeats)
            peaks = {name: peak_memory_bytes(lambda m=modules[name]: m(x, hw)) / 2 ** 20 for name in times}
        for name, error in errors.items():
            dropped[name] = f"since it failed at N={n}: {error}"
            result.notes.append(f"{name}: latency and memory not measured {dropped[name]}")
        for name in modules:
            if name in times:
                med, iqr, fastest = _quartiles(times[name])
                records[(name, n)].update(latency_ms=round(med * 1e3, 5), latency_iqr_ms=round(iqr * 1e3, 5),
                                          latency_min_ms=round(fastest * 1e3, 5), repeats=len(times[name]),
                                          peak_mib=round(peaks[name], 4))
                history[name]["t"].append((n, med))
                history[name]["m"].append((n, max(peaks[name], 1e-6)))
            else:
                records[(name, n)]["skipped"] = dropped[name]
            done += 1
            if on_step:
                on_step(done, total, f"{name} N={n}" + ("" if name in times else " (skipped)"))


def _build_swaps(model: str, names: list[str], img_size: int, on_step) -> tuple[dict, dict]:
    """``model`` with each attention of ``names`` (seeded weights, the caller's RNG left alone): ``(records,
    deploy forms)``, the records with parameters and GMACs."""
    models, records = {}, {}
    for i, name in enumerate(names):
        with torch.random.fork_rng(devices=[]):  # fuse_model draws too (the init of the layers it builds)
            torch.manual_seed(0)
            net = create_model(model, attention=name).eval()
            models[name] = fuse_model(net)
        records[name] = dict(attention=name, params_m=round(count_params(net) / 1e6, 4),
                             gmacs=round(count_macs(net, img_size) / 1e9, 4))
        if on_step:
            on_step(i + 1, 2 * len(names), f"built {model} with {name}")
    return records, models


def analyze_swaps(model: str = "swiftformer_xs", names: list[str] | None = None, img_size: int = 224, *,
                  threads: int | None = 1, target_s: float = 0.5, min_repeats: int = 3, max_repeats: int = 20,
                  reuse_memory: bool = True, on_step: Callable[[int, int, str], None] | None = None) -> dict:
    """SwiftFormer with each attention swapped in (the paper's ablation setting): parameters, GMACs and the batch-1
    CPU latency (median, deploy form from ``fuse_model``, models timed round-robin) at ``img_size``.

    Returns ``{"model", "img_size", "records": [{"attention", "params_m", "gmacs", "latency_ms",
    "latency_iqr_ms", "repeats", "error"}], "environment"}``. A model that raises while timed is not timed further:
    its ``latency_ms`` and ``latency_iqr_ms`` are None and ``error`` names the exception and its message (None
    for the others).
    """
    names = list(names or REGISTRY)
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise ValueError(f"unknown attention(s) {', '.join(unknown)}; choose from {', '.join(REGISTRY)}")
    with num_threads(threads):
        env = _environment(torch.get_num_threads())
        records, models = _build_swaps(model, names, img_size, on_step)
        x = torch.randn(1, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
        with reuse_freed_memory(reuse_memory) as reused, torch.inference_mode():
            env["reuse_freed_memory"] = reused
            times, errors = _time_adaptive(models, x, target_s, min_repeats, max_repeats)
        if on_step:
            on_step(2 * len(names), 2 * len(names), "timed")
    for name in names:
        if name in times:
            med, iqr, _ = _quartiles(times[name])
            records[name].update(latency_ms=round(med * 1e3, 3), latency_iqr_ms=round(iqr * 1e3, 3),
                                 repeats=len(times[name]), error=None)
        else:
            records[name].update(latency_ms=None, latency_iqr_ms=None, repeats=0, error=errors[name])
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    env["loadavg_end"] = list(load) if load else None
    return {"model": model, "img_size": img_size, "records": [records[n] for n in names], "environment": env}
