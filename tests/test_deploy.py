"""The main job's parts: bench outputs, exports with a dynamic batch axis, deploy("auto"), the CLI."""
import csv
import json

import numpy as np
import pytest
import torch

import edgevits
from edgevits.bench import BenchSpec, run_bench, write_outputs
from edgevits.cli import main
from edgevits.export import ExportError, check_onnx, export_onnx, onnx_session
from edgevits.testing import calibrated


def _smallest_per_family():
    best = {}
    for name in edgevits.list_models():
        entry = edgevits.get_entry(name)
        if entry.family not in best or entry.published["params_m"] < edgevits.get_entry(best[entry.family]).published[
                "params_m"]:
            best[entry.family] = name
    return sorted(best.values())


def _calibrated(name):
    return calibrated(edgevits.create_model(name), batches=1, batch_size=4)


@pytest.mark.parametrize("name", _smallest_per_family())
def test_onnx_export_matches_pytorch_at_batch_1_and_3(name, tmp_path):
    model = _calibrated(name)
    path = export_onnx(model, tmp_path / f"{name}.onnx")  # checks batch 1 and 3 itself; check again here
    session = onnx_session(path)
    for b in (1, 3):
        x = torch.randn(b, 3, 224, 224)
        with torch.no_grad():
            ref = model(x).numpy()
        out = session.run(None, {"x": x.numpy()})[0]
        assert out.shape == ref.shape
        assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()
    assert not list(tmp_path.glob("*.data")), "weights must live inside the .onnx file"


def test_export_check_fails_loudly_on_a_wrong_graph(tmp_path):
    model = _calibrated("swiftformer_xs")
    path = export_onnx(model, tmp_path / "m.onnx")
    other = _calibrated("swiftformer_xs")
    with torch.no_grad():
        other.head.bias.add_(1.0)
    with pytest.raises(ExportError, match="differs"):
        check_onnx(edgevits.fuse_model(other), path, (3, 224, 224))


def test_openvino_export_round_trip(tmp_path):
    pytest.importorskip("openvino")
    assert main(["export", "swiftformer_xs", "--format", "openvino", "-o", str(tmp_path / "sf.xml")]) == 0
    assert (tmp_path / "sf.xml").exists() and (tmp_path / "sf.bin").exists()


def test_deploy_auto_equals_the_model():
    model = _calibrated("swiftformer_xs")
    runner = edgevits.deploy(model, candidates=("eager", "eager_cl", "onnxruntime"), repeats=3)
    assert runner.backend in runner.timings_ms
    for shape in [(2, 3, 224, 224), (1, 3, 160, 160)]:  # another size runs on the PyTorch deploy form
        x = torch.randn(*shape)
        with torch.no_grad():
            ref = model(x)
        out = runner(x)
        assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


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
    rows = list(csv.DictReader(paths["csv"].open()))
    assert len(rows) == len(recs) and float(rows[0]["median_ms"]) > 0
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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


def test_cli_export_with_a_checkpoint(tmp_path, capsys):
    ckpt = edgevits.save_checkpoint(_calibrated("swiftformer_xs"), tmp_path / "w")
    assert main(["export", "swiftformer_xs", "--checkpoint", str(ckpt), "--img-size", "256",
                 "-o", str(tmp_path / "m.onnx")]) == 0
    session = onnx_session(tmp_path / "m.onnx")
    assert session.run(None, {"x": np.zeros((2, 3, 256, 256), np.float32)})[0].shape == (2, 1000)
