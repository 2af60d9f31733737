"""Relative-position attention bias tables (EfficientFormer V1/V2, EfficientViT).

A table holds one learned value per head and per absolute offset (|dy|, |dx|) between a query and a key, laid out
row-major over the offset grid (``attention_biases``: (heads, Ht * Wt), the official layout). The official code
enumerates offsets in first-seen order over a row-major scan; for every case these models use that order equals
``|dy| * Wt + |dx|``, which is what ``bias_index`` builds.

The table is defined at the training resolution. At another resolution the offset grid changes, and the table is
resized bicubically to it (as the official detection code does). In the train/eval form the bias is gathered
from the live parameter on every call, so it can never be stale (after ``load_state_dict``, an EMA update, or a
``.data`` write). ``fuse()`` returns ``RelPosBiasDeploy``, which gathers once per size and gathers again when
its table buffer changes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .misc import DeployModule, tensor_stamp

Size = tuple[int, int]


def bias_index(q_size: Size, k_size: Size, stride: int = 1, device=None) -> torch.Tensor:
    """(Nq, Nk) index into a table laid out over the (Hk, Wk) offset grid.

    Query (i, j) sits at key position (i * stride, j * stride); its offset to key (y, x) is
    (|i*stride - y|, |j*stride - x|), always inside the (Hk, Wk) grid.
    """
    qy, qx = torch.meshgrid(torch.arange(q_size[0], device=device) * stride,
                            torch.arange(q_size[1], device=device) * stride, indexing="ij")
    ky, kx = torch.meshgrid(torch.arange(k_size[0], device=device), torch.arange(k_size[1], device=device),
                            indexing="ij")
    dy = (qy.reshape(-1, 1) - ky.reshape(1, -1)).abs()
    dx = (qx.reshape(-1, 1) - kx.reshape(1, -1)).abs()
    return dy * k_size[1] + dx


def resize_table(table: torch.Tensor, src: Size, dst: Size) -> torch.Tensor:
    """Bicubically resize a (heads, Hs*Ws) table to (heads, Hd*Wd)."""
    if tuple(src) == tuple(dst):
        return table
    heads = table.shape[0]
    grid = table.reshape(1, heads, src[0], src[1])
    out = F.interpolate(grid, size=tuple(dst), mode="bicubic", align_corners=False)
    return out.reshape(heads, dst[0] * dst[1])


def gather_bias(table: torch.Tensor, table_size: Size, q_size: Size, k_size: Size, stride: int = 1) -> torch.Tensor:
    """(heads, Nq, Nk) bias for the given grids from a (heads, Ht*Wt) table (resized to the key grid if needed)."""
    table = resize_table(table, table_size, k_size)
    return table[:, bias_index(q_size, k_size, stride, device=table.device)]


class RelPosBias(nn.Module):
    """Learned relative-position bias for ``num_heads`` heads.

    Args:
        num_heads: heads (rows of the table).
        table_size: the offset grid the table is defined on, i.e. the key grid at the training resolution.
        q_size, k_size, stride: the query/key grids at the training resolution (used by ``fuse``).
    Call ``bias(q_size, k_size, stride)`` -> (heads, Nq, Nk), gathered from the live parameter on every call:
    nothing to go stale, whatever changes the parameter (a write through ``.data``, as many EMA implementations
    do, leaves no trace in the version counter, so a cache here could not tell). The gather is a few small
    index ops; the deploy form (``fuse``) gathers once per size.
    """

    def __init__(self, num_heads: int, table_size: Size, q_size: Size | None = None, k_size: Size | None = None,
                 stride: int = 1):
        super().__init__()
        self.num_heads = num_heads
        self.table_size = tuple(table_size)
        self.default_k = tuple(k_size or table_size)
        self.default_q = tuple(q_size or self.default_k)
        self.default_stride = stride
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, self.table_size[0] * self.table_size[1]))

    def forward(self, q_size: Size, k_size: Size, stride: int = 1) -> torch.Tensor:
        return gather_bias(self.attention_biases, self.table_size, q_size, k_size, stride)

    def fuse(self) -> "RelPosBiasDeploy":
        return RelPosBiasDeploy(self)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, table={self.table_size[0]}x{self.table_size[1]}"


class RelPosBiasDeploy(DeployModule, nn.Module):
    """Deploy form: the table as a buffer, the bias for the training resolution gathered into a buffer
    (``bias``: a constant of an exported graph) and other resolutions gathered once per size. Both follow an
    in-place write to ``table`` or a ``load_state_dict`` at the next call (keyed on the table's version counter;
    under ``torch.compile`` or export the buffers are used as they are).
    """

    def __init__(self, src: RelPosBias):
        super().__init__()
        self.num_heads = src.num_heads
        self.table_size = src.table_size
        self.default_key = (src.default_q, src.default_k, src.default_stride)
        with torch.no_grad():
            self.register_buffer("table", src.attention_biases.detach().clone())
            self.register_buffer("bias", gather_bias(self.table, self.table_size, *self.default_key))
        self._bias_stamp = tensor_stamp(self.table)
        self._cache: dict = {}  # other sizes: key -> (table stamp, bias)

    def forward(self, q_size: Size, k_size: Size, stride: int = 1) -> torch.Tensor:
        key = (tuple(q_size), tuple(k_size), stride)
        if key == self.default_key:
            if not torch.compiler.is_compiling() and self._bias_stamp != tensor_stamp(self.table):
                with torch.no_grad():  # the table changed since the last gather
                    self.bias.copy_(gather_bias(self.table, self.table_size, *key))
                self._bias_stamp = tensor_stamp(self.table)
            return self.bias
        stamp = tensor_stamp(self.table)
        hit = self._cache.get(key)
        if hit is None or hit[0] != stamp:
            with torch.no_grad():
                hit = (stamp, gather_bias(self.table, self.table_size, *key))
            self._cache[key] = hit
        return hit[1]

    def _apply(self, fn, recurse=True):  # .to()/.half() move the buffers; cached tensors would not follow
        self._cache = {}
        return super()._apply(fn, recurse)


def adapt_bias_tables(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Resize every ``attention_biases`` table in ``state_dict`` whose grid differs from ``model``'s (in place).

    The stored grid is taken as square (the released checkpoints are all 224x224). Returns the keys resized.
    """
    resized = []
    for name, module in model.named_modules():
        if not isinstance(module, RelPosBias):
            continue
        key = f"{name}.attention_biases" if name else "attention_biases"
        value = state_dict.get(key)
        if value is None or value.dim() != 2 or tuple(value.shape) == tuple(module.attention_biases.shape):
            continue
        side = math.isqrt(value.shape[1])
        if side * side != value.shape[1] or value.shape[0] != module.num_heads:
            continue  # leave it to the shape check, which reports it
        state_dict[key] = resize_table(value.float(), (side, side), module.table_size).to(value.dtype)
        resized.append(key)
    return resized


class RelPosBiasFrozen(nn.Module):
    """Graph form of a bias table (``freeze_bias_tables``): the bias of each (query grid, key grid, stride) that one
    forward pass at the export size asked for, as constant buffers. An exported graph then holds the gathered
    tables as constants instead of the index arithmetic (arange, abs, gather) that mobile delegates leave to slow
    fallback kernels. Another grid raises ``InputError``: the graph is built for one input size."""

    def __init__(self, src: RelPosBias, keys: list[tuple[Size, Size, int]]):
        super().__init__()
        self.num_heads = src.num_heads
        self._names = {}
        with torch.no_grad():
            for i, key in enumerate(dict.fromkeys(keys)):
                self.register_buffer(f"bias{i}", gather_bias(src.attention_biases.detach(), src.table_size, *key))
                self._names[key] = f"bias{i}"

    def forward(self, q_size: Size, k_size: Size, stride: int = 1) -> torch.Tensor:
        name = self._names.get((tuple(q_size), tuple(k_size), stride))
        if name is None:
            from ..errors import InputError
            raise InputError(f"this graph form holds attention biases for {sorted(self._names)} (query grid, key "
                             f"grid, stride), not for {(tuple(q_size), tuple(k_size), stride)}: build it at the "
                             "input size it will run at")
        return getattr(self, name)


@torch.no_grad()
def freeze_bias_tables(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """Replace (in place) every ``RelPosBias`` of ``model`` by a ``RelPosBiasFrozen`` holding the biases one
    forward pass on ``example`` uses; returns ``model``."""
    calls: dict[nn.Module, list] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args: calls.setdefault(mod, []).append(
        (tuple(args[0]), tuple(args[1]), args[2] if len(args) > 2 else 1)))
        for m in model.modules() if isinstance(m, RelPosBias)]
    try:
        model(example)
    finally:
        for h in hooks:
            h.remove()
    for name, module in list(model.named_modules()):
        if isinstance(module, RelPosBias):
            model.set_submodule(name, RelPosBiasFrozen(module, calls.get(module, [])))
    return model
