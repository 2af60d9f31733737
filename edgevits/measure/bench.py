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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..checkpoint.weights import get_weights
from ..errors import BackendUnavailable
from ..fuse import fuse_model
from ..registry import create_model, get_entry, list_models
from ..runtime.allocator import malloc_tuned
from ..runtime.backends import BACKENDS, FIXED_BATCH_BACKENDS, GRAPH_BACKENDS, make_runner
from ..runtime.settings import num_threads
from ..runtime.timing import describe_error, time_interleaved
from .flops import count_macs, count_params
from .plots import plot_latency_vs_top1
from .reference import import_timm, timm_twin

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
    tune_malloc: bool = True  # keep freed activation memory in the process while the bench runs, for every runner
    pretrained: bool | str = False  # True or a tag: our models carry their published weights (the timm twin, when
    # compared, keeps its own random weights: timing does not depend on the values)
    # (edgevits.runtime.allocator.malloc_tuned; the settings in force before are restored after the run)


def cpu_name() -> str:
    """This machine's CPU model and its widest vector/matrix extensions (from /proc/cpuinfo where there is one),
    e.g. ``"AMD EPYC (avx2, fma)"`` or ``"Intel(R) Xeon(R) ... (avx512f, avx512_vnni, amx_tile)"``."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")
    found = [f for f in wanted if f in flags]
    return f"{fields.get('model name', platform.machine())} ({', '.join(found) or 'no AVX2'})"


def measure_peak_gflops(threads: int | None = None, n: int | None = None, repeats: int = 8, device: str = "cpu",
                        dtype: torch.dtype = torch.float32, budget_s: float = 2.0) -> float | None:
    """This machine's matrix-multiply rate (GFLOP/s, best of ``repeats``, fewer once ``budget_s`` is spent) for an
    ``n`` x ``n`` matmul in ``dtype`` on ``device``: the compute ceiling the models are judged against. By default
    ``n`` is as large as one call of about 0.25 s allows (at most 2048 on CPU, 8192 on a GPU), sized from a
    512 x 512 matmul first: float16 on a CPU without native float16 runs at a few GFLOP/s, where a 2048 matmul takes
    seconds. None where such a matmul cannot run there. The benchmark measures it before and after its run and
    keeps the higher figure."""
    with num_threads(threads):
        if n is None:
            largest = 2048 if device == "cpu" else 8192
            rate = _peak(512, 2, device, dtype, budget_s)  # GFLOP/s of a small one
            if rate is None:
                return None
            n = int(min(largest, max(512, (rate * 1e9 * 0.25 / 2) ** (1 / 3))))
        return _peak(n, repeats, device, dtype, budget_s)


def _peak(n: int, repeats: int, device: str, dtype: torch.dtype, budget_s: float) -> float | None:
    """GFLOP/s of the fastest of up to ``repeats`` timed ``n`` x ``n`` matmuls (``time_interleaved``, one runner);
    None where the matmul cannot run (no kernel for ``dtype`` on ``device``, or no memory for it)."""
    try:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
    except RuntimeError:  # no memory for the operands
        return None
    times, _ = time_interleaved({"matmul": lambda _x: a @ b}, a, warmup=2, repeats=repeats, min_repeats=2,
                                budget_s=budget_s, device=device, settle=False)
    if not times.get("matmul"):  # it raised: no matmul kernel for this dtype on this device, or no memory
        return None
    return 2 * n ** 3 / min(times["matmul"]) / 1e9


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def check_spec(spec: BenchSpec) -> None:
    """Fail before any work on what ``spec`` cannot do: unknown model, backend or dtype (``KeyError`` /
    ``ValueError``), a CUDA device without CUDA (``ValueError``), ``compare="timm"`` without timm (``ImportError``),
    a ``pretrained`` tag a model does not have (``ConfigError``, before any download)."""
    for name in spec.models:
        get_entry(name)
    if spec.pretrained:
        for name in spec.models or list_models():
            get_weights(name, spec.pretrained)
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
    """Measure every model of ``spec``; returns ``{"machine": {...}, "spec": {...}, "records": [...]}`` (one record
    per model, source, backend and batch size). ``progress(message)`` is called before each step.

    A backend that cannot be built, or a runner that raises while being timed, is recorded (``status``
    "skipped"/"failed" with the reason in ``note``) and the run goes on without it. ``peak_fraction`` is against a
    matmul in the bench's own dtype on its own device (None where that cannot be measured). ``spec.threads`` holds
    for the run only, and so does ``spec.tune_malloc``: the whole run is measured inside ``malloc_tuned`` (see
    ``edgevits.runtime.allocator``), which restores the malloc settings in force before it; ``machine["malloc_tuned"]``
    records whether the tuning took effect."""
    check_spec(spec)
    say = progress or (lambda message: None)
    dtype = DTYPES[spec.dtype]
    with num_threads(spec.threads), malloc_tuned(spec.tune_malloc) as tuned, \
            tempfile.TemporaryDirectory(prefix="edgevits-bench-") as tmp:
        peak = measure_peak_gflops(None, device=spec.device, dtype=dtype)
        machine = {"platform": platform.platform(), "processor": cpu_name(),
                   "torch": torch.__version__, "threads": torch.get_num_threads(), "device": spec.device,
                   "dtype": spec.dtype, "peak_gflops_measured": peak, "malloc_tuned": tuned}
        records = []
        for name in spec.models or list_models():
            subject = _build_subject(spec, name, Path(tmp), say)
            for batch in spec.batch_sizes:
                say(f"{name}: timing batch {batch}")
                records += _time_batch(spec, subject, batch, machine)
                _add_ratios(records, name, batch)
        if peak:  # measured again after the run, the higher figure kept
            peak = max(peak, measure_peak_gflops(None, device=spec.device, dtype=dtype) or 0)
    machine["peak_gflops_measured"] = peak
    for rec in records:
        if rec.get("gflops_per_s") and peak:
            rec["peak_fraction"] = rec["gflops_per_s"] / peak
    return {"machine": machine, "spec": asdict(spec), "records": records}


@dataclass
class _Subject:
    """One model of a bench run: its runners per (source, backend), why the others are missing, its counts."""

    name: str
    runners: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)  # (source, backend) -> (status, why)
    sources: tuple[str, ...] = ("edgevits",)
    params: int = 0
    macs: int = 0


def _build_subject(spec: BenchSpec, name: str, workdir: Path, say: Callable[[str], None]) -> _Subject:
    """Build ``name`` (and its timm twin) and a runner for each source and backend of ``spec``."""
    say(f"{name}: building")
    subject = _Subject(name, sources=("edgevits", "timm") if spec.compare == "timm" else ("edgevits",))
    timm_model, model = None, None
    if spec.compare == "timm":
        try:
            timm_model, model = timm_twin(name, spec.img_size)
        except BackendUnavailable as e:
            subject.notes.update({("timm", b): ("skipped", str(e)) for b in spec.backends})
    if model is None or spec.pretrained:  # built for the bench's size, as the timm twin's is (EfficientViT's windows)
        model = create_model(name, img_size=spec.img_size, pretrained=spec.pretrained).eval()
    subject.params, subject.macs = count_params(model), count_macs(model, spec.img_size)
    dtype = DTYPES[spec.dtype]
    example = torch.randn(2, 3, spec.img_size, spec.img_size, device=spec.device, dtype=dtype)
    nets = {"edgevits": fuse_model(model).to(spec.device, dtype),
            "timm": timm_model.to(spec.device, dtype) if timm_model is not None else None}
    for source in subject.sources:
        for backend in spec.backends:
            if nets[source] is None:
                continue
            say(f"{name}: preparing {source} {backend}")
            # ours: the deploy form, except that the graph backends get the model itself (make_runner exports each
            # the formulation its runtime runs fastest)
            net = model if source == "edgevits" and backend in GRAPH_BACKENDS else nets[source]
            try:
                # ExecuTorch and LiteRT graphs have a fixed batch: convert at the first batch timed (a later batch
                # size converts again when first called)
                shaped = torch.randn(spec.batch_sizes[0], *example.shape[1:], device=spec.device, dtype=dtype) \
                    if backend in FIXED_BATCH_BACKENDS else example
                subject.runners[(source, backend)] = make_runner(net, backend, shaped, spec.threads,
                                                                 workdir / f"{name}-{source}-{backend}",
                                                                 fuse=source == "edgevits")
            except BackendUnavailable as e:
                subject.notes[(source, backend)] = ("skipped", str(e))
            except Exception as e:  # a backend that fails on one model must not end the run
                subject.notes[(source, backend)] = ("failed", describe_error(e))
    return subject


def _time_batch(spec: BenchSpec, subject: _Subject, batch: int, machine: dict) -> list[dict]:
    """Time every runner of ``subject`` at ``batch``, interleaved; one record per source and backend."""
    x = torch.randn(batch, 3, spec.img_size, spec.img_size, device=spec.device, dtype=DTYPES[spec.dtype])
    times, errors = time_interleaved({f"{s}/{b}": fn for (s, b), fn in subject.runners.items()}, x, spec.warmup,
                                     spec.repeats, spec.min_repeats, spec.budget_s, spec.device)
    entry = get_entry(subject.name)
    records = []
    for source in subject.sources:
        for backend in spec.backends:
            rec = dict(model=subject.name, family=entry.family, source=source, backend=backend, batch=batch,
                       img_size=spec.img_size, threads=machine["threads"], device=spec.device, dtype=spec.dtype,
                       params_m=round(subject.params / 1e6, 3), gmacs=round(subject.macs / 1e9, 4),
                       top1=entry.published.get("top1"))
            key = f"{source}/{backend}"
            ts = times.get(key)
            if not ts:
                status, why = (("failed", errors[key]) if key in errors
                               else subject.notes.get((source, backend), ("skipped", "not timed")))
                records.append({**rec, "status": status, "note": why})
                continue
            med = statistics.median(ts)
            gflops = 2 * subject.macs * batch / med / 1e9
            peak = machine["peak_gflops_measured"]
            rec.update(status="ok", median_ms=med * 1e3, p10_ms=_percentile(ts, 0.1) * 1e3,
                       p90_ms=_percentile(ts, 0.9) * 1e3, runs=len(ts), img_per_s=batch / med,
                       gflops_per_s=gflops, peak_fraction=gflops / peak if peak else None)
            records.append(rec)
    return records


# timm's own ways to run a model: eager, compiled, exported to ONNX Runtime. OpenVINO is ours to offer; it is
# reported for timm too when asked, but "vs timm's best" means the best of these.
# What a timm user runs today: PyTorch eager or compiled, or the model exported to ONNX (ONNX Runtime, OpenVINO).
TIMM_PATHS = ("eager", "compile", "onnxruntime", "openvino")


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
