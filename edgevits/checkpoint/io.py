"""Checkpoint files: safe reading (safetensors, or ``torch.load(weights_only=True)``: nothing is unpickled beyond
tensors and plain values), atomic writing, and edgevits' own format (safetensors with its metadata in the header and
a JSON beside it)."""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError

META_KEY = "edgevits"
StateDict = dict[str, torch.Tensor]


def read_file(path: Path) -> tuple[dict, dict]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"could not read safetensors checkpoint {str(path)!r}: {e}") from e
        info = json.loads(meta[META_KEY]) if META_KEY in meta else {}
        return sd, info
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        msg = str(e).split("\n")[0]
        raise CheckpointError(
            f"could not read checkpoint {str(path)!r} safely (weights only): {msg}. If it is a trusted file that "
            "stores other Python objects, re-save just its state dict.") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(obj).__name__}, not a state dict")
    return obj, {}


def _config_dict(model: nn.Module) -> dict:
    cfg = getattr(model, "config", None)
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else {}


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``, so a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is owner-only: give it the mode an ordinary open would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(model: nn.Module | None, path: str | os.PathLike, extra: dict[str, Any] | None = None,
                    state_dict: StateDict | None = None) -> Path:
    """Write ``model``'s weights (or ``state_dict``) to ``path`` as safetensors, atomically, with metadata
    (model name, config, attention revision, and ``extra``) in the file header and in a ``.json`` beside it."""
    from safetensors.torch import save_file
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    sd = state_dict if state_dict is not None else model.state_dict()
    sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    config = _config_dict(model) if model is not None else {}
    meta = {"model": getattr(model, "model_name", ""), "family": getattr(model, "family", ""), "config": config,
            "attention_revision": config.get("attention_revision"), "format_version": 1, **(extra or {})}
    text = json.dumps(meta, default=str)
    atomic_write(path, lambda tmp: save_file(sd, tmp, metadata={META_KEY: text}))
    atomic_write(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2, default=str)))
    return path
