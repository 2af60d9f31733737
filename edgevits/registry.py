"""Model registry: every variant is a name bound to a model class and a frozen config, read from the ``VARIANTS``
table of each family module in ``edgevits.models``."""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .checkpoint import config_hints, load_checkpoint, read_checkpoint
from .checkpoint.preprocess import DataConfig
from .checkpoint.weights import get_weights, imagenet_classes, pretrained_file
from .errors import ConfigError, UnknownModelError
from .models import FAMILY_MODULES


@dataclass(frozen=True)
class ModelEntry:
    """A registered variant: how to build it and what its paper published about it."""

    name: str
    family: str
    model_cls: type
    config: Any
    published: dict = field(default_factory=dict)  # params_m, gmacs, top1, latency_ms, latency_device
    timm_name: str | None = None


_REGISTRY: dict[str, ModelEntry] = {}
_BUILTINS_LOADED = False


def register_model(name: str, model_cls: type, config: Any, *, family: str, published: dict | None = None,
                   timm_name: str | None = None) -> None:
    """Register ``name`` next to the built-in variants; a name registered twice (a built-in one included) is a
    programming error and raises."""
    _ensure_loaded()
    _add(ModelEntry(name, family, model_cls, config, dict(published or {}), timm_name))


def _add(entry: ModelEntry) -> None:
    if entry.name in _REGISTRY:
        raise ValueError(f"model {entry.name!r} is already registered")
    if not dataclasses.is_dataclass(entry.config):
        raise TypeError("a model config must be a dataclass instance")
    _REGISTRY[entry.name] = entry


def _ensure_loaded() -> None:
    """Register the variants of every family module (``MODEL`` and ``VARIANTS``) once, before anything else."""
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    for module in FAMILY_MODULES:
        for name, variant in module.VARIANTS.items():
            _add(ModelEntry(name, module.MODEL.family, module.MODEL, variant.config, dict(variant.published),
                            variant.timm_name or name))


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, optionally filtered by a shell-style pattern (``"swiftformer_*"``)."""
    _ensure_loaded()
    names = sorted(_REGISTRY)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def get_entry(name: str) -> ModelEntry:
    """The registry entry for ``name``; an unknown name raises a KeyError that suggests close names."""
    _ensure_loaded()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=4, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known models: {', '.join(sorted(_REGISTRY))}"
        raise UnknownModelError(f"unknown model {name!r}{hint}")
    return _REGISTRY[name]


def resolve_config(name: str, **overrides: Any):
    """The variant's config with ``overrides`` applied; an unknown field raises a TypeError naming the valid ones."""
    entry = get_entry(name)
    fields = {f.name for f in dataclasses.fields(entry.config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        msgs = []
        for key in unknown:
            close = difflib.get_close_matches(key, fields, n=3, cutoff=0.6)
            msgs.append(f"{key!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise ConfigError(f"{name} has no config field {', '.join(msgs)}; valid fields: {', '.join(sorted(fields))}")
    return dataclasses.replace(entry.config, **overrides)


def create_model(name: str, *, checkpoint: Any = None, pretrained: bool | str = False, **overrides: Any) -> nn.Module:
    """Build a registered model.

    Args:
        name: a name from ``list_models()``.
        checkpoint: optional path (``.pth``/``.pt``/``.safetensors``) or state dict to load. Official, timm,
            Hugging Face and edgevits formats are recognised from the keys. Settings implied by the checkpoint
            (class count, distillation head, attention revision) are applied unless given in ``overrides``.
        pretrained: ``True`` (the default published weights: timm's hub repo) or a tag of
            ``edgevits.checkpoint.weights.list_weights(name)`` (``"official"``, ...): found in
            ``$EDGEVITS_CACHE/weights/`` when placed there by hand, else downloaded and checked (see
            ``pretrained_file``), then loaded as ``checkpoint`` is. Not together with ``checkpoint``.
        **overrides: config fields to change (e.g. ``num_classes=10``, ``img_size=256``).

    The model records what it was given: ``model.pretrained_tag``, ``model.data_config`` (the preprocessing of
    the published weights, or the one an edgevits checkpoint stored; see ``edgevits.data_config``) and
    ``model.class_names`` (ImageNet-1k names for published weights, the checkpoint's classes, else None).
    """
    entry = get_entry(name)
    source = _pretrained_source(name, pretrained, checkpoint, overrides)
    if source is not None:
        checkpoint = pretrained_file(source)
    state, meta = None, {}
    if checkpoint is not None:
        state, meta = read_checkpoint(checkpoint)
        implied = {"attention_revision": source.attention_revision} if source and source.attention_revision else {}
        overrides = {**implied, **config_hints(entry, state, meta), **overrides}
    config = resolve_config(name, **overrides)
    model = entry.model_cls(config)
    model.model_name = name
    if state is not None:
        load_checkpoint(model, state, meta=meta)
    _record_origin(model, source, meta)
    return model


def _pretrained_source(name: str, pretrained, checkpoint, overrides: dict):
    """The ``WeightsSource`` ``pretrained`` asks for (None when it is False), refusing ``checkpoint`` beside it and
    an ``attention_revision`` override the weights were not made with."""
    if pretrained is False or pretrained is None:
        return None
    if checkpoint is not None:
        raise ConfigError(f"{name}: pass pretrained= or checkpoint=, not both (pretrained loads published weights, "
                          "checkpoint a file of your own)")
    if not isinstance(pretrained, (bool, str)):
        raise ConfigError(f"pretrained must be True or a weights tag (a str), got {pretrained!r}")
    source = get_weights(name, pretrained)
    asked = overrides.get("attention_revision")
    if source.attention_revision and asked and asked != source.attention_revision:
        raise ConfigError(f"{name} weights {source.tag!r} were made with attention_revision="
                          f"{source.attention_revision!r}, not {asked!r}: leave attention_revision out")
    return source


def _record_origin(model: nn.Module, source, meta: dict) -> None:
    """Attach ``pretrained_tag``, ``data_config`` and ``class_names`` (see ``create_model``)."""
    n = getattr(model, "num_classes", None)
    model.pretrained_tag = source.tag if source is not None else None
    model.data_config = None
    names = None
    if source is not None:
        model.data_config = source.preprocess.with_size(model.config.img_size)
        names = imagenet_classes()
    elif meta.get("data_config"):
        model.data_config = DataConfig.from_dict(meta["data_config"]).with_size(model.config.img_size)
    if meta.get("classes"):
        names = list(meta["classes"])
    model.class_names = names if names is not None and len(names) == n else None
