"""Export to ONNX or OpenVINO (the deploy form, or the eval form where a runtime optimises that better), with a
parity check against PyTorch that fails loudly."""
from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import io
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from ..checkpoint.io import atomic_write, cache_dir, writable_file
from ..errors import EdgevitsWarning, ExportError
from ..fuse import fuse_model
from ..layers import to_2tuple
from .parity import check_parity
from .timing import describe_error

@contextlib.contextmanager
def quiet():
    """The exporters print progress lines and warnings on every call; keep them out of the user's output."""
    previous = logging.getLogger("torch.onnx").level
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            logging.getLogger("torch.onnx").setLevel(previous)


def example_input(model: nn.Module, img_size: int | tuple[int, int] | None = None, batch: int = 1) -> torch.Tensor:
    """A random input for ``model`` at ``img_size`` (default: its config's), after the model's own size check (a
    size it cannot take is its one-line error, not an exporter's)."""
    config = getattr(model, "config", None)
    h, w = to_2tuple(img_size or getattr(config, "img_size", 224))
    example = torch.randn(batch, getattr(config, "in_chans", 3), h, w)
    if callable(getattr(model, "check_input", None)):
        model.check_input(example)
    return example


def _deploy_form(model: nn.Module) -> nn.Module:
    return model if getattr(model, "is_deploy_form", False) else fuse_model(model)


def export_onnx(model: nn.Module, path: str | os.PathLike, img_size: int | tuple[int, int] | None = None,
                opset: int = 18, check: bool = True, atol: float = 1e-4, fuse: bool = True,
                optimize: bool = True, cache: bool = False) -> Path:
    """Write the deploy form of ``model`` to ``path`` as one self-contained ONNX file (weights inside) with a
    dynamic batch axis (input ``x``: (batch, C, H, W); output ``logits``), then check it with ONNX Runtime.

    The example input has batch 2: a batch-1 example lets the exporter specialise the batch axis to 1.
    Raises ``ExportError`` if the exported graph disagrees with PyTorch by more than ``atol`` (relative to the
    largest output) at batch 1 or 3. ``fuse=False`` exports ``model`` as it is (e.g. a timm model);
    ``optimize=False`` skips the exporter's graph clean-up (a third faster; ONNX Runtime optimises on load anyway).
    ``cache=True`` keeps the file in edgevits' cache (``graphs/``), keyed on everything the graph depends on
    (weights, config, input size, exporter settings, library versions), and copies it from there when the same
    graph is asked for again: an export takes 5-30 s (``deploy()`` uses this).
    """
    path = writable_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    deployed = _deploy_form(model) if fuse else model.eval()
    example = example_input(deployed, img_size, 2)
    in_chans, h, w = example.shape[1:]
    cached = cache_dir("graphs") / f"{graph_key(deployed, h, w, in_chans, opset, optimize)}.onnx" if cache else None
    if cached is not None and cached.is_file():
        shutil.copyfile(cached, path)
    else:
        _export_to(deployed, path, example, opset, optimize)
        if cached is not None:
            atomic_write(cached, lambda tmp: shutil.copyfile(path, tmp))
    if check:
        check_onnx(deployed, path, (in_chans, h, w), atol=atol)
    return path


def _export_to(model: nn.Module, path: Path, example: torch.Tensor, opset: int, optimize: bool) -> None:
    """The dynamo exporter (the TorchScript one if it fails), written atomically to ``path``."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with quiet():
            torch.onnx.export(model, (example,), str(tmp), dynamo=True, input_names=["x"],
                              output_names=["logits"], dynamic_shapes={"x": {0: batch}}, opset_version=opset,
                              external_data=False, optimize=optimize)
    except Exception as first:  # noqa: BLE001  (every edgevits model traces; a foreign model may not)
        _torchscript_fallback(model, example, tmp, opset, first)
    os.replace(tmp, path)


@functools.cache
def _code_digest() -> str:
    """A digest of edgevits' own source files: a cached graph is never reused across a change of the code."""
    digest = hashlib.sha256()
    for file in sorted(Path(__file__).resolve().parents[1].rglob("*.py")):
        digest.update(file.read_bytes())
    return digest.hexdigest()


def graph_key(model: nn.Module, *settings) -> str:
    """A digest of everything an exported graph of ``model`` depends on: its class, config, weights and buffers,
    the export ``settings``, the versions of torch, onnx and onnxscript, and edgevits' code."""
    import importlib.metadata as md
    digest = hashlib.sha256()
    versions = [md.version(p) for p in ("torch", "onnx", "onnxscript")] + [_code_digest()]
    digest.update(repr((type(model).__module__, type(model).__qualname__, getattr(model, "config", None), settings,
                        versions)).encode())
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        digest.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:32]


def _torchscript_fallback(model: nn.Module, example: torch.Tensor, tmp: Path, opset: int, why: Exception) -> None:
    """Export with the TorchScript exporter (which PyTorch is retiring) after the dynamo exporter failed, and say
    so with an ``EdgevitsWarning``; every edgevits model exports through dynamo, so this serves foreign models."""
    try:
        with quiet():
            torch.onnx.export(model, (example,), str(tmp), dynamo=False, input_names=["x"], output_names=["logits"],
                              dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset)
    except Exception as second:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"ONNX export failed: {describe_error(why)}; TorchScript exporter: "
                          f"{describe_error(second)}") from second
    warnings.warn(f"the dynamo ONNX exporter failed ({describe_error(why)}); exported {type(model).__name__} with "
                  "the TorchScript exporter instead", EdgevitsWarning, stacklevel=3)


def onnx_session(path: str | os.PathLike, threads: int | None = None, spinning: bool = True):
    """An ONNX Runtime CPU session with all graph optimisations and ``threads`` intra-op threads.

    ``spinning=False`` stops its worker threads from busy-waiting after each run (which lowers its own latency
    a little but steals the cores from whatever runs next: the benchmark turns it off for fair interleaving)."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only: the optimiser warns about nodes it merely cannot constant-fold
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def check_inputs(chw: tuple[int, int, int], batches: tuple[int, ...] = (1, 3)) -> list[torch.Tensor]:
    """The random inputs an export is checked on: one per batch size (two sizes: the batch axis stays dynamic)."""
    return [torch.randn(b, *chw) for b in batches]


@torch.no_grad()
def check_onnx(model: nn.Module, path: str | os.PathLike, chw: tuple[int, int, int], atol: float = 1e-4,
               batches: tuple[int, ...] = (1, 3)) -> float:
    """Run the ONNX file and ``model`` on random inputs at each batch size; return the worst relative error or
    raise ``ExportError`` above ``atol``."""
    session = onnx_session(path)
    return check_parity(lambda x: session.run(None, {"x": x.numpy()})[0], model, check_inputs(chw, batches), atol,
                        "ONNX output")


# The formulation each graph runtime runs fastest (``benchmarks/graph_forms.py``, batch 1, 2 threads): OpenVINO folds
# BatchNorms and fuses convolutions itself and runs the plain eval-form graph 7-20% faster than our deploy form,
# whose channels-last GEMM reformulations (written for PyTorch eager) export as transposes and matmuls. On ONNX
# Runtime the deploy form wins where it batches work (EfficientViT's head projections: 6.1 vs 7.9 ms for M0) and
# loses 4-9% elsewhere. The mobile runtimes take the graph form: the deploy form's custom kernels do not lower to
# their delegates, and the eval form's bias-table arithmetic falls off them.
GRAPH_FORMS = {"onnx": "deploy", "openvino": "eval", "executorch": "graph", "litert": "graph", "coreml": "graph"}
FORM_NAMES = ("deploy", "eval", "graph")


def graph_form(model: nn.Module, form: str, example: torch.Tensor | None = None,
               target: str | None = None) -> nn.Module:
    """``model`` as the graph to export.

    ``"deploy"``: its deploy form (``fuse_model``); ``"eval"``: the model itself in eval mode; ``"graph"``: a copy
    of the eval form written for graph runtimes: every attention-bias table gathered into constants for the input
    size of ``example`` (``layers.bias.freeze_bias_tables``; the graph then runs at that size only), attention
    as plain matmul-softmax-matmul, and SwiftFormer's L2 norms and token sums as matrix products (ExecuTorch's
    XNNPACK delegate takes those; each op it left out cut the graph into another partition). For ``target=
    "executorch"`` LayerNorms become linear maps as well (``MatmulLayerNorm``; coremltools 9.0's linear-bias
    fusion fails on that rewrite, and the other runtimes take LayerNorm as it is). A deploy-form model is returned
    as it is whatever the form (its eval form is gone)."""
    if form not in FORM_NAMES:
        raise ValueError(f"form must be one of {', '.join(FORM_NAMES)}, got {form!r}")
    if getattr(model, "is_deploy_form", False):
        return model
    if form == "deploy":
        return fuse_model(model)
    if form == "eval":
        return model.eval()
    if example is None:
        raise ValueError("the graph form needs an example input: it is built for one input size")
    from ..layers.attention.additive import AdditiveAttention
    from ..layers.attention.cascaded import CascadedGroupAttention
    from ..layers.attention.mhsa import MHSA
    from ..layers.bias import freeze_bias_tables
    from ..layers.misc import MatmulLayerNorm
    graph = copy.deepcopy(model).eval()
    for module in graph.modules():
        if isinstance(module, MHSA):
            module.use_sdpa = False
        if isinstance(module, AdditiveAttention):
            module.use_matmul_reductions()
        if isinstance(module, CascadedGroupAttention):
            module.slice_heads = True
    for name, module in list(graph.named_modules()) if target == "executorch" else []:
        if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1 and module.elementwise_affine:
            graph.set_submodule(name, MatmulLayerNorm(module))
    return freeze_bias_tables(graph, example[:1])


def export_openvino(model: nn.Module, path: str | os.PathLike, img_size: int | tuple[int, int] | None = None,
                    check: bool = True, atol: float = 1e-4, form: str = GRAPH_FORMS["openvino"]) -> Path:
    """Write an OpenVINO IR (``path`` .xml + .bin) converted from the ONNX export, checked against PyTorch at batch
    1 and 3. ``form``: the graph exported (``GRAPH_FORMS``; by default the eval form, which OpenVINO optimises
    better than our deploy form)."""
    try:
        import openvino as ov
    except ImportError as e:
        raise ExportError("OpenVINO is not installed: pip install 'edgevits[openvino]'") from e
    path = writable_file(Path(path).with_suffix(".xml"))
    deployed = graph_form(model, form, example_input(model, img_size))
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(deployed, Path(tmp) / "model.onnx", img_size, check=False, fuse=False)
        ov_model = ov.convert_model(str(onnx_path))
    path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(ov_model, str(path), compress_to_fp16=False)
    if check:
        h, w = to_2tuple(img_size or getattr(model.config, "img_size", 224))
        compiled = openvino_compiled(path)
        check_parity(lambda x: compiled(x.numpy())[0], deployed,
                     check_inputs((getattr(model.config, "in_chans", 3), h, w)), atol, "OpenVINO output")
    return path


def openvino_compiled(path: str | os.PathLike, threads: int | None = None):
    """An OpenVINO CPU model compiled at full fp32 precision (the CPU plugin may otherwise pick bf16/fp16)."""
    import openvino as ov
    config = {"INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return ov.Core().compile_model(str(path), "CPU", config)


FORMATS = ("onnx", "openvino", "executorch", "litert", "coreml")
SUFFIX = {"onnx": ".onnx", "openvino": ".xml", "executorch": ".pte", "litert": ".tflite", "coreml": ".mlpackage"}


def export(model: nn.Module, path: str | os.PathLike, format: str = "onnx", form: str | None = None,
           **kwargs) -> Path:
    """Export in ``format`` (``FORMATS``) the graph ``form`` ("deploy", "eval" or "graph"; by default the one that
    runtime runs fastest, ``GRAPH_FORMS``); see ``export_onnx``, ``export_openvino`` and, in ``runtime.mobile``,
    ``export_executorch``, ``export_litert``, ``export_coreml`` (which returns ``(path, report)``)."""
    if format == "onnx":
        example = example_input(model, kwargs.get("img_size"))
        return export_onnx(graph_form(model, form or GRAPH_FORMS["onnx"], example), path, fuse=False, **kwargs)
    if format == "openvino":
        return export_openvino(model, path, form=form or GRAPH_FORMS["openvino"], **kwargs)
    if format in ("executorch", "litert", "coreml"):
        from . import mobile
        return getattr(mobile, f"export_{format}")(model, path, form=form, **kwargs)
    raise ValueError(f"unknown export format {format!r}; choose from {', '.join(FORMATS)}")
