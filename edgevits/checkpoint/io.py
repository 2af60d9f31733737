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

from ..errors import CheckpointError, ConfigError

META_KEY = "edgevits"
StateDict = dict[str, torch.Tensor]


RESAVE_HINT = ("re-save its weights where it was made: torch.save(model.state_dict(), 'weights.pth') or "
               "edgevits.save_checkpoint(model, 'weights.safetensors')")


def checkpoint_path(path: str | os.PathLike, what: str = "checkpoint") -> Path:
    """The weights file ``path`` names: a run folder gives its ``best.safetensors``; a missing file, a folder
    without one, or the ``.json`` sidecar of an edgevits file (which holds no weights) is a ``CheckpointError``
    that says what to pass instead."""
    p = Path(path)
    if p.is_dir():
        best = p / "best.safetensors"
        if not best.is_file():
            raise CheckpointError(f"{what} {str(p)!r} is a folder without best.safetensors (a folder written by "
                                  "edgevits train has one); pass a weights file")
        return best
    if not p.is_file():
        raise CheckpointError(f"{what} {str(p)!r} does not exist")
    if p.suffix == ".json":
        twin = p.with_suffix(".safetensors")
        where = f"its weights are in {str(twin)!r}: pass that" if twin.is_file() else "pass the weights file"
        raise CheckpointError(f"{what} {str(p)!r} is a metadata sidecar, not weights; {where}")
    return p


def torch_load_safely(path: Path, what: str = "checkpoint") -> Any:
    """``torch.load`` restricted to tensors and plain values (``weights_only=True``), with errors in our words: a
    file holding other Python objects is refused without being unpickled (nothing in it runs), a truncated or
    foreign file is named as such."""
    import pickle
    import re
    import warnings
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.findall(r"GLOBAL ([\w.]+)", str(e))
        if "Weights only load failed" in str(e) and (found or _is_pickle(path)):
            holds = f"a Python object ({found[0]})" if found else "Python objects"
            raise CheckpointError(
                f"{what} {str(path)!r} was not loaded: it holds {holds} other than tensors and plain values, and it "
                f"was not unpickled, since unpickling can run any code. If you trust the file, {RESAVE_HINT}") from None
        raise CheckpointError(f"{what} {str(path)!r} could not be read: it is truncated, corrupt or not a PyTorch "
                              "file") from None
    except Exception as e:  # noqa: BLE001  (torch raises OSError, EOFError, RuntimeError, KeyError... for bad files)
        detail = str(e).splitlines()[0] if str(e) else "the file ends early"
        raise CheckpointError(f"{what} {str(path)!r} could not be read: it is truncated, corrupt or not a PyTorch "
                              f"file ({type(e).__name__}: {detail[:200]})") from None


def _is_pickle(path: Path) -> bool:
    """A zip archive (PyTorch's format) or a file opening with a pickle protocol marker."""
    import zipfile
    with open(path, "rb") as f:
        return zipfile.is_zipfile(f) or f.seek(0) == 0 and f.read(1) == b"\x80"


def read_file(path: str | os.PathLike, what: str = "checkpoint") -> tuple[dict, dict]:
    """``(contents, edgevits metadata)`` of a checkpoint file (``checkpoint_path`` resolves folders), read safely:
    safetensors, or ``torch_load_safely``."""
    path = checkpoint_path(path, what)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                sd = {k: f.get_tensor(k) for k in f.keys()}
            info = json.loads(meta[META_KEY]) if META_KEY in meta else {}
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{what} {str(path)!r} could not be read: it is truncated or not a safetensors "
                                  f"file ({e})") from None
        return sd, info
    obj = torch_load_safely(path, what)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what} {str(path)!r} holds a {type(obj).__name__}, not a state dict")
    return obj, {}


def writable_folder(path: str | os.PathLike, flag: str = "--output") -> Path:
    """``path`` as a folder output: a ``ConfigError`` naming ``flag`` when it is a file, lies under a file, or cannot
    be created or written (its nearest existing folder must be writable). Creates nothing."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} {str(out)!r} is an existing file, not a folder: pass a folder (it is created "
                          "when missing)")
    _check_creatable(out, flag)
    return out


def writable_file(path: str | os.PathLike, flag: str = "--output") -> Path:
    """``path`` as a file output: a ``ConfigError`` naming ``flag`` when it is a folder, lies under a file, or its
    folder cannot be created or written. Creates nothing."""
    out = Path(path)
    if out.is_dir():
        raise ConfigError(f"{flag} {str(out)!r} is a folder: pass a file path, e.g. {str(out / 'model')!r} with "
                          "the format's extension")
    _check_creatable(out.parent if str(out.parent) else Path("."), flag, shown=out)
    return out


def _check_creatable(folder: Path, flag: str, shown: Path | None = None) -> None:
    shown = folder if shown is None else shown
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{flag} {str(shown)!r} cannot be created: {str(existing)!r} is a file, not a folder; "
                          "pass a path under a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {str(shown)!r} cannot be written: {str(existing)!r} is not writable; pass a "
                          "path you can write to")


def cache_dir(*parts: str) -> Path:
    """edgevits' cache folder (``$EDGEVITS_CACHE``, else ``~/.cache/edgevits``) joined with ``parts``, created."""
    root = Path(os.environ.get("EDGEVITS_CACHE") or Path.home() / ".cache" / "edgevits")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


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
    (model name, config, attention revision, the preprocessing and class names ``create_model`` recorded on the
    model, and ``extra``) in the file header and in a ``.json`` beside it."""
    from safetensors.torch import save_file
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    sd = state_dict if state_dict is not None else model.state_dict()
    sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    config = _config_dict(model) if model is not None else {}
    meta = {"model": getattr(model, "model_name", ""), "family": getattr(model, "family", ""), "config": config,
            "attention_revision": config.get("attention_revision"), "format_version": 1}
    preprocess, names = getattr(model, "data_config", None), getattr(model, "class_names", None)
    if preprocess is not None:  # what create_model recorded: the published weights' or a checkpoint's
        meta["data_config"] = preprocess.to_dict()
    if names:
        meta["classes"] = list(names)
    meta.update(extra or {})
    text = json.dumps(meta, default=str)
    atomic_write(path, lambda tmp: save_file(sd, tmp, metadata={META_KEY: text}))
    atomic_write(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2, default=str)))
    return path
