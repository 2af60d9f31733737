"""Attention modules. Each works on tokens (B, N, C) unless its docstring says otherwise.

Every token attention has ``forward(x, hw=None)``: ``x`` (B, N, C) tokens, ``hw`` the (H, W) grid they came from
(needed only by the attentions that work on maps or use position biases). ``TokensToMap`` runs any of them on a
(B, C, H, W) map; ``MapToTokens`` runs a map attention on tokens.

``REGISTRY`` maps a short name to a constructor taking ``dim``: the token mixers that can be swapped into
SwiftFormer (``create_model("swiftformer_xs", attention=NAME)``) and that ``edgevits analyze attention`` measures.
"""
from .adapters import MapToTokens, TokensToMap
from .additive import AdditiveAttention
from .attention4d import Attention4D, Attention4DDownsample
from .cascaded import CascadedGroupAttention, LocalWindowAttention
from .mhsa import MHSA
from .separable import SeparableAttention
from .transposed import TransposedAttention, default_heads


def self_attention(dim: int) -> MHSA:
    """Plain multi-head self-attention (SwiftFormer's Figure 2a), O(N^2 C): ``MHSA`` without a bias table, q/k/v
    widths equal to ``dim``, heads of about 32 channels (the largest count <= dim // 32 that divides ``dim``)."""
    heads = default_heads(dim, max(1, dim // 32))
    return MHSA(dim, key_dim=dim // heads, num_heads=heads, attn_ratio=1.0)


def efficientformer_attention(dim: int) -> MHSA:
    """EfficientFormer V1's attention: 8 heads, key_dim 32, values 128 per head, a relative-position bias table
    defined on a 7x7 grid (resized bicubically to the grid ``forward`` receives). O(N^2) time and memory."""
    return MHSA(dim, key_dim=32, num_heads=8, attn_ratio=4.0, resolution=7)


def efficientformerv2_attention(dim: int) -> MapToTokens:
    """EfficientFormerV2's Attention4D (8 heads, key_dim 32, values 128 per head, talking heads, a local value
    branch, a 7x7 bias table resized to the grid) on tokens. O(N^2) time and memory."""
    return MapToTokens(Attention4D(dim, key_dim=32, num_heads=8, attn_ratio=4, resolution=7))


def efficientformerv2_stride_attention(dim: int) -> MapToTokens:
    """EfficientFormerV2's stage-3 "stride attention": Attention4D on the map halved by a dw3x3 s2 conv, upsampled
    back (bilinear). Still O(N^2), on N/4 tokens: 16x fewer attention products."""
    return MapToTokens(Attention4D(dim, key_dim=32, num_heads=8, attn_ratio=4, resolution=7, stride=2))


def _cascaded_args(dim: int) -> dict:
    heads = default_heads(dim, 4)  # EfficientViT: 16-channel keys, values of dim / heads channels
    return dict(key_dim=16, num_heads=heads, attn_ratio=dim / heads / 16, kernels=(5,) * heads)


def cascaded_attention(dim: int) -> MapToTokens:
    """EfficientViT's cascaded group attention over the whole grid, on tokens: up to 4 heads, each on its own
    channel chunk plus the previous head's output. O(N^2) time and memory."""
    return MapToTokens(CascadedGroupAttention(dim, resolution=7, **_cascaded_args(dim)))


def local_window_attention(dim: int) -> MapToTokens:
    """EfficientViT's local window attention (cascaded group attention inside 7x7 windows), on tokens.
    O(N * 49) time: linear in N for a fixed window."""
    return MapToTokens(LocalWindowAttention(dim, resolution=7, window=7, **_cascaded_args(dim)))


REGISTRY = {
    "additive": AdditiveAttention,
    "separable": SeparableAttention,
    "transposed": TransposedAttention,
    "mhsa": self_attention,
    "mhsa_bias": efficientformer_attention,
    "attention4d": efficientformerv2_attention,
    "attention4d_stride": efficientformerv2_stride_attention,
    "cascaded": cascaded_attention,
    "local_window": local_window_attention,
}

__all__ = ["MHSA", "AdditiveAttention", "Attention4D", "Attention4DDownsample", "CascadedGroupAttention",
           "LocalWindowAttention", "MapToTokens", "REGISTRY", "SeparableAttention", "TokensToMap",
           "TransposedAttention", "cascaded_attention", "efficientformer_attention", "efficientformerv2_attention",
           "efficientformerv2_stride_attention", "local_window_attention", "self_attention"]
