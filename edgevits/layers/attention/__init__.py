"""Attention modules. Each works on tokens (B, N, C) unless its docstring says otherwise.

Every token attention has ``forward(x, hw=None)``: ``x`` (B, N, C) tokens, ``hw`` the (H, W) grid they came from
(needed only by the attentions that work on maps or use position biases). ``TokensToMap`` runs any of them on a
(B, C, H, W) map; ``MapToTokens`` runs a map attention on tokens.

``REGISTRY`` maps a short name to a constructor taking ``dim``: the token mixers that can be swapped into
SwiftFormer (``create_model("swiftformer_xs", attention=NAME)``) and that ``edgevits analyze attention`` measures.
"""
from .adapters import MapToTokens, TokensToMap
from .additive import AdditiveAttention
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


REGISTRY = {
    "additive": AdditiveAttention,
    "separable": SeparableAttention,
    "transposed": TransposedAttention,
    "mhsa": self_attention,
    "mhsa_bias": efficientformer_attention,
}

__all__ = ["MHSA", "AdditiveAttention", "MapToTokens", "REGISTRY", "SeparableAttention", "TokensToMap",
           "TransposedAttention", "efficientformer_attention", "self_attention"]
