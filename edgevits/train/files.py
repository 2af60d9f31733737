"""The files of a run folder: the training state to resume from, metrics.jsonl, and the checks that keep a run's
files from being overwritten by another run."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..checkpoint import CheckpointError, atomic_write
from ..checkpoint.io import torch_load_safely, writable_folder
from ..errors import ConfigError

RUN_FILES = ("metrics.jsonl", "config.json", "last.state.pt", "last.safetensors", "last.json", "best.safetensors",
             "best.json", "metrics.png")
"""What ``edgevits train`` writes in its output folder: a folder holding any of them holds a run."""

STATE_KEYS = ("config", "model", "optimizer", "epochs_done", "best_top1", "best_epoch", "rng")
"""What a training state holds (``edgevits train`` writes more; resuming needs these)."""


def resume_path(path: str | os.PathLike) -> Path:
    """``OUT``, ``OUT/last.safetensors``, ``OUT/last.json`` or ``OUT/last.state.pt`` -> ``OUT/last.state.pt``."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"--resume {str(p)!r}: no such file or folder; pass the output folder of an "
                              "edgevits train run (or its last.state.pt)")
    if p.is_dir():
        p = p / "last.state.pt"
    elif not p.name.endswith(".state.pt"):
        p = p.with_name(p.name.split(".")[0] + ".state.pt")
    if not p.is_file():
        raise CheckpointError(f"no training state at {p} (written at the end of every epoch by edgevits train): "
                              "pass the output folder of a run that finished at least one epoch")
    return p


def load_state(path: str | os.PathLike) -> dict:
    """The training state ``resume_path(path)`` names, read on the CPU (tensors and plain values only); a file
    that is not one (unreadable, holding Python objects, or lacking what resuming needs) is a ``CheckpointError``."""
    where = resume_path(path)
    state = torch_load_safely(where, "training state")
    missing = [k for k in STATE_KEYS if k not in state] if isinstance(state, dict) else list(STATE_KEYS)
    if missing:
        raise CheckpointError(f"{where} is not a training state written by edgevits train (it lacks "
                              f"{', '.join(missing)}): pass the output folder of an edgevits train run")
    return state


def check_output(output: str | os.PathLike, resume: str | os.PathLike | None = None) -> Path:
    """Raise a ``ConfigError`` unless a run may write into ``output``: a folder (or a path where one can be made)
    that is writable and holds no run, or the folder of the run ``resume`` continues. Writes nothing; returns
    the folder."""
    out = writable_folder(output)
    found = [name for name in RUN_FILES if (out / name).exists()]
    if not found:
        return out
    if resume is not None and resume_path(resume).parent.resolve() == out.resolve():
        return out
    doing = f"resuming {str(resume)!r} into it" if resume is not None else "a new run"
    new = f"--output {next_free_folder(out)}"
    if (out / "last.state.pt").is_file():
        todo = f"continue that run with --resume {out}, or pass a new folder, e.g. {new}"
    else:
        todo = (f"it stopped before finishing an epoch, so --resume {out} has no last.state.pt to continue from: "
                f"pass a new folder, e.g. {new}, or delete those files")
    raise ConfigError(f"--output {str(out)!r} already holds a run ({', '.join(found)}), which {doing} would "
                      f"overwrite: {todo}")


def next_free_folder(out: Path) -> Path:
    """``OUT-2``, ``OUT-3``, ...: the first that does not exist yet."""
    base = out if out.name else out.resolve()
    if not base.name:  # the root folder
        base = base / "run"
    n = 2
    while base.with_name(f"{base.name}-{n}").exists():
        n += 1
    return base.with_name(f"{base.name}-{n}")


def remove_leftovers(out: Path) -> list[Path]:
    """Delete the temporary files an interrupted atomic save of a run file left in ``out``
    (``.<name>.<random>.tmp``, see ``atomic_write``); returns them."""
    leftovers = [p for name in RUN_FILES for p in out.glob(f".{name}.*.tmp") if p.is_file()]
    for p in leftovers:
        p.unlink()
    return leftovers


def write_metrics(path: Path, rows: list[dict]) -> None:
    """Write ``rows`` to ``path`` as JSON lines, atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in rows)))


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a metrics.jsonl file."""
    p = Path(path)
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.is_file() else []
