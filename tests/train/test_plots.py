"""metrics.png after a run, the confusion matrix of an evaluation, and ``edgevits eval --confusion``."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from edgevits.cli import main
from edgevits.errors import DataError
from edgevits.testing import IMAGE_CLASSES
from edgevits.train import TrainConfig, read_metrics, train
from edgevits.train.evaluate import confusion_matrix, evaluate, per_class_accuracy
from edgevits.train.plots import plot_confusion, plot_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path, min_width: int = 400) -> None:
    """``path`` is a complete PNG picture of a readable size."""
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as im:
        im.load()  # decodes every byte: a truncated file fails here
        assert im.format == "PNG" and im.width >= min_width and im.height >= 300


@pytest.fixture(scope="module")
def run(image_folder, tmp_path_factory) -> Path:
    """The output folder of one short run (swiftformer_xs at 32x32, one epoch, 8 images per step)."""
    out = tmp_path_factory.mktemp("run")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(TrainConfig(data=str(image_folder), model="swiftformer_xs", img_size=32, epochs=1, batch_size=8,
                          lr=2e-3, output=str(out), workers=0, progress=False, warmup_epochs=0))
    finally:
        torch.set_num_threads(before)
    return out


def test_a_run_leaves_metrics_png_beside_its_metrics(run):
    assert [r["epoch"] for r in read_metrics(run / "metrics.jsonl")] == [1]
    assert_png(run / "metrics.png", min_width=1000)
    assert not list(run.glob(".*.tmp"))  # written atomically: no temporary file left


def test_metrics_png_is_redrawn_from_the_rows_and_needs_some(run, tmp_path):
    rows = [{"epoch": e, "train_loss": 2.0 / e, "val_top1": top1, "val_top5": 0.9, "lr": 1e-3 / e,
             "weights": "ema", "val_top1_raw": top1 - 0.05} for e, top1 in ((1, 0.3), (2, 0.6), (3, 0.5))]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert plot_metrics(tmp_path) == tmp_path / "metrics.png"  # (no config.json: still drawn)
    assert_png(tmp_path / "metrics.png", min_width=1000)
    with pytest.raises(DataError, match="holds no epochs"):
        plot_metrics(tmp_path / "elsewhere")


def test_the_confusion_matrix_counts_true_classes_down_and_predictions_across():
    targets = torch.tensor([0, 0, 1, 2, 2, 2])
    predictions = torch.tensor([0, 1, 1, 2, 0, 2])
    counts = confusion_matrix(targets, predictions, 4)
    assert counts.tolist() == [[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 2, 0], [0, 0, 0, 0]]
    rows = per_class_accuracy(counts, ["a", "b", "c", "d"])
    assert rows == [{"class": "a", "images": 2, "correct": 1, "accuracy": 0.5},
                    {"class": "b", "images": 1, "correct": 1, "accuracy": 1.0},
                    {"class": "c", "images": 3, "correct": 2, "accuracy": 2 / 3},
                    {"class": "d", "images": 0, "correct": 0, "accuracy": None}]
    with pytest.raises(ValueError, match="0..3"):
        confusion_matrix(targets, torch.tensor([0, 1, 1, 2, 0, 4]), 4)


class _Predicts(nn.Module):
    """A 'model' whose top-1 is the class written in its input's first value."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(x[:, 0].long(), 3).float()


def test_evaluate_sums_the_confusion_of_its_top1_predictions(tmp_path):
    batches = [(torch.tensor([[0.0], [1.0], [2.0]]), torch.tensor([0, 1, 1]), 0),
               (None, None, 2),  # a batch of unreadable images only: counted as skipped, not in the matrix
               (torch.tensor([[2.0], [0.0]]), torch.tensor([2, 2]), 1)]
    res = evaluate(_Predicts(), batches, torch.device("cpu"), num_classes=3)
    assert res["confusion"].tolist() == [[1, 0, 0], [0, 1, 1], [1, 0, 1]]
    assert res["images"] == 5 and res["skipped"] == 3 and res["top1"] == pytest.approx(3 / 5)
    assert "confusion" not in evaluate(_Predicts(), batches, torch.device("cpu"))  # only when asked
    plot_confusion(res["confusion"], list(IMAGE_CLASSES), tmp_path / "c.png")
    assert_png(tmp_path / "c.png")


def test_eval_confusion_writes_the_png_and_the_per_class_numbers(run, image_folder, tmp_path, capsys):
    png = tmp_path / "plots" / "out.png"  # (its folder is made)
    common = ["eval", "--data", str(image_folder), "--checkpoint", str(run), "--workers", "0", "--threads", "1"]
    assert main(common + ["--confusion", str(png), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert_png(png)
    assert res["classes"] == list(IMAGE_CLASSES) and res["confusion_plot"] == str(png)
    counts = res["confusion"]
    assert sum(map(sum, counts)) == res["images"] == 12
    assert sum(counts[i][i] for i in range(3)) / res["images"] == pytest.approx(res["val_top1"])
    for i, row in enumerate(res["per_class"]):
        assert row["class"] == IMAGE_CLASSES[i] and row["images"] == sum(counts[i]) == 4
        assert row["correct"] == counts[i][i] and row["accuracy"] == pytest.approx(counts[i][i] / 4)
    assert main(common + ["--confusion", str(png)]) == 0  # the table
    out = capsys.readouterr().out
    assert "accuracy per class" in out and all(name in out for name in IMAGE_CLASSES)
    assert main(common + ["--json"]) == 0  # without --confusion: the JSON as before
    assert not {"confusion", "per_class", "classes"} & set(json.loads(capsys.readouterr().out.splitlines()[-1]))


@pytest.mark.parametrize("where, message", [("folder", "is a folder"), ("out.jpg", "expected a .png path")])
def test_eval_confusion_checks_its_path_before_evaluating(tmp_path, capsys, where, message):
    path = tmp_path if where == "folder" else tmp_path / where
    # (the checkpoint does not exist: the --confusion path is refused before it is looked at)
    assert main(["eval", "--data", str(tmp_path), "--checkpoint", str(tmp_path / "missing.safetensors"),
                 "--confusion", str(path)]) == 2
    err = capsys.readouterr().err
    assert "--confusion" in err and message in err and not (tmp_path / "out.jpg").exists()
