"""Batch-1 CPU latency of edgevits' EfficientFormerV2 (eval form and eager deploy form) vs timm's eager model
(not a test).

The three models carry the same randomised weights (timm's, loaded into edgevits); their outputs are checked to
agree, then they are timed interleaved in one process (one call each per round, the order rotating every round)
and the medians compared, so that load from other processes hits all of them alike. Besides wall time the script
reports the calling thread's CPU time (``time.thread_time``), which a busy machine disturbs far less; with
``--threads 1`` all the work runs on that thread. The last column is the time the model's multiply-accumulates
would take at this core's measured float32 GEMM peak: no eager implementation can go below it.

    python benchmarks/efficientformer_v2_vs_timm.py --models s0 s1 s2 l --runs 30 --threads 1

``--ops`` adds what explains the difference: single ops timed in both memory layouts, the page faults one forward
pass takes, and the ops timm's eager model spends most time in (torch.profiler, batch 1).
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch

import edgevits
from edgevits.testing import calibrate_bn, import_timm, parity, randomize_


def gemm_peak_gmacs(n: int = 1024, runs: int = 10) -> float:
    """Single-call float32 matrix-product throughput (GMAC/s) of this thread, by thread-CPU time."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(runs):
        c0 = time.thread_time()
        a @ b
        times.append(time.thread_time() - c0)
    return n ** 3 / statistics.median(times) / 1e9


def compare(variant: str, runs: int = 30, warmup: int = 3, size: int = 224) -> dict:
    """Median batch-1 wall and thread-CPU milliseconds of timm eager, edgevits eval form and deploy form."""
    name = f"efficientformerv2_{variant}"
    ref = import_timm().create_model(name)
    randomize_(ref)
    calibrate_bn(ref, [torch.randn(2, 3, size, size)])
    ours = edgevits.create_model(name, checkpoint=ref.state_dict()).eval()
    models = {"timm": ref, "eval": ours, "deploy": edgevits.fuse_model(ours)}
    x = torch.randn(1, 3, size, size)
    with torch.inference_mode():
        want = ref(x)
        err = max(parity(models["deploy"](x), want)[0], parity(ours(x), want)[0])
        for model in models.values():
            for _ in range(warmup):
                model(x)
        wall = {k: [] for k in models}
        cpu = {k: [] for k in models}
        names = list(models)
        for r in range(runs):
            for k in names[r % 3:] + names[:r % 3]:
                c0, t0 = time.thread_time(), time.perf_counter()
                models[k](x)
                wall[k].append((time.perf_counter() - t0) * 1e3)
                cpu[k].append((time.thread_time() - c0) * 1e3)
    out = dict(model=name, max_rel_err=err, gmacs=edgevits.count_macs(ours, size) / 1e9)
    for k in names:
        out[f"{k}_wall_ms"] = statistics.median(wall[k])
        out[f"{k}_cpu_ms"] = statistics.median(cpu[k])
    return out


_FAULTS = """
import resource, statistics, sys, torch, edgevits
from edgevits.testing import import_timm
torch.set_num_threads(1)
name, which, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = import_timm().create_model(name).eval()
if which == "deploy":
    model = edgevits.fuse_model(edgevits.create_model(name, checkpoint=model.state_dict()))
x = torch.randn(1, 3, size, size)
counts = []
with torch.inference_mode():
    for _ in range(13):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        model(x)
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(int(statistics.median(counts[3:])))
"""


def _cpu_ms(fn, runs: int = 30) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(runs):
        c0 = time.thread_time()
        fn()
        times.append((time.thread_time() - c0) * 1e3)
    return statistics.median(times)


@torch.inference_mode()
def op_report(variant: str = "s0", size: int = 224) -> None:
    """Print the op-level evidence: layout-sensitive ops, page faults per forward, timm's most expensive ops."""
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    cl = torch.channels_last
    z = torch.randn(1, 1024, 7, 7)  # the stride attention's output before its x2 upsample (S0 and L)
    h = torch.randn(1, 128, 56, 56)  # the FFN's hidden map in S0's first stage
    w = torch.randn(128, 1, 3, 3)
    big = torch.randn(1, 1024, 14, 14) * 30  # the stride attention's GELU input; large activations as in the model
    print("| op (batch 1) | channels-first (ms) | channels-last (ms) |")
    print("|---|---|---|")
    for label, t, fn in [
        ("bilinear x2 upsample, 1024x7x7", z, lambda t: F.interpolate(t, scale_factor=2, mode="bilinear")),
        ("depthwise 3x3 conv, 128x56x56", h, lambda t: F.conv2d(t, w, padding=1, groups=128)),
        ("exact GELU (F.gelu), 1024x14x14", big, F.gelu),
        ("exact GELU on the (B, H, W, C) view, 1024x14x14", big, lambda t: F.gelu(t.permute(0, 2, 3, 1))),
    ]:
        tc = t.contiguous(memory_format=cl)
        print(f"| {label} | {_cpu_ms(lambda: fn(t)):.3f} | {_cpu_ms(lambda: fn(tc)):.3f} |")

    name = f"efficientformerv2_{variant}"
    print(f"\n| {name}, one forward pass in a fresh process | minor page faults (median of 10) |")
    print("|---|---|")
    for label, which in (("timm eager", "timm"), ("edgevits deploy form", "deploy")):
        out = subprocess.run([sys.executable, "-c", _FAULTS, name, which, str(size)], capture_output=True,
                             text=True, check=True)
        print(f"| {label} | {out.stdout.strip()} |")

    ref = import_timm().create_model(name).eval()
    x = torch.randn(1, 3, size, size)
    for _ in range(3):
        ref(x)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            ref(x)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(f"\n| timm {name}: op | calls per forward | share of self CPU time |")
    print("|---|---|---|")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]:
        print(f"| {e.key} | {e.count // 5} | {e.self_cpu_time_total / total:.1%} |")


_GEMM_OPS = {"aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::_slow_conv2d_forward"}


@torch.inference_mode()
def split_report(variants: list[str], size: int = 224) -> None:
    """Print each model's op time (torch.profiler self CPU time per forward) split into matrix products (MKL:
    ``addmm``/``mm``/``bmm``/``baddbmm`` and ``_slow_conv2d_forward``, PyTorch's batch-1 1x1 conv on one thread;
    with more threads PyTorch sends those convs to oneDNN and timm's GEMM column undercounts), oneDNN
    convolutions and everything else, for timm's eager model and our deploy form."""
    from torch.profiler import ProfilerActivity, profile

    print("| model | timm: all ops | timm: GEMM | ours: all ops | ours: GEMM | ours: oneDNN convs | ours: the rest |")
    print("|---|---|---|---|---|---|---|")
    for v in variants:
        name = f"efficientformerv2_{v}"
        ref = import_timm().create_model(name)
        randomize_(ref)
        calibrate_bn(ref, [torch.randn(2, 3, size, size)])
        ours = edgevits.fuse_model(edgevits.create_model(name, checkpoint=ref.eval().state_dict()).eval())
        x = torch.randn(1, 3, size, size)
        cells = []
        for model in (ref, ours):
            for _ in range(3):
                model(x)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(10):
                    model(x)
            split = {"all": 0.0, "gemm": 0.0, "conv": 0.0, "other": 0.0}
            for e in prof.key_averages():
                ms = e.self_cpu_time_total / 10 / 1e3
                kind = "gemm" if e.key in _GEMM_OPS else "conv" if "convolution" in e.key else "other"
                split["all"] += ms
                split[kind] += ms
            cells += [split["all"], split["gemm"]] + ([split["conv"], split["other"]] if model is ours else [])
        print(f"| {v.upper()} | " + " | ".join(f"{c:.1f}" for c in cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["s0", "s1", "s2", "l"])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--ops", action="store_true", help="also print the op-level evidence (see the docstring)")
    parser.add_argument("--split", action="store_true",
                        help="also split each model's op time into matrix products, oneDNN convs and the rest")
    parser.add_argument("--tune-malloc", action=argparse.BooleanOptionalAction, default=True,
                        help="raise glibc's malloc thresholds first (edgevits.tune_malloc; on by default, as in "
                             "`edgevits bench`): it applies to the whole process, timm's model included")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tuned = edgevits.tune_malloc() if args.tune_malloc else False
    peak = gemm_peak_gmacs()
    print(f"batch 1, {args.size}x{args.size}, {args.threads} thread(s), torch {torch.__version__}, medians of "
          f"{args.runs} interleaved calls (wall / thread CPU, ms); GEMM peak {peak:.1f} GMAC/s; "
          f"malloc tuned: {'yes' if tuned else 'no'}")
    print("| model | timm eager | edgevits eval form | edgevits deploy form | deploy speed-up (wall / CPU) "
          "| MACs at GEMM peak (ms) | max rel. error vs timm |")
    print("|---|---|---|---|---|---|---|")
    for v in args.models:
        r = compare(v, args.runs, size=args.size)
        cells = [f"{r[k + '_wall_ms']:.1f} / {r[k + '_cpu_ms']:.1f}" for k in ("timm", "eval", "deploy")]
        speed = f"{r['timm_wall_ms'] / r['deploy_wall_ms']:.2f}x / {r['timm_cpu_ms'] / r['deploy_cpu_ms']:.2f}x"
        print(f"| {r['model']} | {' | '.join(cells)} | {speed} | {r['gmacs'] / peak * 1e3:.1f} "
              f"| {r['max_rel_err']:.1e} |", flush=True)
    if args.split:
        print()
        split_report(args.models, args.size)
    if args.ops:
        print()
        op_report(args.models[0], args.size)


if __name__ == "__main__":
    main()
