"""``edgevits bench``: its outputs, the timm twin, and failures that must not end or skew a run."""
import csv
import json
import platform

import pytest
import torch

from edgevits.measure import bench
from edgevits.measure.bench import BenchSpec, run_bench, write_outputs
from edgevits.measure.reference import timm_twin
from edgevits.testing import assert_parity, float64_reference


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


def test_bench_rejects_unknown_names_before_doing_work():
    with pytest.raises(KeyError, match="unknown model"):
        run_bench(BenchSpec(models=["swiftformer_xxl"]))
    with pytest.raises(ValueError, match="unknown backend"):
        run_bench(BenchSpec(models=["swiftformer_xs"], backends=("tensorrt",)))


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


def test_bench_compare_timm_at_another_size_builds_timm_for_that_size_or_records_a_skip(tmp_path):
    ref, ours = timm_twin("efficientformerv2_s0", 96)  # same weights, both built for 96
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
    real, seen = bench.measure_peak_gflops, []

    def fake_peak(threads=None, n=None, repeats=8, device="cpu", dtype=torch.float32, budget_s=2.0):
        seen.append((device, dtype))
        return 1000.0
    monkeypatch.setattr(bench, "measure_peak_gflops", fake_peak)
    spec = BenchSpec(models=["swiftformer_xs"], img_size=64, batch_sizes=(1,), backends=("eager",),
                     dtype="bfloat16", warmup=0, repeats=2, min_repeats=1, budget_s=0.05)
    result = run_bench(spec)
    assert set(seen) == {("cpu", torch.bfloat16)}
    assert result["records"][0]["peak_fraction"] == pytest.approx(result["records"][0]["gflops_per_s"] / 1000)
    assert real(n=256, repeats=2, dtype=torch.bfloat16) > 0
    assert real(n=8, repeats=2, dtype=torch.bool) is None  # no matmul kernel for bool


def test_bench_tunes_malloc_for_its_run_only_and_restores_what_was_in_force(monkeypatch):
    from edgevits.runtime import allocator
    calls = []
    monkeypatch.setattr(allocator, "_mallopt", lambda settings: calls.append(dict(settings)) or True)
    monkeypatch.setattr(allocator, "_in_force", None)  # nothing set yet: glibc's defaults
    monkeypatch.setattr(bench, "measure_peak_gflops", lambda *args, **kwargs: None)
    spec = BenchSpec(models=["swiftformer_xs"], img_size=64, batch_sizes=(1,), backends=("eager",), warmup=0,
                     repeats=1, min_repeats=1, budget_s=0.05)
    assert run_bench(spec)["machine"]["malloc_tuned"] is True
    assert calls == [allocator._TUNED, allocator._GLIBC_DEFAULTS]
    calls.clear()
    assert allocator.tune_malloc()  # the explicit process-wide call: a bench run afterwards leaves it in force
    assert run_bench(spec)["machine"]["malloc_tuned"] is True
    assert calls == [allocator._TUNED] * 3 and allocator._in_force == allocator._TUNED
    calls.clear()
    spec.tune_malloc = False
    assert run_bench(spec)["machine"]["malloc_tuned"] is False and calls == []
