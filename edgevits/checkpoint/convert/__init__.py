"""Key maps from other code bases' checkpoints to edgevits, one module per family.

Each family module defines ``SOURCES``: a list of ``Source`` objects, tried in order. A source recognises a state
dict from its keys, maps it to edgevits keys, and may say which config settings the checkpoint implies.
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from typing import Callable

import torch

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Source:
    name: str
    detect: Callable[[StateDict], bool]
    convert: Callable[[StateDict], StateDict]
    hints: Callable[[StateDict], dict] = field(default=lambda sd: {})


def rename(sd: StateDict, rules: list[tuple[str, str]], drop: tuple[str, ...] = ()) -> StateDict:
    """Apply regex ``rules`` (pattern, replacement) in order to every key; drop keys matching any ``drop`` regex."""
    out = {}
    for key, value in sd.items():
        if any(re.search(p, key) for p in drop):
            continue
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def head_hints(sd: StateDict, head_key: str, dist_key: str) -> dict:
    """Class count and distillation head implied by the classifier weights, when they are present."""
    hints = {}
    if head_key in sd:
        hints["num_classes"] = int(sd[head_key].shape[0])
        hints["distillation"] = dist_key in sd
    return hints


def head_hinter(head_key: str, dist_key: str) -> Callable[[StateDict], dict]:
    """``head_hints`` for a family's head keys, as a source's ``hints``."""
    return lambda sd: head_hints(sd, head_key, dist_key)


def standard_sources(*, edgevits: Callable[[StateDict], bool], timm_key: str, timm: Callable[[StateDict], StateDict],
                     official: Callable[[StateDict], bool], official_to_timm: Callable[[StateDict], StateDict],
                     hints: Callable[[StateDict], dict], edgevits_convert: Callable[[StateDict], StateDict] = dict,
                     ) -> list[Source]:
    """The three sources most families have: edgevits' own keys (``edgevits`` detects them), timm's (recognised by
    ``timm_key``, mapped by ``timm``) and the official code's, mapped to timm's keys first (``official_to_timm``)."""
    return [
        Source("edgevits", edgevits, edgevits_convert, hints),
        Source("timm", lambda sd: timm_key in sd, timm, hints),
        Source("official", official, lambda sd: timm(official_to_timm(sd)), lambda sd: hints(official_to_timm(sd))),
    ]


def sources_for(family: str) -> list[Source]:
    """The sources known for ``family``: ``SOURCES`` of the module ``edgevits.checkpoint.convert.<family>``."""
    if not family.isidentifier():
        return []
    try:
        module = importlib.import_module(f"{__name__}.{family}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{family}":
            raise
        return []
    return module.SOURCES


def detect_source(family: str, sd: StateDict) -> Source | None:
    for source in sources_for(family):
        if source.detect(sd):
            return source
    return None
