"""EfficientFormerV2 checkpoints: edgevits, timm (``efficientformerv2_*``) and official snap-research files
(``eformer_{s0,s1,s2,l}_450.pth``, ``{'model': ...}`` with official keys).

Derived buffers (``attention_bias_idxs``, which the official files store) are dropped: edgevits computes the
gather index itself for every input size. Layer scales are stored as (dim, 1, 1) as in the official files; timm
stores them flat and they are reshaped here.
"""
from __future__ import annotations

import re

from . import Source, StateDict, head_hints, rename

_DERIVED = (r"\.attention_bias_idxs$",)

# timm -> edgevits
_TIMM = [
    (r"^stem\.conv1\.", "stem.0."), (r"^stem\.conv2\.", "stem.2."),
    (r"\.ls1\.gamma$", ".layer_scale_1.gamma"), (r"\.ls2\.gamma$", ".layer_scale_2.gamma"),
    (r"\.attention_biases$", ".pos_bias.attention_biases"),
]

# official -> edgevits, applied in order (block-level renames after the network.* positions are resolved)
_OFFICIAL = [
    (r"^patch_embed\.0\.", "stem.0.conv."), (r"^patch_embed\.1\.", "stem.0.bn."),
    (r"^patch_embed\.3\.", "stem.2.conv."), (r"^patch_embed\.4\.", "stem.2.bn."),
    (r"^dist_head\.", "head_dist."),
    # downsampling embeddings (network.1, .3: proj + norm; network.5: conv + bn + attn)
    (r"^network\.([135])\.(proj|conv)\.", r"network.\1.downsample.conv.conv."),
    (r"^network\.([135])\.(norm|bn)\.", r"network.\1.downsample.conv.bn."),
    (r"^network\.([135])\.attn\.", r"network.\1.downsample.attn."),
    # the unified FFN
    (r"\.mlp\.fc1\.", ".mlp.fc1.conv."), (r"\.mlp\.norm1\.", ".mlp.fc1.bn."),
    (r"\.mlp\.mid\.", ".mlp.mid.conv."), (r"\.mlp\.mid_norm\.", ".mlp.mid.bn."),
    (r"\.mlp\.fc2\.", ".mlp.fc2.conv."), (r"\.mlp\.norm2\.", ".mlp.fc2.bn."),
    (r"\.layer_scale_([12])$", r".layer_scale_\1.gamma"),
    # attentions: nn.Sequential(conv, bn) -> ConvNorm; proj = Sequential(act, conv, bn)
    (r"\.q\.local\.0\.", ".q.local."), (r"\.q\.proj\.0\.", ".q.proj.conv."), (r"\.q\.proj\.1\.", ".q.proj.bn."),
    (r"\.(q|k|v|v_local|stride_conv)\.0\.", r".\1.conv."), (r"\.(q|k|v|v_local|stride_conv)\.1\.", r".\1.bn."),
    (r"\.proj\.1\.", ".proj.conv."), (r"\.proj\.2\.", ".proj.bn."),
    (r"\.attention_biases$", ".pos_bias.attention_biases"),
]


def _network_to_stages(key: str) -> str:
    """network.{2s}.{j}.* -> stages.s.blocks.j.*; network.{2s-1}.downsample.* -> stages.s.downsample.*"""
    m = re.match(r"^network\.(\d+)\.(.*)", key)
    if not m:
        return key
    n, rest = int(m.group(1)), m.group(2)
    if n % 2 == 0:
        return f"stages.{n // 2}.blocks.{rest}"
    return f"stages.{n // 2 + 1}.{rest}"


def _official(sd: StateDict) -> StateDict:
    return {_network_to_stages(k): v for k, v in rename(sd, _OFFICIAL, drop=_DERIVED).items()}


def _timm(sd: StateDict) -> StateDict:
    out = rename(sd, _TIMM, drop=_DERIVED)
    for key, value in out.items():
        if key.endswith((".layer_scale_1.gamma", ".layer_scale_2.gamma")) and value.dim() == 1:
            out[key] = value.reshape(-1, 1, 1)
    return out


def _edgevits(sd: StateDict) -> StateDict:
    return {k: v for k, v in sd.items() if not any(re.search(p, k) for p in _DERIVED)}


SOURCES = [
    Source("edgevits", lambda sd: "stem.0.conv.weight" in sd and any(".mlp.fc1.conv." in k for k in sd),
           _edgevits, lambda sd: head_hints(sd, "head.weight", "head_dist.weight")),
    Source("timm", lambda sd: "stem.conv1.conv.weight" in sd, _timm,
           lambda sd: head_hints(sd, "head.weight", "head_dist.weight")),
    Source("official", lambda sd: "patch_embed.0.weight" in sd and any(".mlp.norm1." in k for k in sd),
           _official, lambda sd: head_hints(sd, "head.weight", "dist_head.weight")),
]
