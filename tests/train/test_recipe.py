"""The recipe a run's unset settings come from: auto (scaled to the run) or the papers'; fine-tuning's learning
rates and frozen epochs."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from edgevits.testing import make_image_folder
from edgevits.train import TrainConfig, train
from edgevits.train.optim import param_groups
from edgevits.train.recipe import PAPER, PAPER_SCALE, auto, paper, settle, strength


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"data": "d", "model": "swiftformer_xs", "img_size": 32, **kw})


def test_the_augmentation_strength_grows_with_the_images_a_run_sees():
    assert strength(4_000 * 10) == 0 and strength(1e5) == 0
    assert strength(PAPER_SCALE) == 1 and strength(10 * PAPER_SCALE) == 1
    assert 0 < strength(1e6) < strength(1e7) < 1


def test_auto_for_a_small_short_run_turns_the_imagenet_augmentation_off():
    values, why = auto(n_train=4_000, epochs=10, world_size=1, finetune=False)
    assert values["batch_size"] == 64 and values["randaugment"] == "none"
    assert values["mixup"] == values["cutmix"] == values["reprob"] == 0 and values["scale_min"] == 0.8
    assert values["backbone_lr_scale"] == 1.0 and "40,000 seen" in why[0]
    tiny, _ = auto(n_train=90, epochs=2, world_size=1, finetune=False)
    assert tiny["batch_size"] == 8  # several steps per epoch even on 90 images


def test_at_the_papers_scale_auto_is_the_papers_recipe():
    values, _ = auto(n_train=1_281_167, epochs=300, world_size=8, finetune=False)
    for key in ("randaugment", "mixup", "cutmix", "reprob", "scale_min", "ema_decay"):
        assert values[key] == PAPER[key], key
    assert values["lr"] == pytest.approx(1e-3 * 128 * 8 / 1024)
    lrs = [auto(n_train=1_281_167, epochs=e, world_size=8, finetune=False)[0]["lr"] for e in (1, 30, 299, 300)]
    assert lrs[-2] == pytest.approx(lrs[-1], rel=0.01) and lrs == sorted(lrs, reverse=True)  # no jump at the end


def test_given_settings_win_and_the_log_says_what_was_decided_and_about_flips():
    cfg, lines = settle(_cfg(epochs=10, lr=5e-3, hflip=0.0), n_train=4_000, world_size=1)
    assert cfg.lr == 5e-3 and cfg.hflip == 0.0 and cfg.batch_size == 64
    text = "\n".join(lines)
    assert "given: lr 0.005, hflip 0.0" in text and "decided: batch-size 64" in text
    assert "horizontal flips off" in text
    cfg, lines = settle(_cfg(epochs=10), n_train=4_000, world_size=1)
    assert "--hflip 0 for digits" in "\n".join(lines) or cfg.hflip == 0


def test_the_paper_recipe_scales_its_learning_rate_to_the_batch_given():
    values, _ = paper(world_size=2, batch=32)
    assert values["batch_size"] == 32 and values["lr"] == pytest.approx(1e-3 * 64 / 1024)
    cfg, _ = settle(_cfg(recipe="paper"), n_train=10, world_size=1)
    assert (cfg.randaugment, cfg.mixup, cfg.batch_size) == ("rand-m9-mstd0.5-inc1", 0.8, 128)


def test_fine_tuning_takes_the_scratch_rates_and_a_smaller_backbone_rate_when_asked():
    import edgevits
    cfg, lines = settle(_cfg(epochs=10, checkpoint="weights.safetensors"), n_train=300, world_size=1)
    scratch, _ = settle(_cfg(epochs=10), n_train=300, world_size=1)
    assert cfg.lr == scratch.lr and cfg.backbone_lr_scale == 1.0 and "fine-tuning at the same rate" in lines[0]
    groups = param_groups(edgevits.create_model("swiftformer_xs", num_classes=3), 0.025, 0.1)
    head = [g for g in groups if not g["backbone"]]
    assert head and all(g["lr_scale"] == 1.0 for g in head)
    assert all(g["lr_scale"] == 0.1 for g in groups if g["backbone"])
    assert sum(len(g["params"]) for g in groups) == len(list(edgevits.create_model("swiftformer_xs").parameters()))


def test_frozen_epochs_leave_the_backbone_as_it_was_and_train_the_head(image_folder, tmp_path):
    import edgevits
    start = edgevits.save_checkpoint(edgevits.create_model("swiftformer_xs", img_size=32, num_classes=3),
                                     tmp_path / "start")
    cfg = TrainConfig(data=str(image_folder), model="swiftformer_xs", img_size=32, epochs=1, batch_size=8,
                      checkpoint=str(start), freeze_epochs=1, output=str(tmp_path / "run"), workers=0,
                      progress=False, ema_decay=0.0)
    train(cfg)
    before, after = load_file(start), load_file(tmp_path / "run" / "last.safetensors")
    trained = [k for k in before if not torch.equal(before[k], after[k])]
    assert trained and all(k.startswith(("head.", "head_dist.")) or "running_" in k or "num_batches" in k
                           for k in trained), trained
    derived = json.loads((tmp_path / "run" / "config.json").read_text())
    assert derived["config"]["freeze_epochs"] == 1 and derived["config"]["recipe"] == "auto"


def test_batchnorm_recalibration_averages_the_batch_statistics_and_touches_nothing_else():
    from edgevits.testing import assert_parity
    from edgevits.train.evaluate import recalibrate_batchnorm
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Dropout(0.5))
    batches = [(torch.randn(4, 3, 8, 8) * (i + 1) + i, torch.zeros(4, dtype=torch.long), 0) for i in range(3)]
    model.train()
    rng = torch.get_rng_state()
    assert recalibrate_batchnorm(model, batches + [(None, None, 4)], torch.device("cpu")) == 12
    assert model.training and torch.equal(torch.get_rng_state(), rng)  # no dropout drawn
    bn = model[1]
    for dtype in (torch.float32, torch.float64):  # the batches' statistics, averaged
        conv = model[0].to(dtype)
        with torch.no_grad():
            feats = [conv(x.to(dtype)).transpose(0, 1).flatten(1) for x, _, _ in batches]
        mean = torch.stack([f.mean(1) for f in feats]).mean(0)
        var = torch.stack([f.var(1) for f in feats]).mean(0)
        if dtype == torch.float32:
            ref = torch.stack([mean, var])
        else:
            ref64 = torch.stack([mean, var])
    model[0].float()
    assert_parity(torch.stack([bn.running_mean, bn.running_var])[None], ref[None], ref64[None], check_dependence=False)
    assert bn.momentum == 0.1


def test_three_classes_of_thirty_images_are_learnt_in_two_epochs_with_no_flag(tmp_path):
    data = make_image_folder(tmp_path / "data", n_train=30, n_val=10)
    lines = []
    result = train(TrainConfig(data=str(data), model="swiftformer_xs", img_size=32, epochs=2,
                               output=str(tmp_path / "run"), workers=0, progress=False), log=lines.append)
    assert result.best_top1 >= 0.9, lines  # the papers' recipe stayed at chance here (a third)
    assert any("bn-images 90" in line for line in lines)


def test_fine_tuning_at_another_resolution_resizes_the_attention_biases(image_folder, tmp_path):
    import edgevits
    start = edgevits.save_checkpoint(edgevits.create_model("efficientvit_m0", img_size=64, num_classes=5),
                                     tmp_path / "start")
    lines = []
    train(TrainConfig(data=str(image_folder), model="efficientvit_m0", img_size=32, epochs=1, checkpoint=str(start),
                      output=str(tmp_path / "run"), workers=0, progress=False), log=lines.append)
    text = "\n".join(lines)
    assert "resized to --img-size 32" in text and "classifier reset" in text


def test_a_run_saved_before_the_recipes_resumes_with_the_papers_recipe():
    import argparse
    from edgevits.train.config import config_from_args
    old = {"data": "d", "model": "swiftformer_xs", "img_size": 32, "lr": None, "hflip": 0.5}  # no "recipe" key
    cfg = config_from_args(argparse.Namespace(), base=old)
    assert (cfg.recipe, cfg.bn_images, cfg.backbone_lr_scale, cfg.hflip) == ("paper", 0, 1.0, 0.5)
    new = config_from_args(argparse.Namespace(), base={**old, "recipe": "auto"})
    assert (new.recipe, new.bn_images) == ("auto", None)
