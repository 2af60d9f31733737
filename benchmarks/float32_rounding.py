"""How far each float32 computation the tests compare sits from its float64 self, for every variant.

The test suite's tolerances (``edgevits.testing.assert_parity``) are multiples of the rounding actually present:
the reference's own float32 error against a float64 run of the same network on the same input. This script
measures, for every registered variant (randomised weights, BN-calibrated, as in the tests), the relative error of

* the eval form in float32 against float64 (``noise``, the yardstick),
* the deploy form (``fuse_model``) in float32 against the float64 eval form,
* with ``--timm``: timm's model in float32 against timm's in float64 (its yardstick) and ours (loaded with timm's
  weights) in float32 against timm in float64,

and prints each fast form's error as a multiple of its yardstick: the constant ``PARITY_FACTOR`` must stay above
the largest multiple seen on every CPU. Run it once natively and once with other instruction sets, e.g. on an
Intel CPU ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2`` (AVX2 numerics), on any
x86 CPU ``ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_ENABLE_INSTRUCTIONS=SSE4_2`` (SSE4 numerics):

    python benchmarks/float32_rounding.py --timm --json rounding-native.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform

import torch

import edgevits
from edgevits.testing import calibrated, import_timm, parity


def _pair(out: torch.Tensor, ref64: torch.Tensor) -> tuple[float, float]:
    return parity(out, ref64)


@torch.no_grad()
def measure(name: str, size: int, batch: int, with_timm: bool, exports: bool = False) -> dict:
    torch.manual_seed(0)
    model = calibrated(edgevits.create_model(name, img_size=size), size=size)
    x = torch.randn(batch, 3, size, size)
    model64 = copy.deepcopy(model).double()
    eval32, eval64 = model(x), model64(x.double())
    fused32 = edgevits.fuse_model(model)(x)
    noise = _pair(eval32, eval64)
    fused = _pair(fused32, eval64)
    row = {"model": name, "size": size, "noise": noise, "fused": fused,
           "fused_over_noise": [f / max(n, 2 ** -24) for f, n in zip(fused, noise)]}
    if exports:
        import tempfile
        from pathlib import Path
        from edgevits.runtime.export import export_onnx, export_openvino, onnx_session, openvino_compiled
        with tempfile.TemporaryDirectory() as tmp:
            onnx = onnx_session(export_onnx(model, Path(tmp) / "m.onnx", size, check=False))
            row["onnxruntime"] = _pair(torch.from_numpy(onnx.run(None, {"x": x.numpy()})[0]), eval64)
            ov = openvino_compiled(export_openvino(model, Path(tmp) / "m.xml", size, check=False))
            row["openvino"] = _pair(torch.from_numpy(ov(x.numpy())[0]), eval64)
        for k in ("onnxruntime", "openvino"):
            row[f"{k}_over_noise"] = [f / max(n, 2 ** -24) for f, n in zip(row[k], noise)]
    if with_timm and size == 224:
        ref = calibrated(import_timm().create_model(edgevits.get_entry(name).timm_name))
        ours = edgevits.create_model(name, checkpoint=ref.state_dict()).eval()
        timm32, timm64 = ref(x), copy.deepcopy(ref).double()(x.double())
        tnoise, ours_err = _pair(timm32, timm64), _pair(ours(x), timm64)
        row.update(timm_noise=tnoise, ours_vs_timm64=ours_err,
                   ours_over_timm_noise=[f / max(n, 2 ** -24) for f, n in zip(ours_err, tnoise)])
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=None)
    p.add_argument("--sizes", type=int, nargs="*", default=[224])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--timm", action="store_true", help="also measure ours against timm (at 224 only)")
    p.add_argument("--exports", action="store_true", help="also ONNX Runtime and OpenVINO exports of the model")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    env = {k: os.environ.get(k) for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")}
    rows = []
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {env}")
    print("| model | size | eval noise (logits, centred) | fused / noise | ours vs timm64 / timm noise |")
    print("|---|---|---|---|---|")
    for name in args.models or edgevits.list_models():
        for size in args.sizes:
            r = measure(name, size, args.batch, args.timm, args.exports)
            rows.append(r)
            t = r.get("ours_over_timm_noise")
            print(f"| {name} | {size} | {r['noise'][0]:.2e}, {r['noise'][1]:.2e} | "
                  f"{r['fused_over_noise'][0]:.2f}, {r['fused_over_noise'][1]:.2f} | "
                  + (f"{t[0]:.2f}, {t[1]:.2f} |" if t else "- |")
                  + "".join(f" {k}: {r[k + '_over_noise'][0]:.2f}, {r[k + '_over_noise'][1]:.2f}"
                            for k in ("onnxruntime", "openvino") if k in r), flush=True)
    worst = max(max(r["fused_over_noise"] + r.get("ours_over_timm_noise", []) + r.get("onnxruntime_over_noise", [])
                    + r.get("openvino_over_noise", [])) for r in rows)
    print(f"largest multiple of the yardstick: {worst:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "cpu": platform.processor(), "rows": rows, "worst": worst}, f, indent=2)


if __name__ == "__main__":
    main()
