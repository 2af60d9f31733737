"""EfficientViT-MSRA checkpoints: official (microsoft/Cream release files), timm (``efficientvit_msra``), edgevits.

Official keys (``blocks1.0.mixer.m.attn.qkvs.0.c.weight``, ``head.l.weight``) keep each stage's downsample as the
first three entries of ``blocks2``/``blocks3``; timm moves them into ``stages.i.downsample`` (res1, patchmerge,
res2). Both are mapped to edgevits keys here. Derived buffers (``attention_bias_idxs``) are dropped; squeeze-excite
weights stored 2-D by old files are reshaped to the 1x1 convs' 4-D shape.
"""
from __future__ import annotations

import re

from . import Source, StateDict, head_hints, rename

# timm -> edgevits
_TIMM = [
    (r"^patch_embed\.conv(\d)\.", lambda m: f"stem.{2 * (int(m.group(1)) - 1)}."),
    (r"\.m\.", "."),  # the Residual wrappers
    (r"\.mixer\.attn\.attention_biases$", ".mixer.attn.pos_bias.attention_biases"),
    (r"\.attn\.proj\.1\.", ".attn.proj."),
]
_DROP = (r"attention_bias_idxs$",)


def _official_to_timm(sd: StateDict) -> StateDict:
    """Official keys -> timm keys: the downsample entries of ``blocks{2,3}`` move into ``stages.i.downsample``."""
    out = {}
    for k, v in sd.items():
        if re.search(_DROP[0], k):
            continue
        k = re.sub(r"\.c\.(weight|bias)$", r".conv.\1", k)
        k = re.sub(r"^(head|head_dist)\.l\.", r"\1.linear.", k)
        k = re.sub(r"\.se\.conv_reduce\.", ".se.fc1.", k)
        k = re.sub(r"\.se\.conv_expand\.", ".se.fc2.", k)
        m = re.match(r"^patch_embed\.(\d)\.(.*)", k)
        if m:
            k = f"patch_embed.conv{int(m.group(1)) // 2 + 1}.{m.group(2)}"
        m = re.match(r"^blocks(\d)\.(\d+)\.(.*)", k)
        if m:
            stage, j, rest = int(m.group(1)) - 1, int(m.group(2)), m.group(3)
            if stage == 0:
                k = f"stages.0.blocks.{j}.{rest}"
            elif j < 3:
                k = f"stages.{stage}.downsample.{('res1', 'patchmerge', 'res2')[j]}.{rest}"
            else:
                k = f"stages.{stage}.blocks.{j - 3}.{rest}"
        if re.search(r"\.se\.fc[12]\.weight$", k) and v.dim() == 2:  # old files: (out, in) -> (out, in, 1, 1)
            v = v[:, :, None, None]
        out[k] = v
    return out


def _timm(sd: StateDict) -> StateDict:
    return rename(sd, _TIMM, drop=_DROP)


def _hints(sd: StateDict) -> dict:
    return head_hints(sd, "head.linear.weight", "head_dist.linear.weight")


def _is_official(sd: StateDict) -> bool:
    return "patch_embed.0.c.weight" in sd or any(k.startswith("blocks1.") for k in sd)


SOURCES = [
    Source("edgevits", lambda sd: "stem.0.conv.weight" in sd, lambda sd: dict(sd), _hints),
    Source("timm", lambda sd: "patch_embed.conv1.conv.weight" in sd, _timm, _hints),
    Source("official", _is_official, lambda sd: _timm(_official_to_timm(sd)),
           lambda sd: _hints(_official_to_timm(sd))),
]
