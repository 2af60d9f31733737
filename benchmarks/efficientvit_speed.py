"""Eager latency of the EfficientViT-MSRA deploy form (edgevits.fuse_model) against timm's eager model.

The two models are timed interleaved in one process (A, B, A, B, ...) and the medians compared, since absolute
times on a shared machine are noisy. Both get the same weights (timm's randomised state dict, loaded through
edgevits), and the script checks that the outputs agree before timing.

    python benchmarks/efficientvit_speed.py --models efficientvit_m0 efficientvit_m4 --batch 1 16 --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import edgevits
from edgevits.testing import calibrate_bn, import_timm, parity, randomize_


def _time(model, x, reps):
    t0 = time.perf_counter()
    for _ in range(reps):
        model(x)
    return (time.perf_counter() - t0) / reps


def compare(name: str, batch: int, rounds: int, min_time: float = 0.05) -> dict:
    """Median seconds per forward of timm eager and of the edgevits deploy form, timed interleaved."""
    timm = import_timm()
    ref = timm.create_model(name)
    randomize_(ref)
    calibrate_bn(ref, [torch.randn(4, 3, 224, 224)])
    ours = edgevits.fuse_model(edgevits.create_model(name, checkpoint=ref.state_dict()))
    with torch.inference_mode():
        return _compare(name, ref, ours, torch.randn(batch, 3, 224, 224), rounds, min_time)


def _compare(name, ref, ours, x, rounds, min_time):
    batch = x.shape[0]
    err = parity(ours(x), ref(x))
    for _ in range(3):  # warm-up
        ref(x), ours(x)
    one = _time(ref, x, 1)
    reps = max(1, int(min_time / max(one, 1e-6)))
    a, b = [], []
    for _ in range(rounds):
        a.append(_time(ref, x, reps))
        b.append(_time(ours, x, reps))
    ta, tb = statistics.median(a), statistics.median(b)
    return dict(model=name, batch=batch, timm_ms=ta * 1e3, edgevits_ms=tb * 1e3, speedup=ta / tb, parity=err)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["efficientvit_m0", "efficientvit_m4"])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 16])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), interleaved medians of {args.rounds} rounds")
    print("| model | batch | timm eager (ms) | edgevits deploy eager (ms) | speed-up | logits rel. err |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        for batch in args.batch:
            r = compare(name, batch, args.rounds)
            print(f"| {r['model']} | {r['batch']} | {r['timm_ms']:.2f} | {r['edgevits_ms']:.2f} | "
                  f"{r['speedup']:.2f}x | {r['parity'][0]:.1e} |", flush=True)


if __name__ == "__main__":
    main()
