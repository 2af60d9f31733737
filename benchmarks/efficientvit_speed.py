"""Eager latency of the EfficientViT-MSRA deploy form (edgevits.fuse_model) against timm's eager model.

The two models are timed interleaved in one process, one forward pass each in turn (A, B, A, B, ...), and the
medians compared, since absolute times on a shared machine are noisy (``--clock cpu`` times this process's CPU
time instead of the wall clock). Both get the same weights (timm's randomised state dict, loaded through
edgevits), and the script reports how far the outputs differ.

    python benchmarks/efficientvit_speed.py --models efficientvit_m0 efficientvit_m4 --batch 1 16 --threads 1 \
        --clock cpu
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import edgevits
from edgevits.testing import calibrate_bn, import_timm, parity, randomize_


CLOCK = time.perf_counter


def _time(model, x, reps):
    t0 = CLOCK()
    for _ in range(reps):
        model(x)
    return (CLOCK() - t0) / reps


def compare(name: str, batch: int, seconds: float) -> dict:
    """Median seconds per forward of timm eager and of the edgevits deploy form, timed interleaved."""
    timm = import_timm()
    ref = timm.create_model(name)
    randomize_(ref)
    calibrate_bn(ref, [torch.randn(4, 3, 224, 224)])
    ours = edgevits.fuse_model(edgevits.create_model(name, checkpoint=ref.state_dict()))
    with torch.inference_mode():
        return _compare(name, ref, ours, torch.randn(batch, 3, 224, 224), seconds)


def _compare(name, ref, ours, x, seconds):
    batch = x.shape[0]
    err = parity(ours(x), ref(x))
    for _ in range(3):  # warm-up
        ref(x), ours(x)
    a, b = [], []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(a) < 5:  # one call each, alternating: A, B, A, B, ...
        a.append(_time(ref, x, 1))
        b.append(_time(ours, x, 1))
    ta, tb = statistics.median(a), statistics.median(b)
    ratio = statistics.median(x / y for x, y in zip(a, b))  # the speed-up of each adjacent pair
    return dict(model=name, batch=batch, timm_ms=ta * 1e3, edgevits_ms=tb * 1e3, speedup=ratio, pairs=len(a),
                parity=err)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["efficientvit_m0", "efficientvit_m4"])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 16])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=8.0, help="timing budget per model and batch size")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: this process's CPU time (time.process_time), which other processes' load on a shared "
                        "machine does not inflate; meaningful with --threads 1")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.clock} clock, single calls alternated for "
          f"{args.seconds:g} s per row; medians (speed-up: median over adjacent pairs)")
    print("| model | batch | timm eager (ms) | edgevits deploy eager (ms) | speed-up | pairs | logits rel. err |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        for batch in args.batch:
            r = compare(name, batch, args.seconds)
            print(f"| {r['model']} | {r['batch']} | {r['timm_ms']:.2f} | {r['edgevits_ms']:.2f} | "
                  f"{r['speedup']:.2f}x | {r['pairs']} | {r['parity'][0]:.1e} |", flush=True)


if __name__ == "__main__":
    main()
