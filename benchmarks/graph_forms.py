"""Batch-1 latency of the two graph forms edgevits can export (eval form, deploy form) against timm's model, on
ONNX Runtime or OpenVINO, same weights (timm's, randomised and BN-calibrated), malloc tuned for all alike.

The choice in ``edgevits.runtime.export.GRAPH_FORMS`` (ONNX: deploy form, OpenVINO: eval form) rests on this table.

    python benchmarks/graph_forms.py --backend openvino
    python benchmarks/graph_forms.py --backend onnxruntime
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import warnings
from pathlib import Path

import torch

import edgevits
from edgevits.runtime.backends import make_runner
from edgevits.runtime.timing import time_interleaved
from edgevits.runtime.export import graph_form
from edgevits.testing import calibrated, import_timm

MODELS = ["swiftformer_xs", "efficientformer_l1", "efficientformerv2_s0", "efficientvit_m0"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=["openvino", "onnxruntime"], default="openvino")
    p.add_argument("--models", nargs="*", default=MODELS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    warnings.simplefilter("ignore")
    edgevits.tune_malloc()
    torch.set_num_threads(args.threads)
    timm = import_timm()
    example, x = torch.randn(2, 3, 224, 224), torch.randn(1, 3, 224, 224)
    print(f"{args.backend}, batch 1, 224x224, {args.threads} threads, medians of {args.repeats} interleaved calls (ms)")
    print("| model | eval form | deploy form | timm |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            ref = calibrated(timm.create_model(name)).eval()
            ours = edgevits.create_model(name, checkpoint=ref.state_dict()).eval()
            graphs = {"eval": graph_form(copy.deepcopy(ours), "eval"), "deploy": graph_form(ours, "deploy"),
                      "timm": ref}
            runners = {k: make_runner(g, args.backend, example, args.threads, Path(tmp) / f"{name}-{k}", fuse=False)
                       for k, g in graphs.items()}
            times, errors = time_interleaved(runners, x, warmup=3, repeats=args.repeats, min_repeats=args.repeats,
                                             budget_s=1e9)
            med = {k: sorted(t)[len(t) // 2] * 1e3 for k, t in times.items()}
            print(f"| {name} | {med['eval']:.2f} | {med['deploy']:.2f} | {med['timm']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
