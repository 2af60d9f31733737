"""Efficient additive attention (SwiftFormer, ICCV 2023): O(N d), no key-value product, no value matrix."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import FusedLinear
from ..misc import DeployModule

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

    def extra_repr(self) -> str:
        return f"revision={self.revision!r}"

    def forward(self, x: torch.Tensor, hw: tuple[int, int] | None = None) -> torch.Tensor:
        if hasattr(self, "ones") and self.revision == "current":
            return self._forward_matmuls(x)
        q = F.normalize(self.to_query(x), dim=-1)  # (B, N, D)
        k = F.normalize(self.to_key(x), dim=-1)
        a = (q @ self.w_g) * self.scale  # (B, N, 1): one weight per token
        a = F.normalize(a, dim=1) if self.revision == "current" else a.softmax(dim=-1)
        g = (a * q).sum(dim=1, keepdim=True)  # (B, 1, D): global query
        return self.final(self.proj(g * k) + q)

    def use_matmul_reductions(self) -> None:
        """Compute the L2 norms and the token sum as matrix products from now on (x*x @ ones, a^T a, a^T q): the
        same arithmetic in another order. The graph export form (``runtime.export.graph_form``) does this on its
        copy: graph runtimes' delegates take matmuls but not F.normalize's pow/sum/expand (ExecuTorch's XNNPACK
        delegate left those out and cut SwiftFormer-XS into 22 partitions)."""
        self.register_buffer("ones", torch.ones_like(self.w_g), persistent=False)

    def _forward_matmuls(self, x: torch.Tensor) -> torch.Tensor:
        def unit_rows(t):  # F.normalize(t, dim=-1): t / max(||t||, 1e-12)
            return t / ((t * t) @ self.ones).sqrt().clamp_min(1e-12)
        q, k = unit_rows(self.to_query(x)), unit_rows(self.to_key(x))
        a = (q @ self.w_g) * self.scale  # (B, N, 1)
        at = a.transpose(1, 2)  # (B, 1, N)
        a = a / torch.bmm(at, a).sqrt().clamp_min(1e-12)  # F.normalize over the tokens
        g = torch.bmm(a.transpose(1, 2), q)  # (B, 1, D)
        return self.final(self.proj(g * k) + q)

    @torch.no_grad()
    def fuse(self) -> "AdditiveAttentionDeploy":
        return AdditiveAttentionDeploy(self)


class AdditiveAttentionDeploy(DeployModule, nn.Module):
    """Inference form of ``AdditiveAttention``, same outputs: the query and key Linears run as one matmul, the
    1/sqrt(D) scale is folded into ``w_g``, the global query is one batched matmul over the tokens, and the Linears
    are ``FusedLinear`` (``forward(x, hw, residual)`` adds a residual inside the last one)."""

    def __init__(self, src: AdditiveAttention):
        super().__init__()
        self.revision = src.revision
        dim = src.w_g.shape[0]
        self.qk = FusedLinear(dim, 2 * dim, device=src.w_g.device, dtype=src.w_g.dtype)
        self.qk.weight.copy_(torch.cat([src.to_query.weight, src.to_key.weight]))
        self.qk.bias.copy_(torch.cat([src.to_query.bias, src.to_key.bias]))
        self.register_buffer("w_g", (src.w_g * src.scale).detach().clone())
        self.proj, self.final = FusedLinear.from_linear(src.proj), FusedLinear.from_linear(src.final)

    def forward(self, x: torch.Tensor, hw: tuple[int, int] | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        q, k = self.qk(x).chunk(2, dim=-1)  # (B, N, D) each
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        if self.revision == "current":
            a = F.normalize(q @ self.w_g, dim=1)  # (B, N, 1)
            g = a.transpose(1, 2) @ q  # (B, 1, D)
        else:  # the legacy softmax over a size-1 axis is exactly 1: g is the plain sum of the queries
            g = q.sum(dim=1, keepdim=True)
        return self.final(self.proj(g * k, residual=q), residual=residual)
