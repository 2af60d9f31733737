"""The files of a run folder: the training state to resume from and metrics.jsonl."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..checkpoint import CheckpointError, atomic_write
from ..checkpoint.io import torch_load_safely


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
    """The training state ``resume_path(path)`` names, read on the CPU (tensors and plain values only)."""
    state = torch_load_safely(resume_path(path), "training state")
    if not isinstance(state, dict) or "config" not in state:
        raise CheckpointError(f"{resume_path(path)} is not a training state written by edgevits train")
    return state


def write_metrics(path: Path, rows: list[dict]) -> None:
    """Write ``rows`` to ``path`` as JSON lines, atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in rows)))


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a metrics.jsonl file."""
    p = Path(path)
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.is_file() else []
