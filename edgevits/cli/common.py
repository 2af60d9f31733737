"""Pieces every command shares."""
from __future__ import annotations

import argparse
import contextlib


def csv_of(kind):
    """An argparse type for comma-separated values of ``kind``: ``"1,16"`` -> ``(1, 16)``."""
    def parse(text: str):
        return tuple(kind(v) for v in text.split(",") if v.strip())
    parse.__name__ = f"comma-separated {kind.__name__}"  # argparse names it in its error: "invalid ... value"
    return parse


def _number(kind, lowest, text: str):
    def parse(value: str):
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {text}, got {value!r}") from None
        if not number >= lowest or number != number:
            raise argparse.ArgumentTypeError(f"expected {text}, got {value!r}")
        return number
    parse.__name__ = text
    return parse


positive_int = _number(int, 1, "a whole number >= 1")
count = _number(int, 0, "a whole number >= 0")
positive_float = _number(float, 1e-300, "a number > 0")


@contextlib.contextmanager
def progress_steps(console, description: str):
    """A transient progress bar on ``console``; yields ``on_step(done, total, label)`` for the library to call."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task(description, total=1)

        def on_step(done: int, total: int, label: str) -> None:
            progress.update(task, total=total, completed=done, description=label)
        yield on_step


def wide_console(width: int = 120):
    """A rich console at least ``width`` columns wide (tables stay readable when piped)."""
    from rich.console import Console
    return Console(width=max(Console().width, width))


def add_pretrained_argument(p) -> None:
    """``--pretrained [TAG]``: the model's published weights (alone: the default, timm's hub repo)."""
    p.add_argument("--pretrained", nargs="?", const=True, default=None, metavar="TAG",
                   help="load the model's published weights: alone for the default (timm's hub repo), or a tag (the "
                        "README's Pretrained weights table lists them); downloaded once and cached (HF_ENDPOINT, "
                        "HF_HUB_OFFLINE and $EDGEVITS_CACHE/weights/ are honoured) (default: none)")


def model_weights(args) -> dict:
    """``create_model``'s weight arguments from ``--pretrained`` / ``--checkpoint``."""
    return {"pretrained": args.pretrained or False, "checkpoint": args.checkpoint}


def add_weights_arguments(p, checkpoint_help: str, model_option: bool = False) -> None:
    """``--pretrained [TAG]`` and ``--checkpoint PATH`` (and ``--model NAME`` where the model may come from the
    checkpoint): where a command's weights come from."""
    if model_option:
        p.add_argument("--model", default=None,
                       help="a registered model name; when not given, the one the checkpoint records")
    add_pretrained_argument(p)
    p.add_argument("--checkpoint", default=None, help=checkpoint_help)
