"""``edgevits predict`` and ``edgevits.predict``: a checkpoint trained here names the classes of its own training
images with the class names it recorded; undecodable files are skipped with a line; published weights bring
ImageNet-1k's names; offline, the command says in one line where to put the weights."""
from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

import edgevits
from edgevits.cli import main
from edgevits.testing import IMAGE_CLASSES, make_image_folder
from edgevits.train import TrainConfig, train


@pytest.fixture
def own_cache(monkeypatch, tmp_path):
    """edgevits' cache (and its drop-in folder for weights) in ``tmp_path``; the hub offline by setting, and any
    connection beyond 127.0.0.1 a failure of the test."""
    from huggingface_hub import constants
    real_connect, tried = socket.socket.connect, []

    def connect(sock, address):
        if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "::1"):
            tried.append(address[0])
            raise OSError(f"test: no network beyond 127.0.0.1 ({address[0]})")
        return real_connect(sock, address)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setenv("EDGEVITS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    yield tmp_path / "cache"
    assert not tried, f"the test connected to {tried}"


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_predict_names_the_trained_classes_and_skips_an_undecodable_file(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data")
    run = tmp_path / "run"
    train(TrainConfig(data=str(data), model="swiftformer_xs", img_size=32, epochs=6, batch_size=8, lr=3e-3,
                      output=str(run), workers=0, progress=False, warmup_epochs=0, randaugment="none", mixup=0.0,
                      cutmix=0.0, reprob=0.0, hflip=0.0, scale_min=0.5, ema_decay=0.0, color_jitter=0.0,
                      clip_grad=None, smoothing=0.0, weight_decay=0.0))
    stored = json.loads((run / "best.json").read_text())
    assert stored["classes"] == list(IMAGE_CLASSES)
    assert stored["data_config"]["input_size"] == [3, 32, 32] and stored["data_config"]["crop_pct"] == 0.875
    images = tmp_path / "images"
    shutil.copytree(data / "train", images)
    (images / "circle" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    assert main(["predict", str(images), "--checkpoint", str(run), "--json", "--topk", "2"]) == 0
    out, err = capsys.readouterr()
    rows = _json_lines(out)
    assert len(rows) == 3 * 8 and all(len(r["top"]) == 2 for r in rows)
    right = sum(Path(r["image"]).parent.name == r["top"][0]["label"] for r in rows)
    assert right / len(rows) >= 0.75, f"{right} of {len(rows)} training images named right"
    assert err.count("skipped") == 1 and "broken.png" in err and "cannot decode" in err
    assert main(["predict", str(images / "square" / "0.png"), "--checkpoint", str(run / "best.safetensors")]) == 0
    assert "square" in capsys.readouterr().out  # the table, with the class names the checkpoint recorded


def test_published_weights_bring_imagenet_names_on_real_photographs(own_cache, tmp_path, capsys):
    """A smoke run on two real photographs (scikit-learn's sample images) with RANDOM weights placed in the drop-in
    folder as the default published weights: it shows that ImageNet-1k's class names, the table and the JSON
    output work, not that any prediction is right."""
    datasets = pytest.importorskip("sklearn.datasets")
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, arr in enumerate(datasets.load_sample_images().images):
        Image.fromarray(arr).save(photos / f"photo{i}.jpg")
    weights = own_cache / "weights"
    weights.mkdir(parents=True)
    save_file(edgevits.create_model("efficientvit_m0").state_dict(), weights / "efficientvit_m0.r224_in1k.safetensors")
    assert main(["predict", str(photos), "--model", "efficientvit_m0", "--pretrained", "--json", "--topk", "3"]) == 0
    rows = _json_lines(capsys.readouterr().out)
    names = set(edgevits.imagenet_classes())
    assert [Path(r["image"]).name for r in rows] == ["photo0.jpg", "photo1.jpg"]
    for r in rows:
        probs = [t["probability"] for t in r["top"]]
        assert all(t["label"] in names for t in r["top"]) and probs == sorted(probs, reverse=True) and sum(probs) <= 1
    assert main(["predict", str(photos / "photo0.jpg"), "--model", "efficientvit_m0", "--pretrained"]) == 0
    table = capsys.readouterr().out
    assert "efficientvit_m0 (eager; 224x224, resize 0.875 crop, bicubic)" in table and "probability" in table
    results = edgevits.predict(photos, "efficientvit_m0", pretrained=True, topk=1)
    assert [p.top[0][1] in names for p in results] == [True, True]


def test_predict_offline_without_the_weights_is_one_line_naming_where_to_put_them(own_cache, tmp_path, capsys):
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(img)
    assert main(["predict", str(img), "--model", "efficientvit_m0", "--pretrained"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("edgevits predict: error: could not download")
    assert "timm/efficientvit_m0.r224_in1k/resolve/main/model.safetensors" in err
    assert str(own_cache / "weights" / "efficientvit_m0.r224_in1k.safetensors") in err
    assert main(["predict", str(tmp_path / "missing.png"), "--model", "efficientvit_m0"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    assert main(["predict", str(tmp_path / "bad.jpg"), "--model", "efficientvit_m0"]) == 2
    assert "none of the 1 files" in capsys.readouterr().err


def test_train_eval_and_bench_take_the_published_weights_and_their_preprocessing(own_cache, tmp_path, capsys,
                                                                                   monkeypatch):
    from edgevits.measure import bench
    weights = own_cache / "weights"
    weights.mkdir(parents=True)
    save_file(edgevits.create_model("swiftformer_xs").state_dict(), weights / "swiftformer_xs.dist_in1k.safetensors")
    data = make_image_folder(tmp_path / "data", n_train=2, n_val=1)
    assert main(["train", "--data", str(data), "--model", "swiftformer_xs", "--pretrained", "--img-size", "32",
                 "--epochs", "1", "--batch-size", "6", "--workers", "0", "--no-progress",
                 "--output", str(tmp_path / "run")]) == 0
    assert "classifier reset" in capsys.readouterr().out  # 1000 ImageNet classes -> the folder's 3
    saved = json.loads((tmp_path / "run" / "best.json").read_text())
    assert saved["train_config"]["pretrained"] == "dist_in1k"
    assert saved["data_config"]["crop_pct"] == 0.95 and saved["data_config"]["input_size"] == [3, 32, 32]
    assert main(["eval", "--data", str(data), "--model", "swiftformer_xs", "--pretrained"]) == 2
    assert "n01440764" in capsys.readouterr().err  # published weights want ImageNet's class folders
    built = []
    monkeypatch.setattr(bench, "measure_peak_gflops", lambda *a, **k: None)  # (seconds; not what is tested here)
    monkeypatch.setattr(bench, "create_model", lambda *a, **k: built.append(k) or edgevits.create_model(*a, **k))
    assert main(["bench", "swiftformer_xs", "--pretrained", "--img-size", "64", "--batch-sizes", "1", "--backends",
                 "eager", "--repeats", "3", "--warmup", "1", "--budget", "0.2", "--out", str(tmp_path / "b")]) == 0
    assert built == [{"img_size": 64, "pretrained": True}]
    assert main(["bench", "swiftformer_xs", "--pretrained", "nope", "--out", str(tmp_path / "b2")]) == 2
    assert "no weights tagged 'nope'" in capsys.readouterr().err
