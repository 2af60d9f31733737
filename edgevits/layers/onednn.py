"""oneDNN's fused GEMM kernels for the eager deploy forms on CPU.

PyTorch's x86 (and most ARM) builds ship oneDNN linear kernels with an epilogue: ``gelu(x W^T + b)`` or
``x W^T + b + residual`` in one pass over the output, on a weight pre-packed into oneDNN's blocked layout. They
have no autograd and are invisible to exporters, compilers and FLOP counters, so ``FusedLinear`` uses them only
for plain float32 CPU inference in eager mode and runs ordinary ops everywhere else (same results to float32
rounding).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _probe() -> tuple[bool, bool]:
    """(fused kernels work, weight pre-packing works) on this build."""
    try:
        op = torch.ops.mkldnn._linear_pointwise
        x, w = torch.ones(2, 4), torch.ones(3, 4)
        ok = torch.allclose(op(x, w, None, "gelu", [], "none"), F.gelu(x @ w.t()))
        ok = ok and torch.allclose(op.binary(x, torch.ones(2, 3), w, None, "add"), x @ w.t() + 1)
    except Exception:  # noqa: BLE001  (absent op, a build without oneDNN, ...)
        return False, False
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w)
        return ok, ok and torch.allclose(op(x, packed, None, "none", [], "none"), x @ w.t())
    except Exception:  # noqa: BLE001
        return ok, False


ONEDNN_LINEAR, ONEDNN_PACK = _probe()


def _dispatch_mode_active() -> bool:
    """A Python dispatch mode (FLOP counting, fake tensors, make_fx tracing) is watching the ops."""
    try:
        from torch.utils._python_dispatch import _get_current_dispatch_mode
        return _get_current_dispatch_mode() is not None
    except ImportError:  # pragma: no cover  (private helper moved): assume watched, use the plain ops
        return True


def fused_kernels_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Plain float32 CPU inference in eager mode, nobody tracing, exporting, compiling or counting."""
    return (ONEDNN_LINEAR and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and not torch.jit.is_tracing() and not torch.jit.is_scripting() and not torch.compiler.is_compiling()
            and not getattr(torch.compiler, "is_exporting", lambda: False)()
            and not torch.onnx.is_in_onnx_export() and not _dispatch_mode_active())


class FusedLinear(nn.Linear):
    """A Linear whose call can fuse a GELU or a residual add: ``self(x, act="gelu")``, ``self(x, residual=r)``.

    The oneDNN-packed weight is an opaque tensor that can be neither saved nor deep-copied: it lives outside the
    state dict in a cache that is dropped on copy/pickle/``.to()`` and rebuilt whenever the weight changes (keyed
    on its version counter and storage, so an in-place edit is honoured).
    """

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> "FusedLinear":
        out = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  device=linear.weight.device, dtype=linear.weight.dtype)
        out.weight.copy_(linear.weight)
        if linear.bias is not None:
            out.bias.copy_(linear.bias)
        return out

    @classmethod
    @torch.no_grad()
    def from_conv1x1(cls, conv: nn.Conv2d) -> "FusedLinear":
        from .conv import conv1x1_to_linear
        return cls.from_linear(conv1x1_to_linear(conv))

    def _packed(self) -> torch.Tensor:
        w = self.weight
        if not ONEDNN_PACK or w.is_inference():  # an inference tensor has no version counter to key a cache on
            return w
        stamp = (w._version, w.data_ptr())
        hit = self.__dict__.get("_onednn_packed")
        if hit is None or hit[0] != stamp:
            with torch.no_grad():
                hit = (stamp, torch.ops.mkldnn._reorder_linear_weight(w.detach()))
            self.__dict__["_onednn_packed"] = hit
        return hit[1]

    def forward(self, x: torch.Tensor, act: str | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
        if act not in (None, "gelu") or (act and residual is not None):
            raise ValueError("FusedLinear fuses either act='gelu' or a residual, not both")
        if fused_kernels_usable(x, self.weight):
            op = torch.ops.mkldnn._linear_pointwise
            if residual is not None:
                return op.binary(x, residual, self._packed(), self.bias, "add")
            return op(x, self._packed(), self.bias, act or "none", [], "none")
        y = F.linear(x, self.weight, self.bias)
        if act == "gelu":
            return F.gelu(y)
        return y if residual is None else y + residual

    def __getstate__(self):
        state = dict(super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__)
        state.pop("_onednn_packed", None)
        return state

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_onednn_packed", None)
        return super()._apply(fn, recurse)
