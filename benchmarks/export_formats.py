"""Export every registered variant to every format and graph form; print a pass/fail table and write JSON.

Each export goes through the library's own path (``edgevits.export``: ONNX and OpenVINO through the dynamo ONNX
exporter, checked against PyTorch at batch 1 and 3; ExecuTorch and LiteRT checked with their own runtimes at batch
1; Core ML checked for its ops and features only, since it cannot run here); a failure is recorded with its
one-line reason, and an export that had to fall back to the TorchScript exporter is marked so. Randomised,
BN-calibrated weights, so the parity check is sensitive (default-initialised weights make these models' blocks
nearly the identity, which hides wrong kernels).

    python benchmarks/export_formats.py --img-size 64 --out bench_results/export_formats.json
    python benchmarks/export_formats.py --formats executorch,litert,coreml --forms default \
        --out bench_results/export_formats_mobile.json
    python benchmarks/export_formats.py efficientvit_m0 swiftformer_xs --formats onnx --forms deploy
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import torch

import edgevits
from edgevits.measure.bench import cpu_name
from edgevits.runtime.export import GRAPH_FORMS, SUFFIX
from edgevits.runtime.timing import describe_error
from edgevits.testing import calibrated



def export_one(name: str, fmt: str, form: str, size: int, folder: Path) -> dict:
    """Export one variant in one format and form; returns a record (status ok / fallback / failed, seconds)."""
    model = calibrated(edgevits.create_model(name, img_size=size), batches=1, batch_size=4, size=size)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", edgevits.EdgevitsWarning)
        try:
            out = edgevits.export(model, folder / f"{name}-{form}{SUFFIX[fmt]}", format=fmt, form=form)
            fell_back = [w for w in caught if issubclass(w.category, edgevits.EdgevitsWarning)]
            status, note = ("fallback", str(fell_back[0].message)) if fell_back else ("ok", "")
            if fmt == "coreml":
                note = f"ops and features checked, parity not verified here; {len(out[1]['ops'])} op types"
        except Exception as e:  # noqa: BLE001  (a table of what fails is the point)
            status, note = "failed", describe_error(e)
    return dict(model=name, format=fmt, form=form, img_size=size, status=status, note=note,
                seconds=round(time.perf_counter() - start, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="variants (default: all registered)")
    parser.add_argument("--formats", default="onnx,openvino", help="comma-separated export formats")
    parser.add_argument("--forms", default="deploy,eval",
                        help="comma-separated graph forms (deploy, eval, graph; default: each format's default)")
    parser.add_argument("--img-size", type=int, default=64, help="input side baked into the graphs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", default=None, help="JSON output path (default: print only)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models or edgevits.list_models():
            for fmt in args.formats.split(","):
                for form in args.forms.replace("default", GRAPH_FORMS[fmt]).split(","):
                    records.append(export_one(name, fmt, form, args.img_size, Path(tmp)))
                    r = records[-1]
                    print(f"{r['model']:22s} {fmt:9s} {form:7s} {r['status']:8s} {r['seconds']:6.1f} s  {r['note']}",
                          flush=True)
    counts = {s: sum(r["status"] == s for r in records) for s in ("ok", "fallback", "failed")}
    cpu = cpu_name()
    print(f"{len(records)} exports: {counts['ok']} ok, {counts['fallback']} fell back to TorchScript, "
          f"{counts['failed']} failed (torch {torch.__version__}, {cpu})")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(dict(torch=torch.__version__, cpu=cpu, records=records), indent=2))


if __name__ == "__main__":
    main()
