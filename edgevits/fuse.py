"""Deploy form: ``fuse_model`` returns an inference copy with BatchNorm folded, biases gathered, one head.

The protocol, one for every family: a module that has a deploy form defines ``fuse()``, which returns a new module
(``<Name>Deploy``, defined next to it, marked ``DeployModule``). ``fuse_model`` replaces modules bottom-up, so a
``fuse()`` sees its children already in their deploy forms; it never descends into a ``DeployModule``. A model then
finishes its own part (``finish_deploy_``: final norm, heads, memory layout) and runs every forward pass inside the
fast CPU kernels' scope (``forward_context``)."""
from __future__ import annotations

import copy

import torch
from torch import nn

from .layers import DeployModule
from .layers.kernels import fused_scope


def _fuse(module: nn.Module) -> nn.Module:
    if isinstance(module, DeployModule):
        return module
    for name, child in list(module.named_children()):
        setattr(module, name, _fuse(child))
    fuse = getattr(module, "fuse", None)
    return fuse() if callable(fuse) else module


@torch.no_grad()
def fuse_model(model: nn.Module) -> nn.Module:
    """Return a deploy copy of ``model`` (the original is untouched).

    The copy is in eval mode; every module with a ``fuse()`` method is replaced, bottom-up, by what it returns:
    conv+BN pairs become one conv, BatchNorms next to a 1x1 conv or a Linear fold into it, layer scales fold into
    the preceding layer, attention biases are gathered once into buffers, and the two DeiT heads become one
    Linear. Outputs equal the eval-mode outputs of ``model``. Calling it on a fused model changes nothing.
    """
    deployed = copy.deepcopy(model).eval()
    if getattr(deployed, "is_deploy_form", False):
        return deployed
    # the new layers' default initialisation (overwritten at once) must not draw from the caller's RNG
    cuda = sorted({t.device.index or 0 for t in deployed.parameters() if t.is_cuda})
    with torch.random.fork_rng(devices=cuda):
        deployed = _fuse(deployed)
        finish = getattr(deployed, "finish_deploy_", None)
        if callable(finish):
            finish()
    deployed.eval()
    _to_normal_tensors(deployed)
    for p in deployed.parameters():
        p.requires_grad_(False)
    deployed.is_deploy_form = True
    if hasattr(type(deployed), "forward_context"):
        deployed.forward_context = fused_scope  # the fast kernels' global checks, once per forward pass
    return deployed


def _to_normal_tensors(model: nn.Module) -> None:
    """Replace inference tensors (a model built or fused under ``torch.inference_mode``) by normal copies.

    The deploy layers cache their kernels' copies of the weights keyed on each weight's version counter, which an
    inference tensor lacks: without this they would re-pack every weight on every call (measured: 29 oneDNN
    reorders and 95 copies per V2-S0 forward, a third of its time)."""
    with torch.inference_mode(False):
        for module in model.modules():
            for table in (module._parameters, module._buffers):
                for name, t in table.items():
                    if t is not None and t.is_inference():
                        table[name] = nn.Parameter(t.clone(), requires_grad=False) if isinstance(
                            t, nn.Parameter) else t.clone()
