"""``edgevits predict``: the top classes of image files, as a table or one JSON object per image; and the
``--pretrained [TAG]`` option the commands that build a model share."""
from __future__ import annotations

import json
import sys

from .common import add_weights_arguments, model_weights, positive_int, progress_steps, wide_console


def _cmd_predict(args) -> int:
    from ..checkpoint import read_checkpoint
    from ..errors import ConfigError
    from ..registry import create_model
    from ..runtime.classify import Classifier, Prediction, image_files
    name = args.model
    if not name and args.checkpoint:
        name = read_checkpoint(args.checkpoint)[1].get("model")
    if not name:
        raise ConfigError("pass --model NAME (a checkpoint made by edgevits records it; this one does not)")
    files = image_files(args.images)  # a missing path fails before the model is built
    model = create_model(name, **model_weights(args), **({"img_size": args.img_size} if args.img_size else {}))
    console = wide_console()
    if args.backend == "eager":
        clf = Classifier(model, backend="eager", threads=args.threads)
    else:  # exports and checks a graph (seconds): under a progress bar
        with progress_steps(console, f"{args.backend} backend for {name}") as on_step:
            clf = Classifier(model, backend=args.backend, threads=args.threads, progress=on_step)
    results, skipped = [], 0
    for res in clf.predict_files(files, args.topk, args.batch_size):
        if not isinstance(res, Prediction):
            skipped += 1
            print(f"edgevits predict: skipped {res.image}: {res.reason}", file=sys.stderr)
        elif args.json:
            print(json.dumps(res.to_dict()), flush=True)
        else:
            results.append(res)
    if not args.json:
        _print_table(results, clf, name, console)
    if skipped == len(files):
        raise ConfigError(f"none of the {len(files)} files could be read as an image")
    return 0


def _print_table(results, clf, name: str, console) -> None:
    from rich.table import Table
    h, w = clf.config.img_size
    title = (f"{name} ({clf.backend}; {h}x{w}, resize {clf.config.crop_pct:g} crop, {clf.config.interpolation})")
    table = Table(title=title)
    for col in ("image", "#", "class", "probability"):
        table.add_column(col, justify="right" if col in ("#", "probability") else "left")
    for res in results:
        for rank, (index, label, prob) in enumerate(res.top, 1):
            table.add_row(res.image if rank == 1 else "", str(rank), f"{label} ({index})" if not
                          label.startswith("class ") else label, f"{prob:.4f}", end_section=rank == len(res.top))
    console.print(table)


def add_predict(sub) -> None:
    """``edgevits predict IMAGE_OR_DIR... --model NAME [--pretrained [TAG] | --checkpoint PATH] ...``."""
    from ..runtime.classify import PREDICT_BACKENDS
    p = sub.add_parser("predict", help="the top classes of image files (a table, or one JSON object per image)",
                       description="Classify image files (folders: every image under them) with a model's "
                                   "published weights or a checkpoint, preprocessed as the weights were evaluated. "
                                   "Class names: ImageNet-1k's for published weights, the classes a fine-tuned "
                                   "checkpoint records. Files that cannot be decoded are reported and skipped.")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders of them")
    add_weights_arguments(p, "weights to load instead (any supported format, or a run folder: its "
                             "best.safetensors; default: none)", model_option=True)
    p.add_argument("--topk", type=positive_int, default=5, help="classes shown per image")
    p.add_argument("--json", action="store_true", help="print one JSON object per image instead of the table")
    p.add_argument("--backend", choices=PREDICT_BACKENDS, default="eager",
                   help="eager: the PyTorch deploy form; onnxruntime/openvino: an exported graph checked against "
                        "PyTorch; auto: the fastest of them on this machine (edgevits.deploy)")
    p.add_argument("--img-size", type=positive_int, default=None,
                   help="input side in pixels (default: the weights', 224)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per forward pass")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    p.set_defaults(func=_cmd_predict)
