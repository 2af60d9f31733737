"""Attention modules. Each works on tokens (B, N, C) unless its docstring says otherwise.

Every token attention has ``forward(x, hw=None)``: ``x`` (B, N, C) tokens, ``hw`` the (H, W) grid they came from
(needed only by the attentions that work on maps or use position biases). ``TokensToMap`` runs any of them on a
(B, C, H, W) map; ``MapToTokens`` runs a map attention on tokens.

``REGISTRY`` maps a short name to a constructor taking ``dim``: the token mixers that can be swapped into
SwiftFormer (``create_model("swiftformer_xs", attention=NAME)``) and that ``edgevits analyze attention`` measures.
"""
from .adapters import MapToTokens, TokensToMap
from .additive import AdditiveAttention
from .separable import SeparableAttention
from .transposed import TransposedAttention

REGISTRY = {
    "additive": AdditiveAttention,
    "separable": SeparableAttention,
    "transposed": TransposedAttention,
}

__all__ = ["AdditiveAttention", "MapToTokens", "REGISTRY", "SeparableAttention", "TokensToMap",
           "TransposedAttention"]
