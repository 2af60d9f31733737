"""``edgevits export``: ONNX or OpenVINO, checked against PyTorch."""
from __future__ import annotations


def _cmd_export(args) -> int:
    from ..registry import create_model
    from ..runtime.export import GRAPH_FORMS, export
    overrides = {"img_size": args.img_size} if args.img_size else {}
    model = create_model(args.model, checkpoint=args.checkpoint, **overrides)
    out = args.output or f"{args.model}.{'onnx' if args.format == 'onnx' else 'xml'}"
    path = export(model, out, format=args.format, form=args.form, img_size=args.img_size)
    form = args.form or GRAPH_FORMS[args.format]
    print(f"wrote {path} ({form} form, dynamic batch, checked against PyTorch at batch 1 and 3)")
    return 0


def add_export(sub) -> None:
    p = sub.add_parser("export", help="export to ONNX or OpenVINO, checked against PyTorch")
    p.add_argument("model")
    p.add_argument("--format", choices=["onnx", "openvino"], default="onnx")
    p.add_argument("--form", choices=["deploy", "eval"], default=None,
                   help="graph to export: the deploy form (fuse_model) or the eval-mode model; default: the one "
                        "the runtime runs fastest (ONNX: deploy, OpenVINO: eval, which it optimises itself)")
    p.add_argument("--checkpoint", default=None, help="weights to load (any supported format)")
    p.add_argument("--img-size", type=int, default=None, help="input size baked into the graph (default 224)")
    p.add_argument("--output", "-o", default=None, help="output file (default: MODEL.onnx / MODEL.xml)")
    p.set_defaults(func=_cmd_export)
