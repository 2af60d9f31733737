"""The main job's parts: bench outputs, exports with a dynamic batch axis, deploy("auto"), the CLI.

Exports are the slow part (10-30 s each, whatever the input size): each family's smallest variant is exported once
per worker in each graph form (``_onnx``, ``_openvino``) and the tests share the files; a family's tests run on one
worker (xdist group)."""
import csv
import functools
import importlib
import json
import platform
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

import edgevits
from edgevits import bench
from edgevits.bench import BenchSpec, run_bench, time_interleaved, write_outputs
from edgevits.cli import main
from edgevits.export import ExportError, check_onnx, export_onnx, onnx_session
from edgevits.testing import assert_parity, calibrated, float64_reference

SIZE = 96  # exported graphs are checked at this input size
FAMILIES = ["efficientformer_l1", "efficientformerv2_s0", "efficientvit_m0", "swiftformer_xs"]  # smallest each


def per_family(fn):
    return pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xdist_group(f"export-{n}"))
                                            for n in FAMILIES])(fn)


@functools.cache
def _calibrated(name, size=SIZE):
    return calibrated(edgevits.create_model(name, img_size=size), batches=1, batch_size=4, size=size)


@functools.cache
def _workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="edgevits-test-exports-"))


@functools.cache
def _onnx(name) -> Path:
    """The deploy form exported to ONNX (the export checks itself at batch 1 and 3)."""
    return export_onnx(_calibrated(name), _workdir() / f"{name}.onnx")


@functools.cache
def _openvino(name, form) -> Path:
    pytest.importorskip("openvino")
    from edgevits.export import export_openvino
    return export_openvino(_calibrated(name), _workdir() / f"{name}-{form}.xml", form=form)


def _batch(b, size=SIZE, seed=0):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


@per_family
def test_onnx_export_matches_pytorch_at_batch_1_and_3(name):
    model = _calibrated(name)
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
    from edgevits.export import openvino_compiled
    if form == "eval":
        path = _openvino(name, "eval")  # checks batch 1 and 3 itself (ExportError)
    else:
        path = _workdir() / f"{name}-deploy.xml"
        ov.save_model(ov.convert_model(str(_onnx(name))), str(path), compress_to_fp16=False)
    model = _calibrated(name)
    x = _batch(2)
    with torch.no_grad():
        out = torch.from_numpy(openvino_compiled(path)(x.numpy())[0])
        assert_parity(out, model(x), float64_reference(model, x))


@pytest.mark.xdist_group("export-cli")
def test_cli_exports_to_openvino_with_a_checkpoint_at_another_size(tmp_path):
    pytest.importorskip("openvino")
    from edgevits.export import openvino_compiled
    ckpt = edgevits.save_checkpoint(_calibrated("efficientformer_l1"), tmp_path / "w")
    assert main(["export", "efficientformer_l1", "--format", "openvino", "--checkpoint", str(ckpt),
                 "--img-size", "128", "-o", str(tmp_path / "l1.xml")]) == 0
    assert (tmp_path / "l1.xml").exists() and (tmp_path / "l1.bin").exists()
    out = openvino_compiled(tmp_path / "l1.xml")(np.zeros((2, 3, 128, 128), np.float32))[0]
    assert out.shape == (2, 1000)  # the batch axis stays dynamic


@pytest.mark.xdist_group("export-swiftformer_xs")
def test_deploy_auto_equals_the_model():
    model = _calibrated("swiftformer_xs")
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


def test_bench_writes_well_formed_json_csv_and_png(tmp_path):
    spec = BenchSpec(models=["swiftformer_xs"], img_size=64, batch_sizes=(1, 2), backends=("eager", "eager_cl"),
                     warmup=1, repeats=3, min_repeats=2, budget_s=0.5, compare="timm")
    result = run_bench(spec)
    paths = write_outputs(result, tmp_path)
    data = json.loads(paths["json"].read_text())
    recs = data["records"]
    assert {(r["source"], r["backend"], r["batch"]) for r in recs} == {
        (s, b, n) for s in ("edgevits", "timm") for b in ("eager", "eager_cl") for n in (1, 2)}
    for r in recs:
        assert r["median_ms"] > 0 and r["p10_ms"] <= r["median_ms"] <= r["p90_ms"] and r["runs"] >= 2
        assert r["gmacs"] > 0 and r["params_m"] == pytest.approx(3.475, abs=1e-3)
    ours = [r for r in recs if r["source"] == "edgevits"]
    assert all(r["timm_over_ours"] > 0 for r in ours)
    assert data["machine"]["peak_gflops_measured"] > 0 and "batch1" in data["summary"]
    assert data["machine"]["malloc_tuned"] is (platform.libc_ver()[0] == "glibc")  # applied by default on glibc
    rows = list(csv.DictReader(paths["csv"].open()))
    assert len(rows) == len(recs) and float(rows[0]["median_ms"]) > 0
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tune_malloc_stops_a_forward_pass_from_page_faulting_its_activations_back_in():
    import resource
    from edgevits.allocator import _GLIBC_DEFAULTS, _mallopt
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

    assert _mallopt(_GLIBC_DEFAULTS)  # glibc's defaults (an earlier test in this process may have tuned it)
    untuned = faults_per_pass()
    if untuned < 100:  # e.g. an allocator configured by the environment (MALLOC_* variables) or THP settings
        edgevits.tune_malloc()
        pytest.skip(f"this process does not page-fault its activations back in even untuned ({untuned:.0f} per pass)")
    assert edgevits.tune_malloc()
    tuned = faults_per_pass()
    assert tuned < untuned / 4, (tuned, untuned)  # measured: about 1,400 per pass untuned, 15-250 tuned


def test_bench_rejects_unknown_names_before_doing_work():
    with pytest.raises(KeyError, match="unknown model"):
        run_bench(BenchSpec(models=["swiftformer_xxl"]))
    with pytest.raises(ValueError, match="unknown backend"):
        run_bench(BenchSpec(models=["swiftformer_xs"], backends=("tensorrt",)))


def test_cli_models_and_bench(tmp_path, capsys):
    assert main(["models", "swiftformer_*"]) == 0
    out = capsys.readouterr().out
    assert "swiftformer_xs" in out and "3.475" in out and "0.602" in out
    assert main(["bench", "swiftformer_xs", "--img-size", "64", "--batch-sizes", "1", "--backends", "eager",
                 "--repeats", "3", "--warmup", "1", "--budget", "0.2", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "bench.json").exists() and "bench.csv" in capsys.readouterr().out


# -- failures, sizes and outputs that must not end or skew a run ---------------------------------------------------

def _failing_on(backend, after_calls):
    """A ``make_runner`` stand-in whose ``backend`` runners raise once called more than ``after_calls`` times."""
    real = bench.make_runner

    def make(model, name, example, *args, **kwargs):
        runner = real(model, name, example, *args, **kwargs)
        if name != backend:
            return runner
        calls = []

        def run(x):
            calls.append(1)
            if len(calls) > after_calls:
                raise RuntimeError("simulated backend crash")
            return runner(x)
        return run
    return make


def test_a_runner_failing_while_timed_is_recorded_and_the_rest_still_written(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "make_runner", _failing_on("eager_cl", after_calls=2))  # passes warm-up only
    spec = BenchSpec(models=["swiftformer_xs"], img_size=64, batch_sizes=(1,), backends=("eager_cl", "eager"),
                     warmup=1, repeats=3, min_repeats=2, budget_s=0.2)
    paths = write_outputs(run_bench(spec), tmp_path)
    recs = {r["backend"]: r for r in json.loads(paths["json"].read_text())["records"]}
    assert recs["eager_cl"]["status"] == "failed" and "simulated backend crash" in recs["eager_cl"]["note"]
    assert "median_ms" not in recs["eager_cl"]
    assert recs["eager"]["status"] == "ok" and recs["eager"]["median_ms"] > 0 and recs["eager"]["runs"] >= 2
    rows = {r["backend"]: r for r in csv.DictReader(paths["csv"].open())}
    assert rows["eager_cl"]["status"] == "failed" and "simulated backend crash" in rows["eager_cl"]["note"]
    assert paths["png"].exists()


def test_time_interleaved_drops_a_raising_runner_and_keeps_the_others():
    def bad(x):
        raise ValueError("boom")
    times, errors = time_interleaved({"ok": lambda x: x + 1, "bad": bad}, torch.zeros(2), warmup=1, repeats=3,
                                     min_repeats=3, budget_s=1.0)
    assert list(times) == ["ok"] and len(times["ok"]) == 3 and errors == {"bad": "ValueError: boom"}


def test_bench_compare_timm_at_another_size_builds_timm_for_that_size_or_records_a_skip(tmp_path):
    ref, ours = bench._timm_twin("efficientformerv2_s0", 96)  # same weights, both built for 96
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert_parity(ours(x), ref(x), float64_reference(ref, x))
    spec = BenchSpec(models=["efficientformerv2_s0", "efficientformer_l1"], img_size=96, batch_sizes=(1,),
                     backends=("eager",), warmup=0, repeats=2, min_repeats=1, budget_s=0.05, compare="timm")
    recs = {(r["model"], r["source"]): r for r in run_bench(spec)["records"]}
    assert recs[("efficientformerv2_s0", "timm")]["status"] == "ok"
    assert recs[("efficientformerv2_s0", "edgevits")]["timm_over_ours"] > 0
    skipped = recs[("efficientformer_l1", "timm")]  # timm's V1 fixes its attention bias at 224x224
    assert skipped["status"] == "skipped" and "96x96" in skipped["note"]
    assert recs[("efficientformer_l1", "edgevits")]["status"] == "ok"


def test_compare_timm_without_timm_fails_at_the_start_with_the_install_hint(monkeypatch, capsys):
    import edgevits.testing

    def missing():
        raise ModuleNotFoundError("No module named 'timm'")
    monkeypatch.setattr(edgevits.testing, "import_timm", missing)
    with pytest.raises(ImportError, match="pip install timm --no-deps"):
        run_bench(BenchSpec(models=["swiftformer_xs"], compare="timm"))
    assert main(["bench", "swiftformer_xs", "--compare", "timm"]) == 2
    assert "pip install timm --no-deps" in capsys.readouterr().err


def test_csv_columns_have_a_fixed_order_whatever_the_first_record(tmp_path):
    ok = dict(model="m", family="f", source="edgevits", backend="eager", batch=1, status="ok", median_ms=1.0,
              p10_ms=0.9, p90_ms=1.1, runs=3, top1=70.0, zeta=1)
    failed = dict(model="m", family="f", source="timm", backend="onnxruntime", batch=1, status="failed",
                  note="RuntimeError: x", alpha=2)
    headers = []
    for records in ([failed, ok], [ok, failed]):
        path = write_outputs({"machine": {}, "records": records}, tmp_path / str(len(headers)))["csv"]
        headers.append(path.read_text().splitlines()[0].split(","))
    assert headers[0] == headers[1]
    assert headers[0][:len(bench.COLUMNS)] == list(bench.COLUMNS) and headers[0][-2:] == ["alpha", "zeta"]
    assert headers[0][:6] == ["model", "family", "source", "backend", "batch", "img_size"]


def test_peak_is_measured_in_the_bench_dtype(monkeypatch):
    seen = []

    def fake_peak(threads=None, n=None, repeats=8, device="cpu", dtype=torch.float32, budget_s=2.0):
        seen.append((device, dtype))
        return 1000.0
    monkeypatch.setattr(bench, "measure_peak_gflops", fake_peak)
    spec = BenchSpec(models=["swiftformer_xs"], img_size=64, batch_sizes=(1,), backends=("eager",),
                     dtype="bfloat16", warmup=0, repeats=2, min_repeats=1, budget_s=0.05)
    result = run_bench(spec)
    assert set(seen) == {("cpu", torch.bfloat16)}
    assert result["records"][0]["peak_fraction"] == pytest.approx(result["records"][0]["gflops_per_s"] / 1000)
    assert bench.measure_peak_gflops(n=256, repeats=2, dtype=torch.bfloat16) > 0


def test_deploy_rejects_a_candidate_whose_output_differs_and_falls_back(monkeypatch):
    deploy_module = importlib.import_module("edgevits.deploy")  # the package exports deploy() under that name
    real = deploy_module.make_runner

    def make(model, name, example, *args, **kwargs):
        runner = real(model, name, example, *args, **kwargs)
        if name != "eager_cl":
            return runner
        return lambda x: runner(x) + (x.shape[0] == 2)  # right at batch 1, wrong at batch 2
    monkeypatch.setattr(deploy_module, "make_runner", make)
    runner = edgevits.deploy(_calibrated("swiftformer_xs"), candidates=("eager_cl", "eager"), img_size=64, repeats=3)
    assert runner.backend == "eager" and "eager_cl" not in runner.timings_ms
    assert "differs" in runner.rejected["eager_cl"]


def test_deploy_follows_the_model_dtype_and_keeps_graph_backends_to_cpu_float32():
    model = edgevits.create_model("swiftformer_xs", img_size=64).eval().to(torch.bfloat16)
    runner = edgevits.deploy(model, candidates=("eager", "onnxruntime"), img_size=64, repeats=3)
    assert runner.backend == "eager" and "float32 only" in runner.rejected["onnxruntime"]
    x = torch.randn(2, 3, 64, 64, dtype=torch.bfloat16)
    assert runner(x).dtype == torch.bfloat16
