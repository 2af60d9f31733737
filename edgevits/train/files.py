"""The files of a run folder: the training state to resume from and metrics.jsonl."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..checkpoint import atomic_write

_TIMING_KEYS = ("img_per_s", "epoch_time_s", "eval_time_s")


def resume_path(path: str | os.PathLike) -> Path:
    """``OUT``, ``OUT/last.safetensors``, ``OUT/last.json`` or ``OUT/last.state.pt`` -> ``OUT/last.state.pt``."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--resume {str(p)!r}: no such file or folder")
    if p.is_dir():
        p = p / "last.state.pt"
    elif not p.name.endswith(".state.pt"):
        p = p.with_name(p.name.split(".")[0] + ".state.pt")
    if not p.is_file():
        raise FileNotFoundError(f"no training state at {p} (written at the end of every epoch by edgevits train)")
    return p


def load_state(path: str | os.PathLike) -> dict:
    return torch.load(str(resume_path(path)), map_location="cpu", weights_only=True)


def write_metrics(path: Path, rows: list[dict]) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in rows)))


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a metrics.jsonl file."""
    p = Path(path)
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.is_file() else []


def strip_timing(row: dict) -> dict:
    """A metrics row without its wall-clock fields (what must match between a resumed and a straight run)."""
    return {k: v for k, v in row.items() if k not in _TIMING_KEYS}
