"""Small shared pieces: stochastic depth, layer scale, input checks."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError


class DeployModule:
    """Marks a module of a deploy form (what a ``fuse()`` returned): ``edgevits.fuse_model`` leaves it, and all it
    holds, as it is. Mixed into ``nn.Module`` subclasses: ``class FooDeploy(DeployModule, nn.Module)``."""


def to_2tuple(x: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"expected an int or a pair, got {x!r}")
        return int(x[0]), int(x[1])
    return int(x), int(x)


def batched_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for tensors with the same leading batch dimensions, as one ``torch.bmm``: the arithmetic matmul does
    itself, but an exported graph then holds no ``expand``, which ExecuTorch's XNNPACK delegate leaves out (each
    one cut the graph into another partition)."""
    *lead, n, k = a.shape
    return torch.bmm(a.reshape(-1, n, k), b.reshape(-1, k, b.shape[-1])).view(*lead, n, b.shape[-1])


class MatmulLayerNorm(nn.Module):
    """``nn.LayerNorm`` over the last dimension with its two means taken as linear maps (``x @ 1/C``): the
    graph export form's stand-in (``runtime.export.graph_form``), because ExecuTorch's XNNPACK delegate leaves
    LayerNorm out. Shares the source's affine parameters."""

    def __init__(self, norm: nn.LayerNorm):
        super().__init__()
        if len(norm.normalized_shape) != 1 or not norm.elementwise_affine:
            raise ValueError("only LayerNorms over the last dimension with an affine are rewritten")
        c = norm.normalized_shape[0]
        self.eps, self.weight, self.bias = norm.eps, norm.weight, norm.bias
        self.register_buffer("avg", torch.full((1, c), 1.0 / c, dtype=norm.weight.dtype, device=norm.weight.device),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - F.linear(x, self.avg)
        scale = (F.linear(centred * centred, self.avg) + self.eps).sqrt()
        out = centred / scale * self.weight
        return out if self.bias is None else out + self.bias


class DropPath(nn.Module):
    """Stochastic depth: zero a residual branch per sample with probability ``p`` while training.

    Written with ``torch.rand`` + floor rather than ``bernoulli_`` so that exporters never meet an in-place
    random op; in eval mode (and hence in every export) it is the identity.
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device).add_(keep).floor_()
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LayerScale(nn.Module):
    """Learned per-channel scale ``x * gamma``; gamma has ``shape`` (e.g. (C,1,1) for maps, (C,) for tokens)."""

    def __init__(self, shape: tuple[int, ...], init: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.full(shape, float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def gelu_(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU, in place in eager mode when no gradient is needed (returns the result either way).

    A channels-last map is handed to the kernel as its (B, H, W, C) memory-order view. On a channels-last 4-D
    tensor PyTorch's CPU GELU kernel leaves its fast path: measured up to 10x slower (1.8 vs 0.15 ms on a
    (1, 128, 56, 56) map with activations of size 30, one thread), while relu, add, erf and the rest do not care.
    """
    if ((torch.is_grad_enabled() and x.requires_grad) or torch.compiler.is_compiling() or torch.jit.is_tracing()
            or getattr(torch.compiler, "is_exporting", lambda: False)()):
        return F.gelu(x)  # compilers fuse the functional op; an in-place write into a permuted view slows them
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        torch.ops.aten.gelu_(x.permute(0, 2, 3, 1))
        return x
    return torch.ops.aten.gelu_(x)


def tensor_stamp(t: torch.Tensor) -> tuple:
    """What identifies a tensor's current contents, to key a cache of something derived from it: its storage, its
    version counter (bumped by every in-place write except through ``.data``; inference tensors have none) and its
    device."""
    return None if t.is_inference() else t._version, t.data_ptr(), t.device


def check_image_input(x, in_chans: int, multiple: int, model_name: str = "model",
                      dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
    """Raise an ``InputError`` that says what was expected unless ``x`` is a non-empty float tensor
    (B, in_chans, H, W) with H, W % multiple == 0 (and, when given, of ``dtype`` on ``device``: the model's)."""
    if not isinstance(x, torch.Tensor):
        hint = ": convert with torch.from_numpy(x)" if type(x).__module__.startswith("numpy") else ""
        raise InputError(f"{model_name} expects a torch.Tensor of images (B, {in_chans}, H, W); got a "
                         f"{type(x).__module__}.{type(x).__name__}{hint}")
    if torch.jit.is_tracing():
        return
    if x.dim() == 3 and x.shape[0] == in_chans:
        raise InputError(f"{model_name} expects a batch of images (B, {in_chans}, H, W); got one image of shape "
                         f"{tuple(x.shape)}: add the batch axis with x.unsqueeze(0)")
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise InputError(f"{model_name} expects a batch of images shaped (B, {in_chans}, H, W); "
                         f"got a tensor of shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise InputError(f"{model_name} got an empty batch (0 images): call it on at least one image")
    if not x.is_floating_point():
        raise InputError(f"{model_name} expects float images normalised with its mean and std; got {x.dtype}: "
                         "convert pixels with x.float() / 255 and normalise them (edgevits' data transforms do)")
    if dtype is not None and x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
        raise InputError(f"{model_name} has {dtype} weights but got a {x.dtype} input: convert the input with "
                         f"x.to({dtype}) (or the model with model.to({x.dtype}))")
    if device is not None and x.device != device:
        raise InputError(f"{model_name} is on {device} but got an input on {x.device}: x.to('{device}')")
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if h % multiple or w % multiple:
        raise InputError(f"{model_name} needs height and width divisible by {multiple}; got {h}x{w} "
                         f"(try {max(multiple, round(h / multiple) * multiple)}x"
                         f"{max(multiple, round(w / multiple) * multiple)})")
