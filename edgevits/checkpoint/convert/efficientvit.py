"""EfficientViT-MSRA checkpoints: official (microsoft/Cream release files), timm (``efficientvit_msra``), edgevits.

Official keys (``blocks1.0.mixer.m.attn.qkvs.0.c.weight``, ``head.l.weight``) keep each stage's downsample as the
first three entries of ``blocks2``/``blocks3``; timm moves them into ``stages.i.downsample`` (res1, patchmerge,
res2). Both are mapped to edgevits keys here. Derived buffers (``attention_bias_idxs``) are dropped; squeeze-excite
weights stored 2-D by old files are reshaped to the 1x1 convs' 4-D shape.
"""
from __future__ import annotations

import re

from . import StateDict, head_hinter, rename, standard_sources

# timm -> edgevits
_TIMM = [
    (r"^patch_embed\.conv(\d)\.", lambda m: f"stem.{2 * (int(m.group(1)) - 1)}."),
    (r"\.m\.", "."),  # the Residual wrappers
    (r"\.mixer\.attn\.attention_biases$", ".mixer.attn.pos_bias.attention_biases"),
    (r"\.attn\.proj\.1\.", ".attn.proj."),
]
_DROP = (r"attention_bias_idxs$",)


def _official_key(k: str) -> str:
    """An official key as timm names it: the downsample entries of ``blocks{2,3}`` move into
    ``stages.i.downsample``."""
    k = re.sub(r"\.c\.(weight|bias)$", r".conv.\1", k)
    k = re.sub(r"^(head|head_dist)\.l\.", r"\1.linear.", k)
    k = re.sub(r"\.se\.conv_reduce\.", ".se.fc1.", k)
    k = re.sub(r"\.se\.conv_expand\.", ".se.fc2.", k)
    k = re.sub(r"^patch_embed\.(\d)\.", lambda m: f"patch_embed.conv{int(m[1]) // 2 + 1}.", k)
    m = re.match(r"^blocks(\d)\.(\d+)\.(.*)", k)
    if m:
        stage, j, rest = int(m[1]) - 1, int(m[2]), m[3]
        if stage == 0:
            k = f"stages.0.blocks.{j}.{rest}"
        elif j < 3:
            k = f"stages.{stage}.downsample.{('res1', 'patchmerge', 'res2')[j]}.{rest}"
        else:
            k = f"stages.{stage}.blocks.{j - 3}.{rest}"
    return k


def _official_to_timm(sd: StateDict) -> StateDict:
    out = {_official_key(k): v for k, v in sd.items() if not re.search(_DROP[0], k)}
    for k, v in out.items():  # old files store the squeeze-excite weights 2-D: (out, in) -> (out, in, 1, 1)
        if re.search(r"\.se\.fc[12]\.weight$", k) and v.dim() == 2:
            out[k] = v[:, :, None, None]
    return out


SOURCES = standard_sources(
    edgevits=lambda sd: "stem.0.conv.weight" in sd,
    timm_key="patch_embed.conv1.conv.weight", timm=lambda sd: rename(sd, _TIMM, drop=_DROP),
    official=lambda sd: "patch_embed.0.c.weight" in sd or any(k.startswith("blocks1.") for k in sd),
    official_to_timm=_official_to_timm, hints=head_hinter("head.linear.weight", "head_dist.linear.weight"))
