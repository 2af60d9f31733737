"""``edgevits bench``: params, MACs and measured latency/throughput of the deploy form on each backend, optionally
side by side with timm's implementation of the same variant carrying the same weights.

Timings of everything measured for one model are interleaved (A, B, C, A, B, C, ...), so machine noise hits all
of them alike and the ratios are meaningful even on a busy machine.
"""
from __future__ import annotations

import csv
import json
import math
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .allocator import tune_malloc
from .backends import BACKENDS, GRAPH_BACKENDS, BackendUnavailable, describe_error, make_runner
from .flops import count_macs, count_params
from .fuse import fuse_model
from .registry import create_model, get_entry, list_models

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BenchSpec:
    """What to measure. Every field is also a flag of ``edgevits bench``."""

    models: list[str] = field(default_factory=list)  # empty: every registered model
    img_size: int = 224
    batch_sizes: tuple[int, ...] = (1, 16)
    backends: tuple[str, ...] = ("eager", "onnxruntime")
    threads: int | None = None  # torch/ORT/OpenVINO intra-op threads; None: torch's default
    device: str = "cpu"
    dtype: str = "float32"
    warmup: int = 3
    repeats: int = 20  # at most; fewer when budget_s runs out (never fewer than min_repeats)
    min_repeats: int = 5
    budget_s: float = 3.0  # time budget per model and batch size for the timed runs of all its runners
    compare: str | None = None  # "timm": the same variants from timm, same weights, interleaved
    tune_malloc: bool = True  # keep freed activation memory in the process (edgevits.allocator), for every runner


def measure_peak_gflops(threads: int | None = None, n: int | None = None, repeats: int = 8, device: str = "cpu",
                        dtype: torch.dtype = torch.float32, budget_s: float = 2.0) -> float | None:
    """This machine's matrix-multiply rate (GFLOP/s, best of ``repeats``, fewer once ``budget_s`` is spent) for an
    ``n`` x ``n`` matmul in ``dtype`` on ``device`` (``n``: 2048 on CPU, 8192 on a GPU): the compute ceiling the
    models are judged against. None where such a matmul cannot run there. The benchmark measures it before and
    after its run and keeps the higher figure."""
    if threads:
        torch.set_num_threads(threads)
    n = n or (2048 if device == "cpu" else 8192)
    try:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        for _ in range(2):
            a @ b
        _sync(device)
    except RuntimeError:  # no matmul kernel for this dtype on this device (or no memory for it)
        return None
    best, start = math.inf, time.perf_counter()
    for i in range(repeats):
        if i >= 2 and time.perf_counter() - start > budget_s:
            break
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def time_interleaved(runners: dict[str, Callable], x: torch.Tensor, warmup: int, repeats: int,
                     min_repeats: int, budget_s: float, device: str = "cpu",
                     ) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Seconds per call for each runner, measured round-robin (the order rotates every round).

    Each timed call is preceded by one untimed call of the same runner: backends keep their own thread pools
    (PyTorch's OpenMP, ONNX Runtime's, OpenVINO's, the compiled kernels' OpenMP), and the first call after
    another pool has run pays for waking its threads while the other pool's threads still spin.

    A runner that raises (in warm-up or timing) is dropped from the rotation and the others carry on. Returns
    ``(times, errors)``: ``times[name]`` for the runners that never failed, ``errors[name]`` (``describe_error``)
    for those that did."""
    names = list(runners)
    errors: dict[str, str] = {}

    def call(name: str) -> float | None:
        """Seconds for one call of ``name``; None (and ``name`` dropped) if it raised."""
        try:
            t0 = time.perf_counter()
            runners[name](x)
            _sync(device)
            return time.perf_counter() - t0
        except Exception as e:  # one runner failing must not end the measurement of the others
            errors[name] = describe_error(e)
            names.remove(name)
            return None

    for name in list(names):
        for _ in range(warmup):
            if call(name) is None:
                break
    times: dict[str, list[float]] = {n: [] for n in names}
    start = time.perf_counter()
    for r in range(repeats):
        if not names or r >= min_repeats and time.perf_counter() - start > budget_s:
            break
        for name in names[r % len(names):] + names[:r % len(names)]:
            if call(name) is not None:
                dt = call(name)
                if dt is not None:
                    times[name].append(dt)
    return {n: t for n, t in times.items() if n not in errors}, errors


def _timm_twin(name: str, img_size: int = 224):
    """timm's implementation of ``name`` built for ``img_size`` (random weights, calibrated BatchNorm) and ours
    built for the same size carrying the same weights (loaded from timm's state dict). Raises
    ``BackendUnavailable`` where timm has no counterpart or its model cannot run at that size."""
    from .testing import calibrate_bn, import_timm, randomize_
    entry = get_entry(name)
    if not entry.timm_name:
        raise BackendUnavailable(f"{name} has no timm counterpart")
    timm = import_timm()
    try:  # efficientformerv2/efficientvit_msra size their bias tables from img_size; swiftformer ignores it
        ref = timm.create_model(entry.timm_name, img_size=img_size)
        randomize_(ref)
        calibrate_bn(ref, [torch.randn(2, 3, img_size, img_size)])
    except Exception as e:  # timm's efficientformer (V1) fixes its attention bias at 224x224
        raise BackendUnavailable(f"timm's {entry.timm_name} cannot run at {img_size}x{img_size} "
                                 f"({describe_error(e)})") from e
    try:
        ours = create_model(name, checkpoint=ref.state_dict(), img_size=img_size).eval()
    except ValueError as e:  # a size our config rejects (EfficientFormer: a multiple of 32)
        raise BackendUnavailable(f"{name} cannot be built for {img_size}x{img_size} to carry timm's weights "
                                 f"({describe_error(e)})") from e
    return ref.eval(), ours


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def check_spec(spec: BenchSpec) -> None:
    """Fail before any work on what ``spec`` cannot do: unknown model, backend or dtype (``KeyError`` /
    ``ValueError``), a CUDA device without CUDA (``ValueError``), ``compare="timm"`` without timm (``ImportError``)."""
    for name in spec.models:
        get_entry(name)
    for b in spec.backends:
        if b not in BACKENDS:
            raise ValueError(f"unknown backend {b!r}; choose from {', '.join(BACKENDS)}")
    if spec.dtype not in DTYPES:
        raise ValueError(f"unknown dtype {spec.dtype!r}; choose from {', '.join(DTYPES)}")
    if spec.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {spec.device!r} asked for, but CUDA is not available here")
    if spec.compare not in (None, "timm"):
        raise ValueError(f"unknown compare {spec.compare!r}; the only one is 'timm'")
    if spec.compare == "timm":
        from .testing import import_timm
        try:
            import_timm()
        except ImportError as e:
            raise ImportError(f"comparing with timm needs timm, which is not installed here ({e}); "
                              "install it with: pip install timm --no-deps") from e


# Record columns in CSV order; keys a record has beyond these follow, sorted. ``status``: "ok" (timed),
# "skipped" (the backend or timm twin cannot run here, ``note`` says why) or "failed" (``note``: the error).
COLUMNS = ("model", "family", "source", "backend", "batch", "img_size", "threads", "device", "dtype", "status",
           "note", "params_m", "gmacs", "top1", "median_ms", "p10_ms", "p90_ms", "runs", "img_per_s",
           "gflops_per_s", "peak_fraction", "timm_over_ours", "best_timm_over_ours")


def run_bench(spec: BenchSpec, progress: Callable[[str], None] | None = None) -> dict:
    """Measure every model of ``spec``; returns ``{"machine": {...}, "records": [...]}`` (one record per model,
    source, backend and batch size). ``progress(message)`` is called before each step.

    A backend that cannot be built, or a runner that raises while being timed, is recorded (``status``
    "skipped"/"failed" with the reason in ``note``) and the run goes on without it. ``peak_fraction`` is against a
    matmul in the bench's own dtype on its own device (None where that cannot be measured)."""
    check_spec(spec)
    names = spec.models or list_models()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    malloc_tuned = tune_malloc() if spec.tune_malloc else False
    dtype = DTYPES[spec.dtype]
    peak = measure_peak_gflops(spec.threads, device=spec.device, dtype=dtype)
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "torch": torch.__version__, "threads": torch.get_num_threads(), "device": spec.device,
               "dtype": spec.dtype, "peak_gflops_measured": peak, "malloc_tuned": malloc_tuned}
    records = []
    with tempfile.TemporaryDirectory(prefix="edgevits-bench-") as tmp:
        for name in names:
            entry = get_entry(name)
            if progress:
                progress(f"{name}: building")
            runners, notes = {}, {}  # notes[(source, backend)] = (status, why)
            timm_model, model = None, None
            if spec.compare == "timm":
                try:
                    timm_model, model = _timm_twin(name, spec.img_size)
                except BackendUnavailable as e:
                    notes.update({("timm", b): ("skipped", str(e)) for b in spec.backends})
            if model is None:  # built for the bench's size, as the timm twin's is (EfficientViT's windows)
                model = create_model(name, img_size=spec.img_size).eval()
            params = count_params(model)
            macs = count_macs(model, spec.img_size)
            deployed = fuse_model(model).to(spec.device, dtype)
            example = torch.randn(2, 3, spec.img_size, spec.img_size, device=spec.device, dtype=dtype)
            sources = ["edgevits"] + (["timm"] if spec.compare == "timm" else [])
            nets = {"edgevits": deployed, "timm": timm_model.to(spec.device, dtype) if timm_model is not None else None}
            for source in sources:
                for backend in spec.backends:
                    if nets[source] is None:
                        continue
                    if progress:
                        progress(f"{name}: preparing {source} {backend}")
                    # ours: the deploy form, except that the graph backends get the model itself (make_runner
                    # exports each the formulation its runtime runs fastest)
                    net = model if source == "edgevits" and backend in GRAPH_BACKENDS else nets[source]
                    try:
                        runners[(source, backend)] = make_runner(net, backend, example, spec.threads,
                                                                 Path(tmp) / f"{name}-{source}-{backend}",
                                                                 fuse=source == "edgevits")
                    except BackendUnavailable as e:
                        notes[(source, backend)] = ("skipped", str(e))
                    except Exception as e:  # a backend that fails on one model must not end the run
                        notes[(source, backend)] = ("failed", describe_error(e))
            for batch in spec.batch_sizes:
                if progress:
                    progress(f"{name}: timing batch {batch}")
                x = torch.randn(batch, 3, spec.img_size, spec.img_size, device=spec.device, dtype=dtype)
                times, errors = time_interleaved({f"{s}/{b}": fn for (s, b), fn in runners.items()}, x,
                                                 spec.warmup, spec.repeats, spec.min_repeats, spec.budget_s,
                                                 spec.device)
                for source in sources:
                    for backend in spec.backends:
                        rec = dict(model=name, family=entry.family, source=source, backend=backend, batch=batch,
                                   img_size=spec.img_size, threads=machine["threads"], device=spec.device,
                                   dtype=spec.dtype, params_m=round(params / 1e6, 3), gmacs=round(macs / 1e9, 4),
                                   top1=entry.published.get("top1"))
                        key = f"{source}/{backend}"
                        ts = times.get(key)
                        if not ts:
                            status, why = (("failed", errors[key]) if key in errors
                                           else notes.get((source, backend), ("skipped", "not timed")))
                            records.append({**rec, "status": status, "note": why})
                            continue
                        med = statistics.median(ts)
                        gflops = 2 * macs * batch / med / 1e9
                        rec.update(status="ok", median_ms=med * 1e3, p10_ms=_percentile(ts, 0.1) * 1e3,
                                   p90_ms=_percentile(ts, 0.9) * 1e3, runs=len(ts), img_per_s=batch / med,
                                   gflops_per_s=gflops, peak_fraction=gflops / peak if peak else None)
                        records.append(rec)
                _add_ratios(records, name, batch)
    if peak:
        peak = max(peak, measure_peak_gflops(spec.threads, device=spec.device, dtype=dtype) or 0)
        machine["peak_gflops_measured"] = peak
        for rec in records:
            if rec.get("gflops_per_s"):
                rec["peak_fraction"] = rec["gflops_per_s"] / peak
    return {"machine": machine, "spec": asdict(spec), "records": records}


# timm's own ways to run a model: eager, compiled, exported to ONNX Runtime. OpenVINO is ours to offer; it is
# reported for timm too when asked, but "vs timm's best" means the best of these.
TIMM_PATHS = ("eager", "compile", "onnxruntime")


def _add_ratios(records: list[dict], name: str, batch: int) -> None:
    """On each of our records with a timm twin: ``timm_over_ours`` (same backend) and ``best_timm_over_ours``
    (timm's fastest path among TIMM_PATHS)."""
    mine = [r for r in records if r["model"] == name and r["batch"] == batch and "median_ms" in r]
    timm = {r["backend"]: r["median_ms"] for r in mine if r["source"] == "timm"}
    baseline = [ms for b, ms in timm.items() if b in TIMM_PATHS]
    for r in mine:
        if r["source"] == "edgevits":
            if r["backend"] in timm:
                r["timm_over_ours"] = timm[r["backend"]] / r["median_ms"]
            if baseline:
                r["best_timm_over_ours"] = min(baseline) / r["median_ms"]


def _geomean(values: list[float]) -> float | None:
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def summary(result: dict) -> dict:
    """Per batch size, geometric means over the models of timm/ours: eager vs eager, our best path vs timm's best
    path (TIMM_PATHS), and our best vs timm's best on any backend measured."""
    out = {}
    recs = [r for r in result["records"] if "median_ms" in r]
    for batch in sorted({r["batch"] for r in recs}):
        at = [r for r in recs if r["batch"] == batch]
        eager = [r["timm_over_ours"] for r in at if r["source"] == "edgevits" and r["backend"] == "eager"
                 and "timm_over_ours" in r]
        best, best_any = [], []
        for name in sorted({r["model"] for r in at}):
            ours = [r["median_ms"] for r in at if r["model"] == name and r["source"] == "edgevits"]
            theirs = {r["backend"]: r["median_ms"] for r in at if r["model"] == name and r["source"] == "timm"}
            baseline = [ms for b, ms in theirs.items() if b in TIMM_PATHS]
            if ours and baseline:
                best.append(min(baseline) / min(ours))
            if ours and theirs:
                best_any.append(min(theirs.values()) / min(ours))
        out[f"batch{batch}"] = {"eager_timm_over_ours_geomean": _geomean(eager),
                                "best_timm_over_best_ours_geomean": _geomean(best),
                                "best_any_timm_over_best_ours_geomean": _geomean(best_any), "models": len(best)}
    return out


def write_outputs(result: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write ``bench.json``, ``bench.csv`` and ``latency_vs_top1.png`` under ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {**result, "summary": summary(result)}
    paths = {"json": out / "bench.json", "csv": out / "bench.csv", "png": out / "latency_vs_top1.png"}
    paths["json"].write_text(json.dumps(result, indent=2, default=str))
    extra = sorted({k for r in result["records"] for k in r} - set(COLUMNS))
    cols = [*COLUMNS, *extra]
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols)
        writer.writeheader()
        writer.writerows(result["records"])
    plot_latency_vs_top1(result["records"], paths["png"])
    return paths


def plot_latency_vs_top1(records: list[dict], path: str | Path) -> None:
    """Published ImageNet top-1 against measured batch-1 latency of our fastest backend, one line per family
    (the papers' Figure 1, on this machine)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    batch = min(r["batch"] for r in records)
    best: dict[str, dict] = {}
    for r in records:
        if r["source"] != "edgevits" or r["batch"] != batch or "median_ms" not in r or r.get("top1") is None:
            continue
        if r["model"] not in best or r["median_ms"] < best[r["model"]]["median_ms"]:
            best[r["model"]] = r
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for family in sorted({r["family"] for r in best.values()}):
        pts = sorted((r["median_ms"], r["top1"], r["model"]) for r in best.values() if r["family"] == family)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=family)
        for ms, top1, name in pts:
            ax.annotate(name.split("_", 1)[-1], (ms, top1), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")  # 7, 8, 10 rather than 7x10^0
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.set_xlabel(f"latency, batch {batch}, fastest backend (ms, log scale)")
    ax.set_ylabel("ImageNet-1K top-1 (%, published)")
    ax.set_title("Accuracy vs latency measured on this machine")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
