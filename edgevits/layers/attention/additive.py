"""Efficient additive attention (SwiftFormer, ICCV 2023): O(N d), no key-value product, no value matrix."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

REVISIONS = ("current", "legacy")


class AdditiveAttention(nn.Module):
    """Efficient additive attention on tokens (B, N, C) -> (B, N, C).

    q = norm(Wq x), k = norm(Wk x) (L2 over channels); a = (q w_g) / sqrt(D); the token weights a are L2-normalised
    over the tokens (``revision="current"``, the official code since 2023-07-26). The global query g = sum_n a_n q_n
    gates every key, and ``out = final(proj(g * k) + q)``. Cost: O(N D^2) for the Linears, O(N D) for the rest.
    ``hw`` is accepted for the common token interface and unused.

    ``revision="legacy"`` reproduces the first release (and Hugging Face transformers): a softmax over the size-1
    axis, which is constantly 1, so ``w_g`` has no effect and g is the plain sum of the queries. Checkpoints of the
    two revisions are not interchangeable.
    """

    def __init__(self, dim: int, revision: str = "current"):
        super().__init__()
        if revision not in REVISIONS:
            raise ValueError(f"attention revision must be one of {REVISIONS}, got {revision!r}")
        self.revision = revision
        self.scale = dim ** -0.5
        self.to_query = nn.Linear(dim, dim)
        self.to_key = nn.Linear(dim, dim)
        self.w_g = nn.Parameter(torch.randn(dim, 1))
        self.proj = nn.Linear(dim, dim)
        self.final = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, hw: tuple[int, int] | None = None) -> torch.Tensor:
        q = F.normalize(self.to_query(x), dim=-1)  # (B, N, D)
        k = F.normalize(self.to_key(x), dim=-1)
        a = (q @ self.w_g) * self.scale  # (B, N, 1): one weight per token
        a = F.normalize(a, dim=1) if self.revision == "current" else a.softmax(dim=-1)
        g = (a * q).sum(dim=1, keepdim=True)  # (B, 1, D): global query
        return self.final(self.proj(g * k) + q)

    def extra_repr(self) -> str:
        return f"revision={self.revision!r}"
