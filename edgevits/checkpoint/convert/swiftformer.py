"""SwiftFormer checkpoints: official (Amshaker/SwiftFormer), timm, Hugging Face transformers, edgevits."""
from __future__ import annotations

import re

from . import Source, StateDict, head_hinter, rename, standard_sources

# timm -> edgevits
_TIMM = [
    (r"^stem\.0\.", "stem.0.conv."), (r"^stem\.1\.", "stem.0.bn."),
    (r"^stem\.3\.", "stem.2.conv."), (r"^stem\.4\.", "stem.2.bn."),
    (r"\.downsample\.proj\.", ".downsample.conv."), (r"\.downsample\.norm\.", ".downsample.bn."),
    (r"\.local_representation\.", ".local."),
    (r"\.dwconv\.", ".dw.conv."), (r"(\.blocks\.\d+|\.local)\.norm\.", r"\1.dw.bn."),
    (r"\.pwconv1\.", ".pw1."), (r"\.pwconv2\.", ".pw2."),
    (r"\.linear\.norm1\.", ".mlp.norm."), (r"\.linear\.fc", ".mlp.fc"),
]


def _official_to_timm(sd: StateDict) -> StateDict:
    out = {}
    for k, v in sd.items():
        k = k.replace("patch_embed.", "stem.").replace("dist_head.", "head_dist.").replace("attn.Proj.", "attn.proj.")
        k = re.sub(r"\.layer_scale(_1|_2)?$", r".layer_scale\1.gamma", k)
        m = re.match(r"^network\.(\d+)\.(.*)", k)
        if m:
            n, rest = int(m.group(1)), m.group(2)
            k = f"stages.{n // 2}.blocks.{rest}" if n % 2 == 0 else f"stages.{n // 2 + 1}.downsample.{rest}"
        out[k] = v
    return out


def _hf_to_official(sd: StateDict) -> StateDict:
    rules = [
        (r"^swiftformer\.patch_embed\.patch_embedding\.", "patch_embed."),
        (r"^swiftformer\.encoder\.network\.(\d+)\.blocks\.", r"network.\1."),
        (r"^swiftformer\.encoder\.network\.", "network."),
        (r"\.depth_wise_conv\.", ".dwconv."), (r"\.point_wise_conv1\.", ".pwconv1."),
        (r"\.point_wise_conv2\.", ".pwconv2."), (r"\.attn\.proj\.", ".attn.Proj."),
    ]
    return rename(sd, rules)


def _timm(sd: StateDict) -> StateDict:
    return rename(sd, _TIMM)


_hints = head_hinter("head.weight", "head_dist.weight")

SOURCES = standard_sources(
    edgevits=lambda sd: "stem.0.conv.weight" in sd, timm_key="stem.0.weight", timm=_timm,
    official=lambda sd: "patch_embed.0.weight" in sd and any(k.startswith("network.") for k in sd),
    official_to_timm=_official_to_timm, hints=_hints) + [
    Source("huggingface", lambda sd: any(k.startswith("swiftformer.") for k in sd),
           lambda sd: _timm(_official_to_timm(_hf_to_official(sd))),
           lambda sd: {**_hints(_official_to_timm(_hf_to_official(sd))), "attention_revision": "legacy"}),
]
