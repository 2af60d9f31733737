"""``edgevits export``: ONNX or OpenVINO, checked against PyTorch."""
from __future__ import annotations

from .common import add_weights_arguments, model_weights, positive_int


def _cmd_export(args) -> int:
    from ..registry import create_model
    from ..runtime.export import GRAPH_FORMS, export
    from ..runtime.settings import num_threads
    overrides = {"img_size": args.img_size} if args.img_size else {}
    model = create_model(args.model, **model_weights(args), **overrides)
    out = args.output or f"{args.model}.{'onnx' if args.format == 'onnx' else 'xml'}"
    with num_threads(args.threads):
        path = export(model, out, format=args.format, form=args.form, img_size=args.img_size)
    form = args.form or GRAPH_FORMS[args.format]
    print(f"wrote {path} ({form} form, dynamic batch, checked against PyTorch at batch 1 and 3)")
    return 0


def add_export(sub) -> None:
    """``edgevits export ...``."""
    p = sub.add_parser("export", help="export to ONNX or OpenVINO, checked against PyTorch")
    p.add_argument("model", help="a registered model name (edgevits models lists them)")
    p.add_argument("--format", choices=["onnx", "openvino"], default="onnx", help="file format")
    p.add_argument("--form", choices=["deploy", "eval"], default=None,
                   help="graph to export: the deploy form (fuse_model) or the eval-mode model; default: the one "
                        "the runtime runs fastest (ONNX: deploy, OpenVINO: eval, which it optimises itself)")
    add_weights_arguments(p, "weights to load (any supported format, or a run folder: its best.safetensors; "
                             "default: none, random weights)")
    p.add_argument("--img-size", type=positive_int, default=None,
                   help="input size baked into the graph (default: the model's, 224)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads for the export and its check "
                                                             "(default: torch's)")
    p.add_argument("--output", "-o", default=None, help="output file (default: MODEL.onnx / MODEL.xml)")
    p.set_defaults(func=_cmd_export)
