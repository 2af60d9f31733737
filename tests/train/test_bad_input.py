"""Bad input to ``edgevits train`` and ``edgevits eval``: one line on stderr, exit code 2, before any file is written
(an existing run's files stay byte-identical, a fresh output folder stays empty), and nothing is ever unpickled."""
from __future__ import annotations

import argparse
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from edgevits.cli import main
from edgevits.errors import ConfigError
from edgevits.testing import make_image_folder
from edgevits.train import TrainConfig, TrainResult, train
from edgevits.train.config import add_config_arguments, config_from_args
from edgevits.train.data import class_list
from edgevits.train.files import RUN_FILES

FAST = ["--img-size", "32", "--workers", "0", "--no-progress", "--threads", "1", "--batch-size", "24"]


def fails(capsys, argv: list[str], *expected: str) -> str:
    """Run the command line; assert exit code 2 and one error line holding every ``expected`` text; return it."""
    code = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (out, err)
    assert len(lines) == 1 and lines[0].startswith(f"edgevits {argv[0]}: error: "), err
    assert "Traceback" not in err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def train_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--model", "swiftformer_xs", "--output", str(out), *FAST, *extra]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, image_folder) -> Path:
    """A real run folder: one epoch of a two-epoch run (one step of 24 images), stopped as if interrupted.
    Shared: tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("run") / "run"
    cfg = TrainConfig(data=str(image_folder), model="swiftformer_xs", img_size=32, epochs=2, stop_after=1,
                      batch_size=24, workers=0, progress=False, warmup_epochs=0, randaugment="none", mixup=0.0,
                      cutmix=0.0, reprob=0.0, ema_decay=0.0, threads=1, output=str(out))
    train(cfg)
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


@pytest.fixture
def no_training(monkeypatch):
    """``train`` stops where the epochs would start (everything before it, the checks and the first writes, runs)."""
    from edgevits.train import engine
    monkeypatch.setattr(engine, "_loop", lambda run, log, progress: TrainResult(run.out))


# ---- settings --------------------------------------------------------------------------------------------------------

BAD_SETTINGS = [
    (["--lr", "-1"], "--lr must be > 0, got -1.0"),
    (["--lr", "nan"], "--lr must be > 0, got nan"),
    (["--img-size", "0"], "--img-size must be >= 32, got 0"),
    (["--img-size", "48"], "--img-size must be a multiple of 32 for swiftformer_xs"),
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--epochs", "-3"], "--epochs must be >= 1, got -3"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--weight-decay", "-0.1"], "--weight-decay must be >= 0, got -0.1"),
    (["--smoothing", "1"], "--smoothing must be in [0, 1), got 1.0"),
    (["--smoothing", "-0.1"], "--smoothing must be in [0, 1), got -0.1"),
    (["--mixup", "-1"], "--mixup must be >= 0, got -1.0"),
    (["--cutmix", "-0.5"], "--cutmix must be >= 0, got -0.5"),
    (["--reprob", "1.5"], "--reprob must be in [0, 1], got 1.5"),
    (["--ema-decay", "1"], "--ema-decay must be in [0, 1), got 1.0"),
    (["--warmup-epochs", "-1"], "--warmup-epochs must be >= 0, got -1"),
    (["--min-lr=-1e-5"], "--min-lr must be >= 0, got -1e-05"),
    (["--drop-path", "1"], "--drop-path must be in [0, 1)"),
    (["--crop-pct", "0"], "--crop-pct must be in (0, 1]"),
    (["--scale-min", "0"], "--scale-min must be in (0, 1]"),
    (["--stop-after", "0"], "--stop-after must be >= 1"),
    (["--threads", "-1"], "--threads must be >= 0"),
    (["--workers", "-2"], "--workers must be >= -1"),
    (["--opt-eps", "0"], "--opt-eps must be > 0"),
    (["--clip-grad", "-1"], "--clip-grad must be >= 0"),
    (["--repeated-aug", "0"], "--repeated-aug must be >= 1"),
    (["--distillation-tau", "0"], "--distillation-tau must be > 0"),
    (["--model", "swiftformer_xxl"], "unknown model 'swiftformer_xxl'"),
    (["--model", "efficientformer_l1", "--img-size", "40"], "--img-size must be a multiple of 32"),
    (["--device", "gpu"], "--device must be auto, cpu or cuda[:N]"),
    (["--randaugment", "rand-x"], "--randaugment"),
    (["--distillation", "hard"], "needs a --teacher"),
    (["--teacher", "not_a_model", "--distillation", "soft"], "--teacher 'not_a_model' is neither"),
]


@pytest.mark.parametrize("extra, message", BAD_SETTINGS, ids=[" ".join(a) for a, _ in BAD_SETTINGS])
def test_a_bad_setting_is_one_line_naming_the_flag_and_nothing_is_written(image_folder, tmp_path, capsys, extra,
                                                                          message):
    fails(capsys, train_argv(image_folder, tmp_path / "out", *extra), message)
    assert not (tmp_path / "out").exists()


def test_settings_are_checked_when_the_config_is_made():
    base = dict(data="d", model="swiftformer_xs", img_size=32)
    with pytest.raises(ConfigError, match=r"--lr must be > 0, got -1\.0"):
        TrainConfig(**base, lr=-1.0)
    with pytest.raises(ConfigError, match="--epochs must be a number.*whole number.*2.5"):
        TrainConfig(**base, epochs=2.5)
    with pytest.raises(ConfigError, match="--lr must be > 0, got inf"):
        TrainConfig(**base, lr=float("inf"))
    assert TrainConfig(data=Path("d"), model="swiftformer_xs", img_size=32, output=Path("o")).output == "o"


def test_efficientvit_takes_any_size_its_model_takes_the_others_a_multiple_of_their_stride():
    from edgevits import create_model
    for size in (40, 50, 100):
        assert TrainConfig(data="d", model="efficientvit_m0", img_size=size).img_size == size
    model = create_model("efficientvit_m0", img_size=40, num_classes=3).eval()
    assert model(torch.randn(2, 3, 40, 40)).shape == (2, 3)
    for name in ("swiftformer_xs", "efficientformer_l1", "efficientformerv2_s0"):
        with pytest.raises(ConfigError, match=f"--img-size must be a multiple of 32 for {name}.*try 32 or 64"):
            TrainConfig(data="d", model=name, img_size=40)
    with pytest.raises(ConfigError, match="--img-size must be >= 32"):
        TrainConfig(data="d", model="efficientvit_m0", img_size=16)


def test_flags_not_given_keep_a_resumed_runs_settings_and_every_option_has_help():
    from edgevits.cli import build_parser
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(["--epochs", "7", "--no-amp"])
    cfg = config_from_args(args, {"data": "d", "model": "swiftformer_xs", "img_size": 64, "epochs": 3,
                                  "amp": True, "lr": 0.5})
    assert (cfg.epochs, cfg.amp, cfg.img_size, cfg.lr, cfg.batch_size) == (7, False, 64, 0.5, None)  # recipe
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command in ("train", "eval", "data"):
        for action in sub.choices[command]._actions:
            assert action.help, (command, action.dest)
            if action.dest not in ("help", "debug") and action.default is not None:
                assert "default" not in action.help.lower(), (command, action.dest)  # the formatter adds it
    helps = {a.dest: a.help for a in sub.choices["train"]._actions}
    assert "required unless --resume" in helps["data"] and "required unless --resume" in helps["model"]
    assert "--resume" in helps["output"] and "refused" in helps["output"]
    assert "threads" in {a.dest for a in sub.choices["eval"]._actions}


# ---- output folders --------------------------------------------------------------------------------------------------

def test_an_output_that_is_a_file_or_cannot_be_created_is_refused(image_folder, tmp_path, capsys):
    file = tmp_path / "notes.txt"
    file.write_text("keep me")
    fails(capsys, train_argv(image_folder, file), "is an existing file, not a folder")
    fails(capsys, train_argv(image_folder, file / "out"), "cannot be created", "is a file")
    assert snapshot(tmp_path) == {"notes.txt": b"keep me"}


def test_an_output_holding_a_run_is_refused_naming_resume_and_a_new_folder(image_folder, tmp_path, capsys):
    run = tmp_path / "run"
    for i, name in enumerate(RUN_FILES[:3]):
        (run / name).parent.mkdir(exist_ok=True)
        (run / name).write_bytes(bytes([i]) * 10)
    (run / ".last.state.pt.x1y2.tmp").write_bytes(b"half a save")
    (tmp_path / "run-2").mkdir()
    before = snapshot(run)
    line = fails(capsys, train_argv(image_folder, run), "already holds a run", f"--resume {run}",
                 f"--output {tmp_path / 'run-3'}")
    assert "metrics.jsonl" in line
    assert snapshot(run) == before and not (tmp_path / "run-3").exists()
    started = tmp_path / "started"  # a run that stopped before its first epoch ended: nothing to resume from
    started.mkdir()
    (started / "config.json").write_text("{}")
    fails(capsys, train_argv(image_folder, started), "already holds a run (config.json)", f"--resume {started}",
          "has no last.state.pt", f"--output {tmp_path / 'started-2'}")
    assert snapshot(started) == {"config.json": b"{}"}


def test_resuming_into_another_runs_folder_is_refused(image_folder, run_copy, tmp_path, capsys):
    other = Path(shutil.copytree(run_copy, tmp_path / "other"))
    before = snapshot(other)
    fails(capsys, ["train", "--resume", str(run_copy), "--output", str(other), "--no-progress", "--workers", "0"],
          "already holds a run", f"--resume {other}")
    assert snapshot(other) == before


def test_resume_in_the_same_folder_and_a_new_run_remove_the_leftovers_of_an_interrupted_save(
        image_folder, run_copy, tmp_path, capsys, no_training):
    leftover = run_copy / ".last.state.pt.abc123.tmp"
    leftover.write_bytes(b"interrupted")
    assert main(["train", "--resume", str(run_copy), "--workers", "0", "--no-progress", "--threads", "1"]) == 0
    assert not leftover.exists() and "removed .last.state.pt.abc123.tmp" in capsys.readouterr().out
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / ".metrics.jsonl.zz9.tmp").write_bytes(b"")
    assert main(train_argv(image_folder, fresh)) == 0
    assert not list(fresh.glob("*.tmp")) and (fresh / "config.json").is_file()


def test_a_run_resumed_into_a_new_folder_keeps_its_metrics(run_copy, tmp_path, no_training):
    assert main(["train", "--resume", str(run_copy), "--output", str(tmp_path / "new"), "--workers", "0",
                 "--no-progress"]) == 0
    from edgevits.train import read_metrics
    assert [r["epoch"] for r in read_metrics(tmp_path / "new" / "metrics.jsonl")] == [1]


def test_a_training_state_of_other_settings_is_refused(image_folder, run_copy, capsys):
    before = snapshot(run_copy)
    fails(capsys, ["train", "--resume", str(run_copy), "--model", "efficientvit_m0", "--workers", "0",
                   "--no-progress"], "does not fit this run")
    other = make_image_folder(run_copy.parent / "abc", n_train=1, n_val=1, classes=("a", "b", "c"))
    fails(capsys, ["train", "--resume", str(run_copy), "--data", str(other), "--workers", "0", "--no-progress"],
          "['a', 'b', 'c']", "['circle'")
    assert snapshot(run_copy) == before


# ---- checkpoints and training states ---------------------------------------------------------------------------------

def test_truncated_checkpoints_and_states_are_refused(image_folder, finished_run, tmp_path, capsys):
    cut = tmp_path / "cut"
    cut.mkdir()
    for name in ("best.safetensors", "last.state.pt"):
        data = (finished_run / name).read_bytes()
        (cut / name).write_bytes(data[: len(data) // 2])
    before = snapshot(cut)
    out = tmp_path / "out"
    fails(capsys, train_argv(image_folder, out, "--checkpoint", str(cut / "best.safetensors")), "truncated")
    fails(capsys, train_argv(image_folder, out, "--teacher", "swiftformer_xs", "--distillation", "hard",
                             "--teacher-checkpoint", str(cut / "best.safetensors")), "truncated")
    fails(capsys, ["train", "--resume", str(cut), "--no-progress"], "truncated")
    fails(capsys, ["eval", "--data", str(image_folder), "--checkpoint", str(cut / "last.state.pt")], "truncated")
    fails(capsys, ["train", "--resume", str(tmp_path / "nowhere")], "no such file or folder")
    assert snapshot(cut) == before and not out.exists()


class MakesAFile:
    """Unpickling it opens (creates) ``marker``: what a malicious checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
@pytest.mark.parametrize("use", ["train --checkpoint", "train --resume", "train --teacher-checkpoint",
                                 "eval --checkpoint"])
def test_a_pickle_of_python_objects_is_refused_without_being_unpickled(image_folder, tmp_path, capsys, writer,
                                                                       use):
    marker = tmp_path / "marker"
    path = tmp_path / "evil" / ("last.state.pt" if use == "train --resume" else "weights.pt")
    path.parent.mkdir()
    payload = {"model": MakesAFile(marker), "config": {}}
    with open(path, "wb") as f:
        torch.save(payload, f) if writer == "torch.save" else pickle.dump(payload, f)
    before = snapshot(path.parent)
    out = tmp_path / "out"
    argv = {"train --checkpoint": train_argv(image_folder, out, "--checkpoint", str(path)),
            "train --resume": ["train", "--resume", str(path.parent), "--no-progress"],
            "train --teacher-checkpoint": train_argv(image_folder, out, "--teacher", "swiftformer_xs",
                                                     "--distillation", "hard", "--teacher-checkpoint", str(path)),
            "eval --checkpoint": ["eval", "--data", str(image_folder), "--checkpoint", str(path), "--workers", "0"]}
    fails(capsys, argv[use], "was not unpickled")
    assert not marker.exists()
    assert snapshot(path.parent) == before and not out.exists()


# ---- eval ------------------------------------------------------------------------------------------------------------

def test_eval_of_data_with_other_classes_names_both_lists(finished_run, tmp_path, capsys):
    other = make_image_folder(tmp_path / "other", n_train=1, n_val=1, classes=("cat", "dog", "emu"))
    for checkpoint in (finished_run, finished_run / "last.safetensors", finished_run / "last.state.pt"):
        fails(capsys, ["eval", "--data", str(other), "--checkpoint", str(checkpoint), "--workers", "0"],
              "3 classes ['cat', 'dog', 'emu']", "3 classes ['circle'")
    names = [f"n{i:03d}" for i in range(1000)]
    assert class_list(names) == "1000 classes ['n000', 'n001', 'n002', 'n003', 'n004', 'n005', ..., 'n999']"


def test_eval_takes_a_run_folder_and_threads_and_checks_its_settings(image_folder, finished_run, capsys):
    base = ["eval", "--data", str(image_folder), "--checkpoint", str(finished_run), "--workers", "0"]
    before = torch.get_num_threads()
    assert main([*base, "--threads", "2", "--json"]) == 0
    assert '"val_top1"' in capsys.readouterr().out and torch.get_num_threads() == before
    fails(capsys, [*base, "--threads", "-1"], "--threads must be >= 0, got -1")
    fails(capsys, [*base, "--batch-size", "0"], "--batch-size must be >= 1, got 0")
    fails(capsys, [*base, "--img-size", "40"], "--img-size must be a multiple of 32")
    fails(capsys, [*base, "--model", "efficientvit_m9"], "unknown model 'efficientvit_m9'")
    fails(capsys, ["eval", "--data", str(image_folder), "--checkpoint", str(finished_run / "best.json")],
          "metadata sidecar", "best.safetensors")
