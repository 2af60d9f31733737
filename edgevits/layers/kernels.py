"""The CPU kernels of the eager deploy forms: oneDNN's fused kernels and MKL's addmm.

PyTorch's x86 (and most ARM) builds ship oneDNN linear and convolution kernels with an epilogue (a GELU or a
residual add applied while the output is written), on weights pre-packed into oneDNN's blocked layout: the kernels
``torch.compile`` uses on CPU. They have no autograd and are invisible to exporters, compilers and FLOP counters,
so ``FusedLinear`` and ``FusedConv`` use them (and, for matrix products, ``addmm`` on a cached transposed weight,
which at batch 1 costs far less per call) only for plain float32 CPU inference in eager mode, and run ordinary ops
everywhere else (same results to float32 rounding).
"""
from __future__ import annotations

import contextlib
import functools
import threading

import torch
import torch.nn.functional as F
from torch import nn

from .misc import DeployModule, gelu_, tensor_stamp

ACTS = (None, "gelu", "relu")


def fusable_act(act: nn.Module) -> str | None:
    """The name under which the fused layers apply ``act`` (``"gelu"`` for the exact GELU, ``"relu"``), or None
    for an activation they cannot fuse (which then runs as its own module)."""
    if type(act) is nn.GELU and act.approximate == "none":
        return "gelu"
    return "relu" if type(act) is nn.ReLU else None


# The probes' tensors: float32 on the CPU whatever default dtype or device is in force at first use (the answer is
# cached for the process).
_PROBE = dict(dtype=torch.float32, device="cpu")


@functools.cache
def linear_probe() -> tuple[bool, bool]:
    """(oneDNN's fused linear kernels work, weight pre-packing works) on this build; probed on first use, not at
    import (``import edgevits`` runs no kernel)."""
    try:
        op = torch.ops.mkldnn._linear_pointwise
        x, w = torch.ones(2, 4, **_PROBE), torch.ones(3, 4, **_PROBE)
        ok = torch.allclose(op(x, w, None, "gelu", [], "none"), F.gelu(x @ w.t()))
        ok = ok and torch.allclose(op.binary(x, torch.ones(2, 3, **_PROBE), w, None, "add"), x @ w.t() + 1)
    except Exception:  # noqa: BLE001  (absent op, a build without oneDNN, ...)
        return False, False
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w)
        return ok, ok and torch.allclose(op(x, packed, None, "none", [], "none"), x @ w.t())
    except Exception:  # noqa: BLE001
        return ok, False


def _dispatch_mode_active() -> bool:
    """A Python dispatch mode (FLOP counting, fake tensors, make_fx tracing) is watching the ops."""
    try:
        from torch.utils._python_dispatch import _get_current_dispatch_mode
        return _get_current_dispatch_mode() is not None
    except ImportError:  # pragma: no cover  (private helper moved): assume watched, use the plain ops
        return True


_F32 = torch.float32
_local = threading.local()


def _watched() -> bool:
    """Somebody is tracing, scripting, exporting or counting the ops (global state, the same for a whole pass)."""
    return (torch.jit.is_tracing() or torch.jit.is_scripting()
            or getattr(torch.compiler, "is_exporting", lambda: False)()
            or torch.onnx.is_in_onnx_export() or _dispatch_mode_active())


def fused_kernels_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Plain float32 CPU inference in eager mode, nobody tracing, exporting, compiling or counting.

    The operands' own conditions are checked on every call; the global ones (``_watched``) only outside a
    ``fused_scope``, which has made them once for the whole pass."""
    return (x.dtype is _F32 and weight.dtype is _F32 and x.is_cpu
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and not torch.compiler.is_compiling()  # per call: a part of the model may be compiled inside a scope
            and (getattr(_local, "depth", 0) > 0 or not _watched()) and linear_probe()[0])


@contextlib.contextmanager
def fused_scope():
    """Run the enclosed forward pass with the global checks of ``fused_kernels_usable`` made once.

    A deploy model's ``forward`` enters this around its whole pass. While it is active on this thread (and only if
    nobody is tracing, exporting, compiling or counting when it is entered), ``FusedConv`` and ``FusedLinear`` look
    only at their own operands (dtype, device, whether the input or weight needs a gradient). The global checks
    cost 5-7 us per layer, which measured 7% of EfficientFormerV2-S0's batch-1 latency on one thread.
    """
    if torch.compiler.is_compiling() or _watched() or not linear_probe()[0]:
        yield
        return
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1


# A layer with a GELU on more output values than this runs oneDNN's kernel with the GELU fused; below it (and
# always without a GELU) MKL's addmm with the GELU as a separate in-place pass, which costs about 2 us per call
# where a oneDNN call costs 15-25 us before any arithmetic (batch 1 on CPU; measured on EfficientFormerV2-S0 and
# L1 as 5-6% and 3% of the whole forward pass).
GEMM_GELU_MAX = 1 << 18


_CACHE = "_onednn_packed"  # the attribute of a kernel cache's owner that holds it


class KernelCache:
    """Mixed into a module that keeps kernels' copies of its weights (``_prepared``, ``gemm_rows``): the copies
    stay out of deep copies and pickles (an opaque oneDNN tensor can be neither) and are dropped when ``.to()`` /
    ``.half()`` move the weights; the next call rebuilds them."""

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop(_CACHE, None)
        return state

    def _apply(self, fn, recurse=True):
        self.__dict__.pop(_CACHE, None)
        return super()._apply(fn, recurse)


def _prepared(owner: nn.Module, w: torch.Tensor, kind: str, prepare, extra=None) -> torch.Tensor:
    """``prepare(w)``, a kernel's own copy of a weight (``kind``: "gemm" transposed, "onednn" packed), cached on
    ``owner`` outside its state dict, one entry per kind, keyed on the weight's storage and version counter (so
    in-place edits are honoured) and on ``extra``; the cache is dropped on copy, pickle and ``.to()``."""
    if w.is_inference():  # no version counter to key a cache on: prepared per call
        return prepare(w)
    key = (tensor_stamp(w), extra)
    cache = owner.__dict__.setdefault(_CACHE, {})
    hit = cache.get(kind)
    if hit is None or hit[0] != key:
        with torch.no_grad():
            hit = cache[kind] = (key, prepare(w.detach()))
    return hit[1]


def _gemm(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None, act: str | None,
          residual: torch.Tensor | None) -> torch.Tensor:
    """``act(x @ weight_t + bias + residual)`` on (rows, features) matrices, MKL's addmm plus in-place passes."""
    if residual is None:
        y = torch.mm(x, weight_t) if bias is None else torch.addmm(bias, x, weight_t)
    else:
        y = torch.addmm(residual, x, weight_t)
        if bias is not None:
            y.add_(bias)
    if act == "gelu":
        return torch.ops.aten.gelu_(y)
    return torch.relu_(y) if act == "relu" else y


def _transposed(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], -1).t().contiguous()


def gemm_rows(owner: nn.Module, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              act: str | None = None, residual: torch.Tensor | None = None, kind: str = "gemm") -> torch.Tensor:
    """A 1x1 conv or Linear (``weight`` (out, in[, 1, 1])) on (rows, in) as MKL's addmm on a transposed copy of the
    weight cached on ``owner`` (under ``kind``: one per weight an owner holds): ``act(rows @ W^T + bias +
    residual)``. The fast path every deploy form's 1x1 convs share; call it only where ``fused_kernels_usable``
    holds (a channels-last map's rows are a view of it)."""
    return _gemm(rows, _prepared(owner, weight, kind, _transposed), bias, act, residual)


def map_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B*H*W, C): a view when ``x`` is stored channels-last."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def rows_map(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B*H*W, C') rows back to a (B, C', H, W) map of ``like``'s size, stored channels-last (a view)."""
    b, _, h, w = like.shape
    return rows.view(b, h, w, -1).permute(0, 3, 1, 2)


def _plain_act(y: torch.Tensor, act: str | None) -> torch.Tensor:
    """``act`` applied with ordinary ops (in place where no gradient or compiler is watching)."""
    if act == "gelu":
        return gelu_(y)
    if act == "relu":
        return torch.relu(y) if (y.requires_grad and torch.is_grad_enabled()) or _watched() else torch.relu_(y)
    return y


class FusedLinear(KernelCache, DeployModule, nn.Linear):
    """A Linear whose call can fuse an activation or a residual add: ``self(x, act="gelu")`` (or ``"relu"``),
    ``self(x, residual=r)``.

    In plain float32 CPU inference it runs ``addmm`` on a transposed copy of the weight (the residual as the
    addend), or, for a GELU on more than ``GEMM_GELU_MAX`` output values, oneDNN's linear with the GELU fused on
    a packed copy (an opaque tensor that can be neither saved nor deep-copied). Either copy lives outside the state
    dict in a cache that is dropped on copy/pickle/``.to()`` and rebuilt whenever the weight changes (keyed on its
    version counter and storage, so an in-place edit is honoured).
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

    def forward(self, x: torch.Tensor, act: str | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
        if act not in ACTS or (act and residual is not None):
            raise ValueError(f"FusedLinear fuses either an activation ({ACTS[1:]}) or a residual, not both")
        out_shape = (*x.shape[:-1], self.out_features)
        if fused_kernels_usable(x, self.weight) and (residual is None or (
                residual.shape == out_shape and residual.dtype is _F32
                and not (residual.requires_grad and torch.is_grad_enabled()))):
            if act != "gelu" or x.numel() // self.in_features * self.out_features <= GEMM_GELU_MAX:
                rows = x.reshape(-1, self.in_features)
                y = gemm_rows(self, rows, self.weight, self.bias, act,
                              None if residual is None else residual.reshape(rows.shape[0], -1))
                return y.view(out_shape)
            packed = _prepared(self, self.weight, "onednn", torch.ops.mkldnn._reorder_linear_weight) \
                if linear_probe()[1] else self.weight
            return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "gelu", [], "none")
        y = F.linear(x, self.weight, self.bias)
        if act:
            return _plain_act(y, act)
        return y if residual is None else y + residual


@functools.cache
def conv_probe() -> bool:
    """Whether this build's oneDNN convolution with post-ops (and weight pre-packing) works (probed on first use)."""
    try:
        op = torch.ops.mkldnn._convolution_pointwise
        x = torch.ones(1, 2, 3, 3, **_PROBE).contiguous(memory_format=torch.channels_last)
        w = torch.ones(2, 2, 1, 1, **_PROBE)
        packed = torch.ops.mkldnn._reorder_convolution_weight(w, [0, 0], [1, 1], [1, 1], 1, list(x.shape))
        ref = F.conv2d(x, w)
        ok = torch.allclose(op(x, packed, None, [0, 0], [1, 1], [1, 1], 1, "gelu", [], "none"), F.gelu(ref))
        return ok and torch.allclose(op.binary(x, ref, packed, None, [0, 0], [1, 1], [1, 1], 1, "add", 1.0, None,
                                               [], None), 2 * ref)
    except Exception:  # noqa: BLE001  (absent op, a build without oneDNN, ...)
        return False


_CL = torch.channels_last


@functools.cache
def _conv_ops():
    """The overloads themselves: resolving them through torch.ops on every call costs microseconds."""
    return torch.ops.mkldnn._convolution_pointwise.default, torch.ops.mkldnn._convolution_pointwise.binary


class FusedConv(KernelCache, DeployModule, nn.Module):
    """Deploy-form ``act(conv(x) + residual)`` (residual and act optional; act None, exact GELU or ReLU).

    On CPU, for float32 channels-last maps in plain eager inference (``fused_kernels_usable``: no
    autograd, tracing, export, compiling or FLOP counting), this runs one of two fast kernels:

    - a 1x1 conv (stride 1, no padding, one group) is a matrix product on the (B*H*W, C) view of the map (MKL's
      ``addmm``, the residual as its addend; bias and GELU as in-place passes), unless it has a GELU on more than
      ``GEMM_GELU_MAX`` output values (see there);
    - any other conv is one oneDNN convolution on a pre-packed weight with the GELU or the sum as a post-op (the
      kernels ``torch.compile`` uses on CPU), so the output map is written once. oneDNN takes no GELU after a sum;
      that GELU runs in place.

    Anywhere else the same computation runs as ordinary ops. ``conv`` keeps the weights; the kernel's copy (packed
    or transposed) is kept outside the state dict, dropped on copy/pickle/``.to()`` and rebuilt when the weight
    changes (keyed on its storage and version counter) or, for oneDNN, the input shape does.
    """

    def __init__(self, conv: nn.Conv2d, act: str | None = None):
        super().__init__()
        if act not in ACTS:
            raise ValueError(f"FusedConv supports act in {ACTS}, got {act!r}")
        self.conv = conv
        self.act = act
        self._geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        self._fast = not isinstance(conv.padding, str) and conv.padding_mode == "zeros"  # the kernels' geometry
        self._pointwise = (self._fast and conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.groups == 1
                           and conv.padding == (0, 0))

    def _out_size(self, h: int, w: int) -> tuple[int, int]:
        (ph, pw), (sh, sw), (dh, dw), _ = self._geometry
        kh, kw = self.conv.kernel_size
        return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1

    def _fast_ok(self, x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> bool:
        """Whether the fast kernels take this call (the 1x1 addmm path needs no oneDNN convolution)."""
        if not (self._fast and fused_kernels_usable(x, weight) and x.is_contiguous(memory_format=_CL)
                and (self._pointwise or conv_probe())):
            return False
        if residual is None:
            return True
        return (residual.dtype is _F32 and residual.is_contiguous(memory_format=_CL)
                and not (residual.requires_grad and torch.is_grad_enabled())
                and residual.shape == (x.shape[0], weight.shape[0], *self._out_size(*x.shape[-2:])))

    def _packed(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        return _prepared(self, c.weight, "onednn", lambda w: torch.ops.mkldnn._reorder_convolution_weight(
            w, *self._geometry[:3], c.groups, list(x.shape)), extra=x.shape)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        c = self.conv
        weight = c.weight
        if self._fast_ok(x, weight, residual):
            if self._pointwise and (self.act != "gelu" or x.numel() // x.shape[1] * weight.shape[0] <= GEMM_GELU_MAX):
                # a matrix product on the (B*H*W, C) rows of the channels-last map (views in and out)
                res = None if residual is None else map_rows(residual)
                return rows_map(gemm_rows(self, map_rows(x), weight, c.bias, self.act, res), x)
            conv, conv_add = _conv_ops()
            args = (self._packed(x), c.bias, *self._geometry)
            if residual is None:  # GELU algorithm "none": the exact (erf) GELU
                return conv(x, *args, self.act or "none", [], "none" if self.act == "gelu" else None)
            y = conv_add(x, residual, *args, "add", 1.0, None, [], None)
            return _plain_act(y, self.act)
        y = c(x)
        if residual is not None:
            y = y + residual
        return _plain_act(y, self.act)

    def extra_repr(self) -> str:
        return f"act={self.act}"
