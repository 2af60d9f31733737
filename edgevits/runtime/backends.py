"""Runners: the same model behind one call signature on each inference backend (PyTorch eager, channels-last,
torch.compile, ONNX Runtime, OpenVINO, ExecuTorch-XNNPACK, LiteRT-XNNPACK). Used by the benchmark and by
``edgevits.deploy``."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import BackendUnavailable
from ..checkpoint.io import atomic_write, cache_dir
from .export import GRAPH_FORMS, export_onnx, graph_form, graph_key, onnx_session, openvino_compiled, quiet
from .settings import compile_settings

BACKENDS = ("eager", "eager_cl", "compile", "onnxruntime", "openvino", "executorch", "litert")
GRAPH_BACKENDS = ("onnxruntime", "openvino", "executorch", "litert")  # run an exported graph: CPU float32 only
FIXED_BATCH_BACKENDS = ("executorch", "litert")  # their graphs take the example's batch size only
BACKEND_FORMAT = {"onnxruntime": "onnx", "openvino": "openvino", "executorch": "executorch", "litert": "litert"}
Runner = Callable[[torch.Tensor], torch.Tensor]


def _to_numpy(x: torch.Tensor):
    """``x`` as the CPU float32 array the exported graphs take, from any device, dtype or autograd state."""
    return x.detach().to("cpu", torch.float32).contiguous().numpy()


def _from_numpy(out, like: torch.Tensor) -> torch.Tensor:
    """A graph's output as a tensor on ``like``'s device and in its dtype."""
    return torch.from_numpy(out).to(like.device, like.dtype)


def _eager(model: nn.Module, channels_last: bool) -> Runner:
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
    return run


def _compiled(model: nn.Module, example: torch.Tensor) -> Runner:
    compiled = torch.compile(model, backend="inductor", dynamic=False)
    with torch.no_grad(), quiet(), compile_settings():
        compiled(example)  # compile now, not inside the timed region

    def run(x: torch.Tensor) -> torch.Tensor:  # (another batch size recompiles: under the same settings)
        with torch.no_grad(), compile_settings():
            return compiled(x)
    return run


def _require(module: str, missing: str):
    """Import ``module`` or raise ``BackendUnavailable(missing)``."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise BackendUnavailable(missing) from e


def _onnxruntime(model: nn.Module, example: torch.Tensor, threads: int | None, workdir: Path, fuse: bool,
                 cache: bool) -> Runner:
    _require("onnxruntime", "onnxruntime is not installed")
    path = export_onnx(model, workdir / "model.onnx", tuple(example.shape[-2:]), check=False, fuse=fuse,
                       optimize=False, cache=cache)
    session = onnx_session(path, threads, spinning=False)  # no busy-waiting into the next timed run

    def run(x: torch.Tensor) -> torch.Tensor:
        return _from_numpy(session.run(None, {"x": _to_numpy(x)})[0], x)
    return run


def _openvino(model: nn.Module, example: torch.Tensor, threads: int | None, workdir: Path, fuse: bool,
              cache: bool) -> Runner:
    ov = _require("openvino", "openvino is not installed (pip install 'edgevits[openvino]')")
    graph = graph_form(model, GRAPH_FORMS["openvino"]) if fuse else model.eval()
    onnx_path = export_onnx(graph, workdir / "model.onnx", tuple(example.shape[-2:]), check=False, fuse=False,
                            optimize=False, cache=cache)
    ov.save_model(ov.convert_model(str(onnx_path)), str(workdir / "model.xml"), compress_to_fp16=False)
    compiled = openvino_compiled(workdir / "model.xml", threads)
    request = compiled.create_infer_request()

    def run(x: torch.Tensor) -> torch.Tensor:
        return _from_numpy(request.infer([_to_numpy(x)])[0].copy(), x)
    return run


def _mobile(model: nn.Module, backend: str, example: torch.Tensor, threads: int | None, workdir: Path, fuse: bool,
            cache: bool) -> Runner:
    """ExecuTorch or LiteRT: ``model`` converted at ``example``'s shape and run by that runtime. Their graphs have
    a fixed batch: a call with another batch size converts once more for it (10-60 s, then kept), which the
    runner's ``fixed_batch`` (the batch converted up front) lets a caller avoid."""
    from importlib.metadata import PackageNotFoundError, version

    from . import mobile
    mobile.require("executorch.exir" if backend == "executorch" else "ai_edge_litert.interpreter", backend)
    graph = graph_form(model, GRAPH_FORMS[backend], example, target=backend) if fuse else model.eval()
    suffix = ".pte" if backend == "executorch" else ".tflite"
    try:
        versions = [version(p) for p in ("executorch", "litert-torch", "ai-edge-litert")]
    except PackageNotFoundError:
        versions = []
    runs: dict[int, Runner] = {}

    def convert(batch: int) -> Runner:
        shaped = torch.randn(batch, *example.shape[1:])
        path = cache_dir("graphs") / f"{graph_key(graph, backend, tuple(shaped.shape), versions)}{suffix}" \
            if cache else workdir / f"model-batch{batch}{suffix}"
        if not (cache and path.is_file()):
            write = (lambda tmp: Path(tmp).write_bytes(mobile.executorch_bytes(graph, shaped))) \
                if backend == "executorch" else (lambda tmp: mobile.litert_write(graph, shaped, Path(tmp)))
            atomic_write(path, write)
        return (mobile.executorch_runner if backend == "executorch" else mobile.litert_runner)(path, threads)

    def run(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] not in runs:
            runs[x.shape[0]] = convert(x.shape[0])
        return _from_numpy(runs[x.shape[0]](x).numpy(), x)
    runs[example.shape[0]] = convert(example.shape[0])
    run.fixed_batch = example.shape[0]
    return run


def make_runner(model: nn.Module, backend: str, example: torch.Tensor, threads: int | None = None,
                workdir: str | Path | None = None, fuse: bool = True, cache: bool = False) -> Runner:
    """A callable ``x -> logits`` for ``model`` on ``backend``.

    ``model`` should already be in its deploy form (``fuse_model``) for the PyTorch backends. The graph backends
    export an edgevits model (``fuse`` true) in the form their runtime runs fastest (``export.GRAPH_FORMS``: ONNX
    Runtime the deploy form, fusing ``model`` if needed; OpenVINO the eval form, ExecuTorch and LiteRT the graph
    form, so pass the unfused model to get those) and a foreign one (``fuse=False``, e.g. timm's) as it is.
    ``example`` fixes device, dtype and image size (ONNX/OpenVINO graphs keep a dynamic batch axis; ExecuTorch and
    LiteRT graphs take ``example``'s batch only: their runners carry ``fixed_batch``); the graph backends take CPU
    float32 models only, and their runners convert any input to CPU float32 and return logits on the input's
    device and in its dtype; ``cache`` keeps and reuses their exported graphs in edgevits' cache. Raises
    ``BackendUnavailable``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    model = model.eval()
    if backend in GRAPH_BACKENDS and (example.device.type != "cpu" or example.dtype != torch.float32):
        raise BackendUnavailable(f"{backend} runs here on CPU in float32 only (not {example.device.type} "
                                 f"{str(example.dtype).removeprefix('torch.')})")
    if backend == "eager":
        return _eager(model, channels_last=False)
    if backend == "eager_cl":
        return _eager(model, channels_last=True)
    if backend == "compile":
        return _compiled(model, example)
    workdir = Path(workdir or tempfile.mkdtemp(prefix="edgevits-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if backend == "onnxruntime":
        return _onnxruntime(model, example, threads, workdir, fuse, cache)
    if backend == "openvino":
        return _openvino(model, example, threads, workdir, fuse, cache)
    return _mobile(model, backend, example, threads, workdir, fuse, cache)
