"""Recognising, checking and loading checkpoints of any known source into a model."""
from __future__ import annotations

import dataclasses
import os
import warnings

import torch
from torch import nn

from ..errors import CheckpointError
from ..layers import adapt_bias_tables
from .convert import StateDict, detect_source, sources_for
from .io import read_file

_WRAPPERS = ("model_ema", "state_dict_ema", "model", "state_dict", "module")


def _unwrap(obj: dict) -> tuple[StateDict, str | None]:
    """Find the state dict inside a training checkpoint ({'model': ...}, {'state_dict': ...}); strip 'module.'.
    Returns it and the wrapper key it came from (None for a plain state dict). A file holding both EMA and raw
    weights gives the EMA ones (what the papers evaluate), with a warning saying how to take the raw ones."""
    wrapper = None
    for key in _WRAPPERS:
        if isinstance(obj.get(key), dict) and obj[key] and all(torch.is_tensor(v) for v in obj[key].values()):
            others = [k for k in _WRAPPERS if k != key and isinstance(obj.get(k), dict) and obj[k]]
            if key.endswith("_ema") and others:
                warnings.warn(f"checkpoint holds {key!r} and {others[0]!r} weights: loading {key!r} (pass "
                              f"checkpoint[{others[0]!r}] to load the other)", stacklevel=3)
            obj, wrapper = obj[key], key
            break
    sd = {k: v for k, v in obj.items() if torch.is_tensor(v)}
    if not sd:
        raise CheckpointError(f"no tensors found in checkpoint (top-level keys: {sorted(obj)[:10]})")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd, wrapper


def read_checkpoint(src: str | os.PathLike | dict) -> tuple[StateDict, dict]:
    """Return ``(state_dict, metadata)`` from a path or an in-memory dict: an edgevits file's saved metadata, and
    for a training checkpoint ``{"wrapper": key}``, the key its weights were found under ({} otherwise)."""
    obj, meta = ({}, {}) if isinstance(src, dict) else read_file(src)
    sd, wrapper = _unwrap(src if isinstance(src, dict) else obj)
    return sd, ({**meta, "wrapper": wrapper} if wrapper else meta)


def config_hints(entry, sd: StateDict, meta: dict) -> dict:
    """Config settings a checkpoint implies for ``entry`` (a registry entry): its own saved config for edgevits
    files, else what the keys reveal (class count, distillation head, Hugging Face's legacy attention)."""
    if meta.get("model") and meta["model"] != entry.name:
        raise CheckpointError(f"checkpoint was saved from {meta['model']!r}, not {entry.name!r}")
    if meta.get("config"):
        valid = {f.name for f in dataclasses.fields(entry.config)}
        return {k: _as_tuples(v) for k, v in meta["config"].items() if k in valid}
    source = detect_source(entry.family, sd)
    return source.hints(sd) if source else {}


# Config fields that may differ between a checkpoint's saved config and the model loading it: they change no
# output of the trained weights (training-only settings, the head, which the shape check covers, and the training
# resolution, to which bias tables are resized).
_FREE_FIELDS = {"num_classes", "distillation", "img_size", "drop_rate", "drop_path_rate", "features_only",
                "layer_scale_init"}


def _check_settings(model: nn.Module, sd: StateDict, meta: dict) -> None:
    """Refuse a checkpoint made for other settings that change outputs without changing any shape (SwiftFormer's
    attention revision, V1's pool size...): from an edgevits file's saved config, or what a foreign file's keys
    imply (a Hugging Face SwiftFormer is the legacy revision)."""
    config = getattr(model, "config", None)
    if not dataclasses.is_dataclass(config):
        return
    saved = dict(meta.get("config") or {})
    source = detect_source(getattr(model, "family", ""), sd)
    implied = {**(source.hints(sd) if source else {}), **saved}
    for f in dataclasses.fields(config):
        if f.name in _FREE_FIELDS or f.name not in implied:
            continue
        want, have = _as_tuples(implied[f.name]), getattr(config, f.name)
        if want != have:
            raise CheckpointError(
                f"checkpoint was made with {f.name}={want!r} but the model was built with {have!r}; build it with "
                f"create_model(..., {f.name}={want!r}) or pass the checkpoint to create_model, which does so")


def _as_tuples(value):
    """JSON turns the config's tuples into lists; turn them back (nested too) for comparison."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _drop_absent_head(model: nn.Module, sd: StateDict, own: StateDict) -> list[str]:
    """Remove from ``sd`` (in place) the classifier weights of a model built without a classifier and, for a
    ``features_only`` backbone, the final norm's; returns the keys removed."""
    prefixes = []
    if getattr(model, "num_classes", None) == 0:
        prefixes += ["head.", "head_dist."]
    if getattr(getattr(model, "config", None), "features_only", False):
        prefixes.append("norm.")
    ignored = [k for k in sd if k not in own and k.startswith(tuple(prefixes))] if prefixes else []
    for k in ignored:
        del sd[k]
    return ignored


def convert_state_dict(model: nn.Module, sd: StateDict) -> tuple[StateDict, str]:
    """Map ``sd`` (any recognised format) to ``model``'s keys; returns the mapped dict and the source's name."""
    family = getattr(model, "family", "")
    source = detect_source(family, sd)
    if source is None:
        names = ", ".join(s.name for s in sources_for(family)) or "none"
        raise CheckpointError(f"checkpoint keys match no known {family or 'model'} format (tried: {names}); "
                              f"first keys: {list(sd)[:6]}")
    return source.convert(sd), source.name


def load_checkpoint(model: nn.Module, src: str | os.PathLike | dict, strict: bool = True,
                    meta: dict | None = None) -> dict:
    """Load weights from a path or state dict into ``model``, whatever its source format.

    Attention-bias tables stored at another resolution are resized to the model's. Raises ``CheckpointError``
    listing missing keys, unexpected keys and shape clashes (all of them, not just the first). Returns a report
    ``{"source": ..., "resized": [...], "missing": [...], "unexpected": [...], "ignored": [...], "wrapper": ...}``
    (``wrapper``: the key of a training checkpoint the weights came from, such as ``"model"`` or
    ``"model_ema"``). A model without a classifier (``num_classes=0``) or a ``features_only`` backbone takes a
    classification checkpoint: the head (and, for a backbone, the final norm) weights it has no place for are
    ignored and listed. ``meta``: the metadata of a state dict already read with ``read_checkpoint`` (its checks
    then apply as if the file were passed).
    """
    sd, read_meta = read_checkpoint(src)
    meta = {**read_meta, **(meta or {})}
    name = getattr(model, "model_name", "")
    if meta.get("model") and name and meta["model"] != name:
        raise CheckpointError(f"checkpoint was saved from {meta['model']!r}, but the model is {name!r}")
    _check_settings(model, sd, meta)
    sd, source = convert_state_dict(model, sd)
    resized = adapt_bias_tables(model, sd)
    own = model.state_dict()
    ignored = _drop_absent_head(model, sd, own)
    missing = [k for k in own if k not in sd]  # in model order, so the first lines point at the first layers
    unexpected = [k for k in sd if k not in own]
    clashes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
               for k in own if k in sd and sd[k].shape != own[k].shape]
    if clashes or (strict and (missing or unexpected)):
        lines = [f"checkpoint ({source} format) does not fit {name or type(model).__name__}:"]
        for title, items in (("shape clashes", clashes), ("missing keys", missing), ("unexpected keys", unexpected)):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                lines.append(f"  {title} ({len(items)}): " + "; ".join(shown))
        if clashes:
            lines.append("  (a checkpoint of another variant or class count? pass num_classes=..., or build the "
                         "variant it was saved from)")
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(sd, strict=strict)
    return {"source": source, "resized": resized, "missing": missing, "unexpected": unexpected, "ignored": ignored,
            "wrapper": meta.get("wrapper")}


