"""Attention modules. Each works on tokens (B, N, C) unless its docstring says otherwise.

``REGISTRY`` maps a short name to a constructor taking ``dim``: the token mixers that can be swapped into
SwiftFormer (``create_model("swiftformer_xs", attention=NAME)``).
"""
from .additive import AdditiveAttention

REGISTRY = {
    "additive": AdditiveAttention,
}

__all__ = ["AdditiveAttention", "REGISTRY"]
