"""EfficientFormer V1 checkpoints: official (snap-research/EfficientFormer), timm, edgevits.

Official files hold ``{'model': state_dict}`` with keys ``patch_embed.N``, ``network.N`` (stages at even N,
downsamplers at odd N), ``layer_scale_1``, ``token_mixer.qkv`` and ``dist_head``; timm renames them
(``stem.conv1``, ``stages.i.blocks.j``/``stages.i.downsample``, ``ls1.gamma``, ``head_dist``). Both carry the
derived ``attention_bias_idxs`` buffers, which are dropped (edgevits rebuilds the index for the run-time grid).
"""
from __future__ import annotations

import re

from . import StateDict, head_hinter, rename, standard_sources

# timm -> edgevits
_TIMM = [
    (r"^stem\.conv1\.", "stem.0.conv."), (r"^stem\.norm1\.", "stem.0.bn."),
    (r"^stem\.conv2\.", "stem.2.conv."), (r"^stem\.norm2\.", "stem.2.bn."),
    (r"\.downsample\.norm\.", ".downsample.bn."),
    (r"\.token_mixer\.attention_biases$", ".attn.rel_pos.attention_biases"),
    (r"\.token_mixer\.", ".attn."),
]
_DROP = (r"attention_bias_idxs$",)


def _official_key(k: str) -> str:
    """An official key as timm names it. ``network.2i`` is stage i; ``network.2i+1`` is the downsampler of stage
    i+1."""
    k = re.sub(r"^patch_embed\.([0134])\.",
               lambda m: {"0": "stem.conv1.", "1": "stem.norm1.", "3": "stem.conv2.", "4": "stem.norm2."}[m[1]], k)
    m = re.match(r"^network\.(\d+)\.(.*)", k)
    if m:
        n, rest = int(m[1]), m[2]
        k = (f"stages.{n // 2}.blocks.{rest}" if n % 2 == 0
             else f"stages.{n // 2 + 1}.downsample.{rest.replace('proj.', 'conv.', 1)}")
    k = re.sub(r"\.layer_scale_([12])$", r".ls\1.gamma", k)
    return re.sub(r"^dist_head\.", "head_dist.", k)


def _official_to_timm(sd: StateDict) -> StateDict:
    return {_official_key(k): v for k, v in sd.items()}


SOURCES = standard_sources(
    edgevits=lambda sd: "stem.0.conv.weight" in sd, edgevits_convert=lambda sd: rename(sd, [], drop=_DROP),
    timm_key="stem.conv1.weight", timm=lambda sd: rename(sd, _TIMM, drop=_DROP),
    official=lambda sd: "patch_embed.0.weight" in sd and any(k.startswith("network.") for k in sd),
    official_to_timm=_official_to_timm, hints=head_hinter("head.weight", "head_dist.weight"))
