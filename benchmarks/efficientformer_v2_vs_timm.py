"""Batch-1 CPU latency of edgevits' eager deploy form vs timm's eager EfficientFormerV2 (not a test).

Both models get the same randomised weights (timm's, loaded into edgevits), outputs are checked to agree, then
the two are timed interleaved in one process (A, B, A, B, ...) and the medians compared, so that load from other
processes affects both alike.

    python benchmarks/efficientformer_v2_vs_timm.py --models s0 l --runs 20 --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import edgevits
from edgevits.testing import calibrate_bn, import_timm, parity, randomize_


def _time_once(model, x) -> float:
    t0 = time.perf_counter()
    model(x)
    return (time.perf_counter() - t0) * 1e3


@torch.no_grad()
def compare(variant: str, runs: int = 20, warmup: int = 3, size: int = 224) -> dict:
    """Median batch-1 latency (ms) of timm's eager model and edgevits' eager deploy form, timed interleaved."""
    timm = import_timm()
    name = f"efficientformerv2_{variant}"
    ref = timm.create_model(name)
    randomize_(ref)
    calibrate_bn(ref, [torch.randn(2, 3, size, size)])
    ours = edgevits.fuse_model(edgevits.create_model(name, checkpoint=ref.state_dict()))
    x = torch.randn(1, 3, size, size)
    err = parity(ours(x), ref(x))
    for _ in range(warmup):
        ref(x), ours(x)
    t_ref, t_ours = [], []
    for _ in range(runs):
        t_ref.append(_time_once(ref, x))
        t_ours.append(_time_once(ours, x))
    m_ref, m_ours = statistics.median(t_ref), statistics.median(t_ours)
    return dict(model=name, timm_ms=m_ref, edgevits_ms=m_ours, speedup=m_ref / m_ours, parity=err)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["s0", "s1", "s2", "l"])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"batch 1, {args.size}x{args.size}, {args.threads} thread(s), torch {torch.__version__}, "
          f"median of {args.runs} interleaved runs")
    print("| model | timm eager (ms) | edgevits deploy, eager (ms) | speed-up |")
    print("|---|---|---|---|")
    for v in args.models:
        r = compare(v, args.runs, size=args.size)
        print(f"| {r['model']} | {r['timm_ms']:.1f} | {r['edgevits_ms']:.1f} | {r['speedup']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
