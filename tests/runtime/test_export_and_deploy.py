"""Running a model: exports with a dynamic batch axis checked against PyTorch, deploy("auto"), the timer, malloc.

Exports are the slow part (10-30 s each, whatever the input size): each family's smallest variant is exported once
per worker in each graph form (``_onnx``, ``_openvino``) and the tests share the files; a family's tests run on one
worker (xdist group)."""
import functools
import copy
import importlib
import platform
import tempfile
from pathlib import Path

import pytest
import torch

import edgevits
from edgevits.errors import ExportError
from edgevits.runtime.export import check_onnx, export_onnx, onnx_session
from edgevits.runtime.timing import time_interleaved
from edgevits.testing import assert_parity, calibrated, calibrated_variant, float64_reference

SIZE = 96  # exported graphs are checked at this input size
FAMILIES = ["efficientformer_l1", "efficientformerv2_s0", "efficientvit_m0", "swiftformer_xs"]  # smallest each


def per_family(fn):
    return pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xdist_group(f"export-{n}"))
                                            for n in FAMILIES])(fn)



@functools.cache
def _workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="edgevits-test-exports-"))


@functools.cache
def _onnx(name) -> Path:
    """The deploy form exported to ONNX (the export checks itself at batch 1 and 3)."""
    return export_onnx(calibrated_variant(name), _workdir() / f"{name}.onnx")


@functools.cache
def _openvino(name, form) -> Path:
    pytest.importorskip("openvino")
    from edgevits.runtime.export import export_openvino
    return export_openvino(calibrated_variant(name), _workdir() / f"{name}-{form}.xml", form=form)


def _batch(b, size=SIZE, seed=0):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


@per_family
def test_onnx_export_matches_pytorch_at_batch_1_and_3(name):
    model = calibrated_variant(name)
    session = onnx_session(_onnx(name))  # export_onnx checked batch 1 and 3 itself; check again here
    for b in (1, 3):
        x = _batch(b)
        with torch.no_grad():
            ref = model(x)
        out = session.run(None, {"x": x.numpy()})[0]
        assert out.shape == tuple(ref.shape)
        assert_parity(torch.from_numpy(out), ref, float64_reference(model, x), check_dependence=b > 1)
    assert not list(_onnx(name).parent.glob("*.data")), "weights must live inside the .onnx file"


@pytest.mark.xdist_group("export-swiftformer_xs")
def test_export_check_fails_loudly_on_a_wrong_graph():
    path = _onnx("swiftformer_xs")
    other = calibrated(edgevits.create_model("swiftformer_xs", img_size=SIZE), batches=1, batch_size=4, size=SIZE)
    with torch.no_grad():
        other.head.bias.add_(1.0)
    with pytest.raises(ExportError, match="differs"):
        check_onnx(edgevits.fuse_model(other), path, (3, SIZE, SIZE))


@per_family
@pytest.mark.parametrize("form", ["eval", "deploy"])
def test_openvino_runs_either_graph_form_with_the_models_outputs(name, form):
    # the eval form is the default for OpenVINO (it optimises it better than our eager-oriented deploy form); the
    # deploy form is converted from the ONNX file the ONNX Runtime test exported
    pytest.importorskip("openvino")
    import openvino as ov
    from edgevits.runtime.export import openvino_compiled
    if form == "eval":
        path = _openvino(name, "eval")  # checks batch 1 and 3 itself (ExportError)
    else:
        path = _workdir() / f"{name}-deploy.xml"
        ov.save_model(ov.convert_model(str(_onnx(name))), str(path), compress_to_fp16=False)
    model = calibrated_variant(name)
    x = _batch(2)
    with torch.no_grad():
        out = torch.from_numpy(openvino_compiled(path)(x.numpy())[0])
        assert_parity(out, model(x), float64_reference(model, x))


@pytest.mark.xdist_group("export-swiftformer_xs")
def test_deploy_auto_equals_the_model():
    model = calibrated_variant("swiftformer_xs")
    runner = edgevits.deploy(model, candidates=("eager", "eager_cl", "onnxruntime"), repeats=3)
    assert runner.backend in runner.timings_ms
    if runner.backend == "onnxruntime":  # the temporary exports: only the chosen backend's are kept
        assert [p.name for p in Path(runner.workdir).iterdir()] == ["onnxruntime"]
    else:
        assert runner.workdir is None
    for shape in [(2, 3, SIZE, SIZE), (1, 3, 64, 64)]:  # another size runs on the PyTorch deploy form
        x = torch.randn(*shape)
        with torch.no_grad():
            ref = model(x)
        assert_parity(runner(x), ref, float64_reference(model, x), check_dependence=shape[0] > 1)


def test_tune_malloc_stops_a_forward_pass_from_page_faulting_its_activations_back_in():
    import resource
    from edgevits.runtime.allocator import _GLIBC_DEFAULTS, _mallopt, malloc_tuned
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc's mallopt only")
    model = edgevits.fuse_model(edgevits.create_model("swiftformer_xs"))
    x = torch.randn(1, 3, 224, 224)

    def faults_per_pass():
        with torch.inference_mode():
            for _ in range(3):
                model(x)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(5):
                model(x)
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5

    with malloc_tuned():  # on exit, the settings in force before this test, whatever it sets inside
        assert _mallopt(_GLIBC_DEFAULTS)  # glibc's defaults (an earlier test in this process may have tuned it)
        untuned = faults_per_pass()
        if untuned < 100:  # e.g. an allocator configured by the environment (MALLOC_* variables) or THP settings
            pytest.skip(f"this process does not page-fault its activations back in even untuned ({untuned:.0f} "
                        "per pass)")
        assert edgevits.tune_malloc()
        tuned = faults_per_pass()
    assert tuned < untuned / 4, (tuned, untuned)  # measured: about 1,400 per pass untuned, 15-250 tuned


# -- failures, sizes and outputs that must not end or skew a run ---------------------------------------------------

def test_time_interleaved_drops_a_raising_runner_and_keeps_the_others():
    def bad(x):
        raise ValueError("boom")
    times, errors = time_interleaved({"ok": lambda x: x + 1, "bad": bad}, torch.zeros(2), warmup=1, repeats=3,
                                     min_repeats=3, budget_s=1.0)
    assert list(times) == ["ok"] and len(times["ok"]) == 3 and errors == {"bad": "ValueError: boom"}


def test_deploy_rejects_a_candidate_whose_output_differs_and_falls_back(monkeypatch):
    deploy_module = importlib.import_module("edgevits.runtime.choose")
    real = deploy_module.make_runner

    def make(model, name, example, *args, **kwargs):
        runner = real(model, name, example, *args, **kwargs)
        if name != "eager_cl":
            return runner
        return lambda x: runner(x) + (x.shape[0] == 2)  # right at batch 1, wrong at batch 2
    monkeypatch.setattr(deploy_module, "make_runner", make)
    runner = edgevits.deploy(calibrated_variant("swiftformer_xs"), candidates=("eager_cl", "eager"), img_size=64,
                             repeats=3)
    assert runner.backend == "eager" and "eager_cl" not in runner.timings_ms
    assert "differs" in runner.rejected["eager_cl"]


def test_deploy_follows_the_model_dtype_and_keeps_graph_backends_to_cpu_float32():
    model = edgevits.create_model("swiftformer_xs", img_size=64).eval().to(torch.bfloat16)
    runner = edgevits.deploy(model, candidates=("eager", "onnxruntime"), img_size=64, repeats=3)
    assert runner.backend == "eager" and "float32 only" in runner.rejected["onnxruntime"]
    x = torch.randn(2, 3, 64, 64, dtype=torch.bfloat16)
    assert runner(x).dtype == torch.bfloat16


@pytest.mark.xdist_group("export-swiftformer_xs")
def test_deploy_reports_progress_and_reuses_its_exported_graph_for_the_same_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEVITS_CACHE", str(tmp_path / "cache"))
    export_module = importlib.import_module("edgevits.runtime.export")
    exported = []
    real = export_module._export_to
    monkeypatch.setattr(export_module, "_export_to", lambda model, *a: exported.append(1) or real(model, *a))
    model = copy.deepcopy(calibrated_variant("swiftformer_xs"))
    steps = []
    kwargs = dict(candidates=("eager", "onnxruntime"), img_size=64, repeats=3)
    first = edgevits.deploy(model, progress=lambda *step: steps.append(step), **kwargs)
    assert [s[:2] for s in steps] == [(0, 3), (1, 3), (2, 3), (3, 3)] and steps[-1][2] == f"chose {first.backend}"
    assert "onnxruntime" in steps[1][2] and len(exported) == 1
    second = edgevits.deploy(model, **kwargs)  # the same weights: the graph comes from the cache, checked again
    assert len(exported) == 1 and "onnxruntime" in second.timings_ms
    with torch.no_grad():
        model.head.bias.add_(1.0)  # other weights: another graph
    third = edgevits.deploy(model, **kwargs)
    assert len(exported) == 2 and "onnxruntime" in third.timings_ms
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_parity(third(x), model(x), float64_reference(model, x))
