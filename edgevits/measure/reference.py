"""Reference implementations for comparisons: timm imported without torchvision, weights and BatchNorm statistics
that make a comparison sensitive, and the timm twin of a variant (same weights in timm's model and ours), used by
``edgevits bench --compare timm``, the benchmarks and the tests."""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

import torch
from torch import nn

from ..errors import BackendUnavailable, EdgevitsError
from ..registry import create_model, get_entry
from ..runtime.timing import describe_error


class _Placeholder:
    """Stands in for any torchvision name; fails loudly if actually used."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError("torchvision is not installed; edgevits only stubbed it so that timm's model code imports")


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if name == "InterpolationMode":  # timm builds lookup tables from this enum at import time
            import enum
            value = enum.Enum("InterpolationMode", "NEAREST BILINEAR BICUBIC BOX HAMMING LANCZOS NEAREST_EXACT")
        else:
            value = type(name, (_Placeholder,), {})
        setattr(self, name, value)
        return value


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def import_timm():
    """Import timm, registering a stub ``torchvision`` first when the real one is absent.

    timm's model code never calls torchvision, but some of its modules import it at load time; torchvision has no
    CPU build on the package index these machines use. The stub only satisfies those imports.
    """
    if "timm" in sys.modules:
        return sys.modules["timm"]
    try:
        import torchvision  # noqa: F401
    except ImportError:
        finder = _StubFinder()
        sys.meta_path.append(finder)
        try:
            import timm
        finally:  # keep the stub out of sight of other libraries (transformers probes for torchvision)
            sys.meta_path.remove(finder)
            for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
                del sys.modules[name]
    import timm
    return timm


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give ``model`` weights that make a parity check sensitive: random biases, norm affine parameters, layer
    scales (their 1e-5 init hides mistakes) and attention-bias tables. Conv/Linear weights keep their init."""
    g = torch.Generator().manual_seed(seed)

    def rand(p, lo, hi):
        p.copy_(torch.rand(p.shape, generator=g) * (hi - lo) + lo)

    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if "attention_biases" in name or leaf == "w_g":
            p.copy_(torch.randn(p.shape, generator=g))
        elif leaf == "bias":
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        elif "gamma" in leaf or "layer_scale" in name:
            rand(p, 0.2, 1.0)
        elif p.dim() == 1:  # norm weights
            rand(p, 0.5, 1.5)
    return model


@torch.no_grad()
def calibrate_bn(model: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    """Set every BatchNorm's running statistics to the exact average over ``batches`` (train-mode passes with
    ``momentum=None``), so that in eval mode every BN really normalises. Returns the model in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for x in batches:
        model(x)
    for m, mom in zip(bns, saved):
        m.momentum = mom
    return model.eval()


def calibrated(model: nn.Module, seed: int = 0, batches: int = 2, batch_size: int = 2,
               size: int | tuple[int, int] = 224) -> nn.Module:
    """``randomize_`` then ``calibrate_bn`` on seeded random images: the standard set-up of a parity check.
    Returns the model in eval mode."""
    h, w = (size, size) if isinstance(size, int) else size
    g = torch.Generator().manual_seed(seed)
    randomize_(model, seed)
    return calibrate_bn(model, [torch.randn(batch_size, 3, h, w, generator=g) for _ in range(batches)])


def timm_twin(name: str, img_size: int = 224):
    """timm's implementation of ``name`` built for ``img_size`` (random weights, calibrated BatchNorm) and ours
    built for the same size carrying the same weights (loaded from timm's state dict). Raises
    ``BackendUnavailable`` where timm has no counterpart or its model cannot run at that size."""
    entry = get_entry(name)
    if not entry.timm_name:
        raise BackendUnavailable(f"{name} has no timm counterpart")
    timm = import_timm()
    try:  # efficientformerv2/efficientvit_msra size their bias tables from img_size; swiftformer ignores it
        ref = timm.create_model(entry.timm_name, img_size=img_size)
        randomize_(ref)
        calibrate_bn(ref, [torch.randn(2, 3, img_size, img_size)])
    except Exception as e:  # timm's efficientformer (V1) fixes its attention bias at 224x224
        raise BackendUnavailable(f"timm's {entry.timm_name} cannot run at {img_size}x{img_size} "
                                 f"({describe_error(e)})") from e
    try:
        ours = create_model(name, checkpoint=ref.state_dict(), img_size=img_size).eval()
    except (ValueError, EdgevitsError) as e:  # a size our config rejects (EfficientFormer: a multiple of 32)
        raise BackendUnavailable(f"{name} cannot be built for {img_size}x{img_size} to carry timm's weights "
                                 f"({describe_error(e)})") from e
    return ref.eval(), ours
