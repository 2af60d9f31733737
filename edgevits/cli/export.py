"""``edgevits export``: ONNX, OpenVINO, ExecuTorch, LiteRT or Core ML, checked against PyTorch where this machine
can run the format."""
from __future__ import annotations

from .common import add_weights_arguments, model_weights, positive_int

_CHECKED = {"onnx": "dynamic batch, checked against PyTorch at batch 1 and 3 with ONNX Runtime",
            "openvino": "dynamic batch, checked against PyTorch at batch 1 and 3 with OpenVINO",
            "executorch": "XNNPACK delegate, batch {batch}, checked against PyTorch with ExecuTorch's runtime",
            "litert": "batch {batch}, checked against PyTorch with the LiteRT interpreter"}


def _cmd_export(args) -> int:
    from ..registry import create_model
    from ..runtime.export import GRAPH_FORMS, SUFFIX, export
    from ..runtime.settings import num_threads
    if args.format in ("onnx", "openvino") and args.batch_size != 1:
        raise ValueError(f"--batch-size: {args.format} graphs keep a dynamic batch axis; the option is for "
                         "executorch, litert and coreml, whose graphs have a fixed batch")
    coreml_only = [flag for flag, given in (("--precision", args.precision), ("--target", args.target),
                                             ("--image-input", args.image_input)) if given]
    if coreml_only and args.format != "coreml":
        raise ValueError(f"{', '.join(coreml_only)}: Core ML options (--format coreml)")
    overrides = {"img_size": args.img_size} if args.img_size else {}
    model = create_model(args.model, **model_weights(args), **overrides)
    out = args.output or f"{args.model}{SUFFIX[args.format]}"
    kwargs = {"img_size": args.img_size}
    if args.format in ("executorch", "litert", "coreml"):
        kwargs["batch_size"] = args.batch_size
    if args.format == "coreml":
        from ..checkpoint.preprocess import data_config
        pre = data_config(model)  # the weights' own normalisation (for --image-input)
        kwargs.update(precision=args.precision or "float16", target=args.target or "iOS16",
                      image_input=bool(args.image_input), mean=tuple(pre.mean), std=tuple(pre.std))
    with num_threads(args.threads):
        result = export(model, out, format=args.format, form=args.form, **kwargs)
    form = args.form or GRAPH_FORMS[args.format]
    if args.format == "coreml":
        path, report = result
        ops = ", ".join(f"{op} {n}" for op, n in sorted(report["ops"].items()))
        print(f"wrote {path} ({form} form, {report['precision']}, {report['target']}, input "
              f"{report['input']} {tuple(report['input_shape'])}, output logits)\n"
              f"checked: the package loads, every op is on edgevits' list for {report['target']} ({ops})\n"
              "NOT checked: numerical parity (Core ML does not run on this operating system; run it on a Mac or "
              "an iPhone)")
        return 0
    print(f"wrote {result} ({form} form, {_CHECKED[args.format].format(batch=args.batch_size)})")
    return 0


def add_export(sub) -> None:
    """``edgevits export ...``."""
    p = sub.add_parser("export", help="export to ONNX, OpenVINO, ExecuTorch, LiteRT or Core ML, checked against "
                                      "PyTorch")
    p.add_argument("model", help="a registered model name (edgevits models lists them)")
    p.add_argument("--format", choices=["onnx", "openvino", "executorch", "litert", "coreml"], default="onnx",
                   help="file format (executorch, litert and coreml need the extra: pip install 'edgevits[mobile]')")
    p.add_argument("--form", choices=["deploy", "eval", "graph"], default=None,
                   help="graph to export: the deploy form (fuse_model), the eval-mode model, or the graph form "
                        "(eval form with the attention-bias tables as constants for the input size); default: "
                        "the one the runtime runs fastest (onnx: deploy, openvino: eval, executorch/litert/coreml: "
                        "graph)")
    add_weights_arguments(p, "weights to load (any supported format, or a run folder: its best.safetensors; "
                             "default: none, random weights)")
    p.add_argument("--img-size", type=positive_int, default=None,
                   help="input size baked into the graph (default: the model's, 224)")
    p.add_argument("--batch-size", type=positive_int, default=1,
                   help="batch size of executorch, litert and coreml graphs, which is fixed (onnx and openvino "
                        "graphs take any batch)")
    p.add_argument("--precision", choices=["float16", "float32"], default=None,
                   help="Core ML compute precision (default: float16)")
    p.add_argument("--target", choices=["iOS15", "iOS16", "iOS17", "iOS18"], default=None,
                   help="Core ML minimum deployment target (default: iOS16)")
    p.add_argument("--image-input", action="store_true", default=None,
                   help="Core ML: take an RGB image of 0-255 pixels and normalise it inside the model with the "
                        "weights' mean and std (default: a normalised float tensor x)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads for the export and its check "
                                                             "(default: torch's)")
    p.add_argument("--output", "-o", default=None,
                   help="output path (default: MODEL.onnx / .xml / .pte / .tflite / .mlpackage)")
    p.set_defaults(func=_cmd_export)
