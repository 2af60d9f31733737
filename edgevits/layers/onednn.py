"""oneDNN's fused kernels for the eager deploy forms on CPU.

PyTorch's x86 (and most ARM) builds ship oneDNN linear and convolution kernels with an epilogue (a GELU or a
residual add applied while the output is written), on weights pre-packed into oneDNN's blocked layout: the kernels
``torch.compile`` uses on CPU. They have no autograd and are invisible to exporters, compilers and FLOP counters,
so ``FusedLinear`` and ``FusedConv`` use them only for plain float32 CPU inference in eager mode and run ordinary
ops everywhere else (same results to float32 rounding).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .misc import gelu_, tensor_stamp


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
        stamp = tensor_stamp(w)
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


def _conv_probe() -> bool:
    """Whether this build's oneDNN convolution with post-ops (and weight pre-packing) works."""
    try:
        op = torch.ops.mkldnn._convolution_pointwise
        x = torch.ones(1, 2, 3, 3).contiguous(memory_format=torch.channels_last)
        w = torch.ones(2, 2, 1, 1)
        packed = torch.ops.mkldnn._reorder_convolution_weight(w, [0, 0], [1, 1], [1, 1], 1, list(x.shape))
        ref = F.conv2d(x, w)
        ok = torch.allclose(op(x, packed, None, [0, 0], [1, 1], [1, 1], 1, "gelu", [], "none"), F.gelu(ref))
        return ok and torch.allclose(op.binary(x, ref, packed, None, [0, 0], [1, 1], [1, 1], 1, "add", 1.0, None,
                                               [], None), 2 * ref)
    except Exception:  # noqa: BLE001  (absent op, a build without oneDNN, ...)
        return False


ONEDNN_CONV = _conv_probe()


class FusedConv(nn.Module):
    """Deploy-form ``act(conv(x) + residual)`` (residual and act optional, act is None or exact GELU).

    On CPU, for float32 channels-last maps in plain eager inference (``layers.onednn.fused_kernels_usable``: no
    autograd, tracing, export, compiling or FLOP counting), this is one oneDNN convolution on a pre-packed weight
    with the GELU or the sum as a post-op (the kernels ``torch.compile`` uses on CPU): the output map is written
    once instead of being re-read by separate passes. oneDNN takes no GELU after a sum; that GELU runs in place.
    Anywhere else the same computation runs as ordinary ops. ``conv`` keeps the weights; the packed copy is an
    opaque tensor kept outside the state dict, dropped on copy/pickle/``.to()`` and rebuilt when the weight
    changes (keyed on its storage and version counter) or the input shape does.
    """

    def __init__(self, conv: nn.Conv2d, act: str | None = None):
        super().__init__()
        if act not in (None, "gelu"):
            raise ValueError(f"FusedConv supports act=None or 'gelu', got {act!r}")
        self.conv = conv
        self.act = act
        self._geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)

    def _onednn_ok(self, x: torch.Tensor, residual: torch.Tensor | None) -> bool:
        if not ONEDNN_CONV or not fused_kernels_usable(x, self.conv.weight):
            return False
        if residual is not None and (residual.requires_grad and torch.is_grad_enabled()):
            return False
        cl = torch.channels_last
        return x.is_contiguous(memory_format=cl) and (residual is None or residual.is_contiguous(memory_format=cl))

    def _packed_weight(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        w = c.weight
        if w.is_inference():  # no version counter to key a cache on: oneDNN reorders it per call
            return w
        key = (tensor_stamp(w), x.shape)
        cached = self.__dict__.get("_onednn_packed")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                packed = torch.ops.mkldnn._reorder_convolution_weight(w.detach(), *self._geometry[:3],
                                                                      c.groups, list(x.shape))
            cached = (key, packed)
            self.__dict__["_onednn_packed"] = cached
        return cached[1]

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        c = self.conv
        if self._onednn_ok(x, residual):
            op = torch.ops.mkldnn._convolution_pointwise
            args = (self._packed_weight(x), c.bias, *self._geometry)
            if residual is None:  # algorithm "none": the exact (erf) GELU
                return op(x, *args, self.act or "none", [], "none" if self.act else None)
            y = op.binary(x, residual, *args, "add", 1.0, None, [], None)
            return gelu_(y) if self.act else y
        y = c(x)
        if residual is not None:
            y = y + residual
        if self.act:
            y = gelu_(y)
        return y

    def __getstate__(self):  # deepcopy/pickle: leave the opaque packed weight behind, it is rebuilt on demand
        state = self.__dict__.copy()
        state.pop("_onednn_packed", None)
        return state

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_onednn_packed", None)
        return super()._apply(fn, recurse)

    def fuse(self) -> "FusedConv":
        return self

    def extra_repr(self) -> str:
        return f"act={self.act}"
