"""Batch-1 CPU latency of edgevits' EfficientFormer V1 (eval form and eager deploy form) vs timm's eager model
(not a test).

All three models carry the same randomised weights (timm's, loaded into edgevits); outputs are checked to agree,
then they are timed interleaved in one process (A, B, C, A, B, C, ...; the order rotates every round) and the
medians compared, so that load from other processes affects all alike. Besides wall time the script reports the
calling thread's CPU time (``time.thread_time``), which a busy machine disturbs far less; with ``--threads 1``
all the work runs on that thread, so the CPU-time ratio is the robust figure.

    python benchmarks/efficientformer_vs_timm.py --models l1 l3 l7 --runs 30 --threads 1 [--ops]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import edgevits
from edgevits.testing import calibrate_bn, import_timm, parity, randomize_


def compare(variant: str, runs: int = 30, warmup: int = 3, size: int = 224) -> dict:
    """Median batch-1 wall and thread-CPU milliseconds of timm eager, edgevits eval form and edgevits deploy form."""
    name = f"efficientformer_{variant}"
    ref = import_timm().create_model(name)
    randomize_(ref)
    with torch.no_grad():
        calibrate_bn(ref, [torch.randn(2, 3, size, size)])
    ours = edgevits.create_model(name, checkpoint=ref.state_dict()).eval()
    deployed = edgevits.fuse_model(ours)  # built outside inference_mode, as usual
    with torch.inference_mode():
        return _time(name, {"timm": ref, "eval": ours, "deploy": deployed}, runs, warmup, size)


@torch.inference_mode()
def _time(name: str, models: dict, runs: int, warmup: int, size: int) -> dict:
    ref, ours, deployed = models["timm"], models["eval"], models["deploy"]
    x = torch.randn(1, 3, size, size)
    err = max(parity(deployed(x), ref(x))[0], parity(ours(x), ref(x))[0])
    for m in models.values():
        for _ in range(warmup):
            m(x)
    wall = {k: [] for k in models}
    cpu = {k: [] for k in models}
    names = list(models)
    for r in range(runs):
        for k in names[r % 3:] + names[:r % 3]:
            c0, t0 = time.thread_time(), time.perf_counter()
            models[k](x)
            wall[k].append((time.perf_counter() - t0) * 1e3)
            cpu[k].append((time.thread_time() - c0) * 1e3)
    out = dict(model=name, max_rel_err=err, gmacs=edgevits.count_macs(deployed, size) / 1e9)
    for k in names:
        out[f"{k}_wall_ms"] = statistics.median(wall[k])
        out[f"{k}_cpu_ms"] = statistics.median(cpu[k])
    return out


def _cpu_ms(fn, runs: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(runs):
        c0 = time.thread_time()
        fn()
        times.append((time.thread_time() - c0) * 1e3)
    return statistics.median(times)


@torch.inference_mode()
def op_timings(runs: int = 50) -> list[tuple[str, float]]:
    """The single ops that explain the gap: (label, median thread-CPU ms)."""
    import torch.nn.functional as F
    x = torch.randn(1, 48, 56, 56)  # L1 stage 0
    xc = x.contiguous(memory_format=torch.channels_last)
    y = torch.randn(1, 224, 14, 14).contiguous(memory_format=torch.channels_last)  # L1, input of the last downsampler
    w = torch.randn(448, 224, 3, 3)
    wc = w.contiguous(memory_format=torch.channels_last)
    pool = dict(kernel_size=3, stride=1, padding=1, count_include_pad=False)
    return [
        ("AvgPool3x3 (count_include_pad=False), 48x56x56, NCHW", _cpu_ms(lambda: F.avg_pool2d(x, **pool), runs)),
        ("AvgPool3x3 (count_include_pad=False), 48x56x56, channels-last",
         _cpu_ms(lambda: F.avg_pool2d(xc, **pool), runs)),
        ("conv3x3 s2 224->448 at 14x14, channels-last input, NCHW weight",
         _cpu_ms(lambda: F.conv2d(y, w, None, 2, 1), runs)),
        ("conv3x3 s2 224->448 at 14x14, channels-last input, channels-last weight",
         _cpu_ms(lambda: F.conv2d(y, wc, None, 2, 1), runs)),
    ]


def _peak_gmacs(threads: int, n: int = 1536, repeats: int = 10) -> float:
    """This machine's float32 GEMM rate in GMAC/s (best of ``repeats``). On one thread it is timed by thread-CPU
    time, like the models, so that other processes on the machine do not lower it."""
    if threads != 1:
        from edgevits.measure.bench import measure_peak_gflops
        return measure_peak_gflops(threads, n) / 2
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_cpu_once(lambda: a @ b) for _ in range(repeats))
    return n ** 3 / best / 1e9


def _cpu_once(fn) -> float:
    c0 = time.thread_time()
    fn()
    return time.thread_time() - c0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["l1", "l3", "l7"])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--ops", action="store_true", help="also time the single ops behind the difference")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.ops:
        print("| op (batch 1) | thread-CPU ms |")
        print("|---|---|")
        for label, ms in op_timings():
            print(f"| {label} | {ms:.3f} |")
        print()
    peak_gmacs = _peak_gmacs(args.threads)
    print(f"batch 1, {args.size}x{args.size}, {args.threads} thread(s), torch {torch.__version__}, "
          f"median of {args.runs} interleaved runs; wall ms / thread-CPU ms; GEMM peak {peak_gmacs:.0f} GMAC/s")
    print("| model | timm eager | edgevits eval form | edgevits deploy form | deploy speed-up (wall / CPU) "
          "| MACs at GEMM peak (ms) | max rel. error vs timm |")
    print("|---|---|---|---|---|---|---|")
    for v in args.models:
        r = compare(v, args.runs, size=args.size)
        cells = [f"{r[f'{k}_wall_ms']:.1f} / {r[f'{k}_cpu_ms']:.1f}" for k in ("timm", "eval", "deploy")]
        speed = (f"{r['timm_wall_ms'] / r['deploy_wall_ms']:.2f}x / {r['timm_cpu_ms'] / r['deploy_cpu_ms']:.2f}x")
        floor = r["gmacs"] / peak_gmacs * 1e3
        print(f"| {r['model']} | " + " | ".join(cells) + f" | {speed} | {floor:.1f} | {r['max_rel_err']:.1e} |",
              flush=True)


if __name__ == "__main__":
    main()
