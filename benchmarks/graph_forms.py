"""Batch-1 latency of the three graph forms edgevits can export (eval, deploy and graph form) against timm's model,
on each graph runtime (ONNX Runtime, OpenVINO, ExecuTorch-XNNPACK, LiteRT-XNNPACK), same weights (timm's,
randomised and BN-calibrated), malloc tuned for all alike, the candidates of one model and runtime timed
round-robin in one process.

The per-family choice in ``edgevits.runtime.export.FAMILY_FORMS`` rests on this table.

    python benchmarks/graph_forms.py --out bench_results/graph_forms.json
    python benchmarks/graph_forms.py --backends onnxruntime --models efficientvit_m0
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import warnings
from pathlib import Path

import torch

import edgevits
from edgevits.measure.bench import cpu_name
from edgevits.runtime.backends import FIXED_BATCH_BACKENDS, make_runner
from edgevits.runtime.timing import describe_error, time_interleaved
from edgevits.runtime.export import graph_form
from edgevits.testing import calibrated, import_timm

MODELS = ["swiftformer_xs", "efficientformer_l1", "efficientformerv2_s0", "efficientvit_m0"]


FORMS = ("eval", "deploy", "graph")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default="onnxruntime,openvino,executorch,litert")
    p.add_argument("--models", nargs="*", default=MODELS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", type=Path, default=None, help="write the medians as JSON here")
    args = p.parse_args()
    warnings.simplefilter("ignore")
    edgevits.tune_malloc()
    torch.set_num_threads(args.threads)
    timm = import_timm()
    x = torch.randn(1, 3, 224, 224)
    results = {"cpu": cpu_name(), "threads": args.threads, "batch": 1, "img_size": 224, "ms": {}}
    print(f"{cpu_name()}; batch 1, 224x224, {args.threads} threads, medians of {args.repeats} interleaved calls (ms)")
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends.split(","):
            fixed = backend in FIXED_BATCH_BACKENDS
            example = x if fixed else torch.randn(2, 3, 224, 224)
            print(f"\n{backend}\n| model | eval form | deploy form | graph form | timm | timm / best |\n"
                  "|---|---|---|---|---|---|")
            for name in args.models:
                ref = calibrated(timm.create_model(name)).eval()
                ours = edgevits.create_model(name, checkpoint=ref.state_dict()).eval()
                graphs = {form: graph_form(copy.deepcopy(ours), form, example, target=backend) for form in FORMS}
                graphs["timm"] = ref
                runners, med = {}, {}
                for k, g in graphs.items():
                    try:
                        runners[k] = make_runner(g, backend, example, args.threads, Path(tmp) / f"{name}-{k}",
                                                 fuse=False)
                    except Exception as e:  # e.g. the deploy form does not lower to ExecuTorch
                        med[k] = describe_error(e).split(":")[0]
                times, _ = time_interleaved(runners, x, warmup=3, repeats=args.repeats, min_repeats=args.repeats,
                                            budget_s=1e9)
                med.update({k: sorted(t)[len(t) // 2] * 1e3 for k, t in times.items() if t})
                ours_ms = [med[f] for f in FORMS if isinstance(med.get(f), float)]
                cell = {k: f"{v:.2f}" if isinstance(v, float) else f"failed ({v})" for k, v in med.items()}
                ratio = f"{med['timm'] / min(ours_ms):.2f}" if ours_ms and isinstance(med.get("timm"), float) else "-"
                print(f"| {name} | {cell.get('eval')} | {cell.get('deploy')} | {cell.get('graph')} | "
                      f"{cell.get('timm')} | {ratio} |", flush=True)
                results["ms"].setdefault(backend, {})[name] = med
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
