"""Pictures of a run and of an evaluation (PNG files): ``metrics.png`` beside a run's metrics.jsonl, and the
confusion matrix ``edgevits eval --confusion`` draws. Drawn with matplotlib's object-oriented API (``Figure``), which
renders without pyplot and leaves the process-wide backend alone; written atomically."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..checkpoint import atomic_write
from ..errors import DataError
from .files import read_metrics

METRICS_PLOT = "metrics.png"
"""The name of the picture ``plot_metrics`` writes into a run folder."""

_NUMBERS_UP_TO = 20  # a confusion matrix of at most this many classes has its counts written in the cells
_LABELS_UP_TO = 100  # ... of more than this many, only every k-th class is named on the axes


def _save(fig, path: Path, dpi: int) -> Path:
    """Write ``fig`` to ``path`` as a PNG, atomically (the temporary name has no extension: the format is given)."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    return path


def _run_title(run: Path, rows: list[dict], best: dict) -> str:
    """``model on data: best val top-1 at epoch e of n``, with what the run's config.json says (when it is there)."""
    try:
        config = json.loads((run / "config.json").read_text()).get("config") or {}
    except (OSError, ValueError, AttributeError):
        config = {}
    epochs = config.get("epochs") or rows[-1]["epoch"]
    what = ""
    if config.get("model") and config.get("data"):
        what = f"{config['model']} on {Path(config['data']).name or config['data']}: "
    return (f"{what}best val top-1 {best['val_top1']:.1%} at epoch {best['epoch']} "
            f"({rows[-1]['epoch']} of {epochs} epochs done)")


def plot_metrics(run: str | os.PathLike) -> Path:
    """Draw a run folder's metrics.jsonl into ``metrics.png`` beside it and return its path: the training (and
    validation) loss, validation top-1 / top-5 (and the raw weights' top-1 when EMA is on), and the learning rate at
    the end of each epoch, against the epoch; the best epoch (highest val top-1, the one best.safetensors holds) is
    marked in every panel. A folder without metrics rows is a ``DataError``."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
    run = Path(run)
    rows = read_metrics(run / "metrics.jsonl")
    if not rows:
        raise DataError(f"{run / 'metrics.jsonl'} holds no epochs: pass the output folder of an edgevits train run "
                        "that finished at least one epoch")
    epochs = [r["epoch"] for r in rows]
    best = max(rows, key=lambda r: r["val_top1"])  # the first of equals, as the run chooses best.safetensors
    style = {"marker": "o", "markersize": 3} if len(rows) <= 60 else {}
    fig = Figure(figsize=(14, 4.2))
    loss_ax, acc_ax, lr_ax = fig.subplots(1, 3)
    _series(loss_ax, epochs, rows, {"train_loss": "train", "val_loss": "val"}, style)
    top1 = "val top-1 (EMA weights)" if rows[-1].get("weights") == "ema" else "val top-1"
    _series(acc_ax, epochs, rows, {"val_top1": top1, "val_top5": "val top-5",
                                   "val_top1_raw": "val top-1, raw weights (not EMA)"}, style, scale=100)
    acc_ax.plot([best["epoch"]], [100 * best["val_top1"]], marker="*", markersize=12, color="tab:red",
                linestyle="none", label=f"best top-1: {best['val_top1']:.1%}")
    _series(lr_ax, epochs, rows, {"lr": "learning rate"}, style)
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for ax, title, ylabel in ((loss_ax, "loss", "cross-entropy"), (acc_ax, "validation accuracy", "accuracy (%)"),
                              (lr_ax, "learning rate (end of epoch)", "learning rate")):
        ax.axvline(best["epoch"], color="tab:red", linestyle=":", linewidth=1, label=f"best epoch ({best['epoch']})")
        ax.set(title=title, xlabel="epoch", ylabel=ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(_run_title(run, rows, best), fontsize=11)
    fig.tight_layout()
    return _save(fig, run / METRICS_PLOT, dpi=100)


def _series(ax, epochs: list[int], rows: list[dict], names: dict[str, str], style: dict, scale: float = 1) -> None:
    """One line per ``names`` key the rows hold (a row without it leaves a gap), labelled with its value."""
    for key, label in names.items():
        if any(key in r for r in rows):
            values = [scale * r[key] if r.get(key) is not None else np.nan for r in rows]
            ax.plot(epochs, values, label=label, linestyle="--" if key.endswith("_raw") else "-", **style)


def plot_confusion(confusion, classes: list[str], path: str | os.PathLike, title: str | None = None) -> Path:
    """Draw a confusion matrix (``confusion[t][p]``: images of true class ``t`` predicted as ``p``) as a PNG at
    ``path`` and return it: true classes down, predicted across, coloured by the fraction of each true class's
    images (so classes of any size compare; on a square-root scale, so that a few stray images still show), with
    the counts written in the cells when there are at most 20 classes; every class is named up to 100 classes,
    every k-th beyond. The figure grows with the class count (up to 22 inches at 100 dpi)."""
    from matplotlib.colors import PowerNorm
    from matplotlib.figure import Figure
    counts = np.asarray(confusion, dtype=np.int64)
    n = len(classes)
    if counts.shape != (n, n):
        raise DataError(f"a confusion matrix of {n} classes must be {n}x{n}, got {counts.shape}")
    images = counts.sum(axis=1, keepdims=True)
    fractions = counts / np.maximum(images, 1)
    side = float(np.clip(3.5 + 0.2 * n, 6, 22))
    fig = Figure(figsize=(side + 1.5, side))
    ax = fig.subplots()
    norm = PowerNorm(gamma=0.5, vmin=0, vmax=1)
    shown = ax.imshow(fractions, cmap="Blues", norm=norm, interpolation="nearest")
    fig.colorbar(shown, ax=ax, fraction=0.046, shrink=0.8 if n > 40 else 1.0, pad=0.03,
                 label="fraction of the true class's images")
    step = max(1, -(-n // _LABELS_UP_TO))
    ticks = np.arange(0, n, step)
    size = 10 if n <= 12 else (8 if n <= 40 else 7)
    ax.set_xticks(ticks, [classes[i] for i in ticks], rotation=90, fontsize=size)
    ax.set_yticks(ticks, [classes[i] for i in ticks], fontsize=size)
    big = 11 if n <= 40 else 15  # titles and axis names, on a page of up to 22 inches
    ax.set_xlabel("predicted class", fontsize=big)
    ax.set_ylabel("true class", fontsize=big)
    if n <= _NUMBERS_UP_TO:
        for t, p in np.ndindex(n, n):
            if counts[t, p]:
                ax.text(p, t, str(counts[t, p]), ha="center", va="center", fontsize=size,
                        color="white" if norm(fractions[t, p]) > 0.6 else "black")
    correct = int(np.trace(counts))
    total = int(counts.sum())
    ax.set_title(title or f"confusion matrix: {total} images, {correct} correct ({correct / max(total, 1):.1%})",
                 fontsize=big + 1)
    fig.tight_layout()
    return _save(fig, Path(path), dpi=100)
