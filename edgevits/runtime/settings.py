"""Process-wide settings, changed only inside context managers that restore them."""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def num_threads(threads: int | None):
    """``torch.set_num_threads(threads)`` for a ``with`` block (``None``, 0 or negative: unchanged)."""
    before = torch.get_num_threads()
    if threads and threads > 0:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def compile_settings():
    """What edgevits' compiled runners need while they compile and run: inductor constant-folds the weights into
    the graph (inference only), and dynamo's recompile limit is raised (every edgevits model shares
    ``ClassifierModel.forward``: each model and batch size is one more cache entry for that code object, and past
    the limit dynamo silently falls back to eager)."""
    import torch._dynamo
    import torch._inductor.config as inductor_config
    limit = max(torch._dynamo.config.recompile_limit, 256)
    with inductor_config.patch(freezing=True), torch._dynamo.config.patch(recompile_limit=limit):
        yield
