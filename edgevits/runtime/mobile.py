"""Export for phones: ExecuTorch (``.pte``, XNNPACK delegate), LiteRT (``.tflite``, through litert-torch) and Core ML
(``.mlpackage``, ML program), each checked where this machine can check it.

ExecuTorch and LiteRT files are run here by their own Python runtimes and compared with PyTorch (``ExportError``
above the bound). Core ML cannot run on Linux: its package is loaded back and its program checked (every op on
``COREML_OPS`` for the deployment target, input and output named and shaped as documented); its numerical parity
is not verified here, and ``export_coreml`` says so in its report.

The converters come from extras (``pip install 'edgevits[mobile]'``): executorch, litert-torch with ai-edge-litert,
coremltools. They print progress bars, version warnings and C++ logs on import and on every conversion; those go
to a log file unless the conversion fails (the last lines are then part of the error).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from ..checkpoint.io import atomic_write, writable_file
from ..errors import BackendUnavailable, ExportError
from .export import GRAPH_FORMS, example_input, graph_form
from .parity import check_parity
from .timing import describe_error

MOBILE_FORMATS = ("executorch", "litert", "coreml")
_EXTRA = "pip install 'edgevits[mobile]'"


@contextlib.contextmanager
def silenced(what: str):
    """Send everything written to stdout/stderr (Python and C++ alike) to a temporary log while the block runs; if
    it raises, re-raise as ``ExportError`` with the log's last lines."""
    with tempfile.TemporaryFile(mode="w+") as log:
        saved = [os.dup(1), os.dup(2)]
        import sys
        sys.stdout.flush(), sys.stderr.flush()
        try:
            os.dup2(log.fileno(), 1), os.dup2(log.fileno(), 2)
            with warnings.catch_warnings(), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                warnings.simplefilter("ignore")
                yield
        except (ExportError, BackendUnavailable):
            raise
        except Exception as e:
            log.flush(), log.seek(0)
            tail = [line.strip() for line in log.read().splitlines() if line.strip()][-3:]
            raise ExportError(f"{what} failed: {describe_error(e)}"
                              + (f" (converter log: {' | '.join(tail)})" if tail else "")) from e
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])


def require(module: str, fmt: str):
    """Import a converter or runtime module quietly, or raise ``BackendUnavailable`` naming the extra."""
    try:
        with silenced(f"importing {module}"):
            return importlib.import_module(module)
    except (ImportError, ExportError) as e:
        raise BackendUnavailable(f"{fmt} needs {module.split('.')[0]}, which is not installed or does not load "
                                 f"here ({describe_error(e.__cause__ or e)}): {_EXTRA}") from e


def _lowerable_form(model: nn.Module, form: str | None, fmt: str, why: str) -> str:
    """The form to export for ``fmt``, refusing the deploy form (or a deploy-form model) where it cannot lower."""
    form = form or GRAPH_FORMS[fmt]
    if form == "deploy" or getattr(model, "is_deploy_form", False):
        raise ExportError(f"{fmt} cannot take the deploy form: {why}; export the graph form (the default) or the "
                          "eval form of the unfused model")
    return form


def _save_package(mlmodel, path: Path) -> None:
    """Save a Core ML package (a folder) under a temporary name beside ``path``, then move it onto ``path``: no
    half-written package is left behind (coremltools insists on the ``.mlpackage`` suffix)."""
    staged = path.with_name(f".{path.stem}.tmp.mlpackage")
    shutil.rmtree(staged, ignore_errors=True)
    try:
        with silenced("saving the Core ML package"):
            mlmodel.save(str(staged))
        if path.is_dir():
            shutil.rmtree(path)
        os.replace(staged, path)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


# --- ExecuTorch ---------------------------------------------------------------------------------------------------

def executorch_bytes(graph: nn.Module, example: torch.Tensor) -> bytes:
    """``graph`` exported at ``example``'s shape and lowered to ExecuTorch's XNNPACK delegate: the ``.pte`` program's
    bytes. (A dynamic batch axis exports, but ExecuTorch then plans memory for the example's batch in some graphs,
    EfficientFormer-L1's among them, and refuses a larger one: mobile graphs here have a fixed batch.)"""
    require("executorch.exir", "executorch")
    with silenced("ExecuTorch export"):
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
        program = torch.export.export(graph, (example,))
        return to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch().buffer


def executorch_runner(path: str | os.PathLike, threads: int | None = None):
    """A callable ``x -> logits`` (CPU float32 tensors) running the ``.pte`` program at ``path`` with ExecuTorch's
    Python runtime; ``threads`` sets its XNNPACK thread pool (process-wide: ExecuTorch has one)."""
    require("executorch.runtime", "executorch")
    with silenced("loading the ExecuTorch program"):
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime
        if threads:
            portable_lib._unsafe_reset_threadpool(threads)
        method = Runtime.get().load_program(Path(path)).load_method("forward")

    def run(x: torch.Tensor) -> torch.Tensor:
        return method.execute([x.detach().to("cpu", torch.float32).contiguous()])[0]
    return run


def export_executorch(model: nn.Module, path: str | os.PathLike, img_size=None, check: bool = True,
                      atol: float = 1e-4, form: str | None = None, batch_size: int = 1) -> Path:
    """Write ``model`` as an ExecuTorch program (``.pte``, XNNPACK delegate, float32, input ``(batch_size, C, H,
    W)``) and check it against PyTorch at that batch with ExecuTorch's runtime (``ExportError`` above ``atol``)."""
    path = writable_file(path)
    example = example_input(model, img_size, batch_size)
    form = _lowerable_form(model, form, "executorch", "its channels-last kernels fail XNNPACK's layout pass")
    graph = graph_form(model, form, example, target="executorch")
    data = executorch_bytes(graph, example)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    if check:
        check_parity(executorch_runner(path), graph, [torch.randn(*example.shape)], atol, "ExecuTorch output")
    return path


# --- LiteRT -------------------------------------------------------------------------------------------------------

_LITERT_PROCESS = None  # the spawned process that converts for litert_write, kept: importing litert-torch takes 10 s


def litert_write(graph: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Convert ``graph`` with litert-torch at ``example``'s shape (LiteRT graphs have a fixed batch) to ``path``.

    The conversion runs in a child process (spawned, not forked, and kept for later conversions): litert-torch
    brings JAX, whose thread pools make any later ``fork`` of this process (DataLoader workers, for one) unsafe,
    and which holds about 1 GB. The graph travels as a ``torch.export`` program file."""
    global _LITERT_PROCESS
    if importlib.util.find_spec("litert_torch") is None:
        raise BackendUnavailable(f"litert needs litert_torch, which is not installed: {_EXTRA}")
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool
    with tempfile.TemporaryDirectory(prefix="edgevits-litert-") as tmp, silenced("LiteRT conversion"):
        program = Path(tmp) / "graph.pt2"
        torch.export.save(torch.export.export(graph.eval(), (example,)), program)
        if _LITERT_PROCESS is None:
            _LITERT_PROCESS = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        try:
            _LITERT_PROCESS.submit(_litert_convert, str(program), tuple(example.shape), str(path),
                                   torch.get_num_threads()).result()
        except BrokenProcessPool:
            _LITERT_PROCESS = None
            raise
        if not Path(path).is_file():
            raise RuntimeError("the litert-torch conversion wrote no file")


def _litert_convert(program: str, shape: tuple[int, ...], path: str, threads: int) -> None:
    """The child's side of ``litert_write``."""
    import litert_torch
    torch.set_num_threads(threads)
    litert_torch.convert(torch.export.load(program).module(), (torch.randn(shape),)).export(path)


def litert_runner(path: str | os.PathLike, threads: int | None = None):
    """A callable ``x -> logits`` running the ``.tflite`` file with the ai-edge-litert interpreter (XNNPACK on the
    CPU). The file's batch is fixed; another batch size resizes the interpreter's input first."""
    require("ai_edge_litert.interpreter", "litert")
    with silenced("loading the LiteRT model"):
        from ai_edge_litert.interpreter import Interpreter
        interpreter = Interpreter(model_path=str(path), num_threads=threads or torch.get_num_threads())
        interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]["index"]
    out = interpreter.get_output_details()[0]["index"]

    def run(x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to("cpu", torch.float32).contiguous().numpy()
        if tuple(interpreter.get_input_details()[0]["shape"]) != x.shape:
            interpreter.resize_tensor_input(inp, list(x.shape))
            interpreter.allocate_tensors()
        interpreter.set_tensor(inp, x)
        interpreter.invoke()
        return torch.from_numpy(interpreter.get_tensor(out).copy())
    return run


def export_litert(model: nn.Module, path: str | os.PathLike, img_size=None, check: bool = True, atol: float = 1e-4,
                  form: str | None = None, batch_size: int = 1) -> Path:
    """Write ``model`` as a LiteRT flatbuffer (``.tflite``, float32, input ``(batch_size, C, H, W)``) and check it
    against PyTorch with the LiteRT interpreter at that batch (``ExportError`` above ``atol``)."""
    path = writable_file(path)
    example = example_input(model, img_size, batch_size)
    graph = graph_form(model, form or GRAPH_FORMS["litert"], example)
    atomic_write(path, lambda tmp: litert_write(graph, example, Path(tmp)))
    if check:
        check_parity(litert_runner(path), graph, [torch.randn(*example.shape)], atol, "LiteRT output")
    return path


# --- Core ML ------------------------------------------------------------------------------------------------------

# The ML program ops an exported edgevits graph may hold, each with the first deployment target that has it (the
# MIL opsets: iOS15 = the first ML program opset). Every op of a converted model must be here, at or below the
# target: a new op from a converter update is then a failed export, not a model that fails to load on the phone.
COREML_OPS = {op: "iOS15" for op in (
    "add", "avg_pool", "batch_norm", "cast", "clip", "concat", "const", "conv", "expand_dims", "gather",
    "gelu", "instance_norm", "layer_norm", "linear", "matmul", "max_pool", "maximum", "minimum", "mul", "pow",
    "real_div", "reduce_l2_norm", "reduce_mean", "reduce_sum", "relu", "reshape", "rsqrt", "sigmoid",
    "silu", "slice_by_index", "softmax", "split", "sqrt", "squeeze", "sub", "tile", "transpose", "upsample_bilinear")}
COREML_TARGETS = ("iOS15", "iOS16", "iOS17", "iOS18")
COREML_PRECISIONS = ("float16", "float32")


def coreml_ops(package: str | os.PathLike) -> dict[str, int]:
    """Op type -> count over the main function of a saved ML program (``.mlpackage``), read from its spec."""
    ct = require("coremltools", "coreml")
    with silenced("reading the Core ML package"):
        spec = ct.utils.load_spec(str(package))
    counts: dict[str, int] = {}

    def walk(block):
        for op in block.operations:
            counts[op.type] = counts.get(op.type, 0) + 1
            for inner in op.blocks:
                walk(inner)
    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            walk(block)
    return counts


def check_coreml(package: str | os.PathLike, target: str, input_shape: tuple[int, ...], image_input: bool) -> dict:
    """What can be checked of a Core ML package on a machine that cannot run it: it loads, every op is on
    ``COREML_OPS`` for ``target``, the input (``x`` tensor or ``image``) and the ``logits`` output are named and
    shaped as documented. Returns the report; raises ``ExportError`` on the first failed check."""
    ct = require("coremltools", "coreml")
    ops = coreml_ops(package)
    order = COREML_TARGETS.index
    bad = sorted(op for op in ops if op not in COREML_OPS or order(COREML_OPS[op]) > order(target))
    if bad:
        raise ExportError(f"the Core ML program uses ops outside edgevits' list for {target}: {', '.join(bad)}")
    with silenced("reading the Core ML package"):
        spec = ct.utils.load_spec(str(package))
    inputs, outputs = spec.description.input, spec.description.output
    name = "image" if image_input else "x"
    if [i.name for i in inputs] != [name] or [o.name for o in outputs] != ["logits"]:
        raise ExportError(f"the Core ML model's features are {[i.name for i in inputs]} -> "
                          f"{[o.name for o in outputs]}, expected ['{name}'] -> ['logits']")
    if image_input:
        shape = (1, 3, inputs[0].type.imageType.height, inputs[0].type.imageType.width)
    else:
        shape = tuple(inputs[0].type.multiArrayType.shape)
    if shape != tuple(input_shape):
        raise ExportError(f"the Core ML input has shape {shape}, expected {tuple(input_shape)}")
    return {"ops": ops, "target": target, "input": name, "input_shape": list(shape),
            "numerical_parity": "not verified: Core ML does not run on this operating system"}


class _ImageInput(nn.Module):
    """Core ML image input: pixels 0..255 in, normalised with the model's mean and std inside the graph."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1) * 255)
        self.register_buffer("inv_std", 1 / (torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1) * 255))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model((image - self.mean) * self.inv_std)


def export_coreml(model: nn.Module, path: str | os.PathLike, img_size=None, form: str | None = None,
                  precision: str = "float16", target: str = "iOS16", image_input: bool = False,
                  mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), batch_size: int = 1) -> tuple[Path, dict]:
    """Write ``model`` as a Core ML ML program (``.mlpackage``) for ``target`` computing in ``precision``.

    Input ``x`` (``(batch_size, C, H, W)``, normalised), or with ``image_input`` an RGB image ``image`` of 0..255
    pixels normalised inside the program with ``mean``/``std``; output ``logits``. Returns ``(path, report)``:
    ``check_coreml``'s report (the package loads, its ops are on the list for ``target``, features as documented).
    Numerical parity is *not* verified: Core ML runs on Apple systems only (the report says so).
    """
    if precision not in COREML_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(COREML_PRECISIONS)}, got {precision!r}")
    if target not in COREML_TARGETS:
        raise ValueError(f"target must be one of {', '.join(COREML_TARGETS)}, got {target!r}")
    if image_input and (batch_size != 1 or getattr(getattr(model, "config", None), "in_chans", 3) != 3):
        raise ValueError("an image input takes one RGB image: batch size 1 and 3 input channels")
    path = Path(path).with_suffix(".mlpackage")
    if not path.is_dir():  # an earlier package is replaced, like any earlier export
        path = writable_file(path)
    example = example_input(model, img_size, batch_size)
    form = _lowerable_form(model, form, "coreml", "torch.export traces into its custom CPU kernels")
    graph = graph_form(model, form, example)
    ct = require("coremltools", "coreml")
    if image_input:
        graph = _ImageInput(graph, mean, std).eval()
        inputs = [ct.ImageType(name="image", shape=tuple(example.shape), color_layout=ct.colorlayout.RGB)]
    else:
        inputs = [ct.TensorType(name="x", shape=tuple(example.shape))]
    with silenced("Core ML conversion"):
        program = torch.export.export(graph, (example,)).run_decompositions({})
        mlmodel = ct.convert(program, inputs=inputs, outputs=[ct.TensorType(name="logits")],
                             convert_to="mlprogram", minimum_deployment_target=getattr(ct.target, target),
                             compute_precision=getattr(ct.precision, precision.upper()))
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_package(mlmodel, path)
    report = check_coreml(path, target, tuple(example.shape), image_input)
    report.update(precision=precision, form=form)
    return path, report


__all__ = ["MOBILE_FORMATS", "check_coreml", "coreml_ops", "executorch_runner", "export_coreml",
           "export_executorch", "export_litert", "litert_runner"]
