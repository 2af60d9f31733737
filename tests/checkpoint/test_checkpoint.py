"""Checkpoints and the registry: bad input gets an error a person can act on, and nothing unsafe is unpickled."""
import collections

import pytest
import torch

import edgevits
from edgevits import CheckpointError


def test_checkpoint_of_another_variant_lists_the_shape_clashes(tmp_path):
    path = edgevits.save_checkpoint(edgevits.create_model("swiftformer_xs"), tmp_path / "xs")
    with pytest.raises(CheckpointError, match="saved from 'swiftformer_xs'"):
        edgevits.create_model("swiftformer_s", checkpoint=path)
    sd = edgevits.create_model("swiftformer_xs").state_dict()
    with pytest.raises(CheckpointError, match=r"shape clashes \(\d+\): stages\.1\.downsample\.conv\.weight: "
                                              r"checkpoint \(56, 48, 3, 3\) vs model \(64, 48, 3, 3\)"):
        edgevits.load_checkpoint(edgevits.create_model("swiftformer_s"), sd)


def test_missing_and_unexpected_keys_are_listed():
    sd = edgevits.create_model("swiftformer_xs").state_dict()
    sd.pop("norm.weight")
    sd["stages.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"(?s)missing keys \(1\): norm\.weight.*unexpected keys \(1\)"):
        edgevits.load_checkpoint(edgevits.create_model("swiftformer_xs"), sd)


def test_unknown_format_is_named():
    with pytest.raises(CheckpointError, match="match no known swiftformer format"):
        edgevits.load_checkpoint(edgevits.create_model("swiftformer_xs"), {"foo.weight": torch.zeros(1)})


def test_corrupt_and_truncated_files_give_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="could not be read: it is truncated, corrupt or not a PyTorch file"):
        edgevits.create_model("swiftformer_xs", checkpoint=bad)
    good = edgevits.save_checkpoint(edgevits.create_model("swiftformer_xs"), tmp_path / "w")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="could not be read: it is truncated or not a safetensors file"):
        edgevits.create_model("swiftformer_xs", checkpoint=cut)
    with pytest.raises(CheckpointError, match="does not exist"):
        edgevits.create_model("swiftformer_xs", checkpoint=tmp_path / "nope.pth")


class Payload:
    def __reduce__(self):
        return (print, ("arbitrary code ran",))


def test_pickled_objects_are_never_executed(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"model": edgevits.create_model("swiftformer_xs").state_dict(), "x": Payload()}, path)
    with pytest.raises(CheckpointError, match="was not unpickled"):
        edgevits.create_model("swiftformer_xs", checkpoint=path)
    assert "arbitrary code ran" not in capsys.readouterr().out


def test_training_checkpoint_wrappers_and_module_prefix_are_understood(tmp_path):
    model = edgevits.create_model("swiftformer_xs")
    sd = collections.OrderedDict((f"module.{k}", v) for k, v in model.state_dict().items())
    path = tmp_path / "ddp.pth"
    torch.save({"state_dict": sd, "epoch": 3}, path)
    report = edgevits.load_checkpoint(edgevits.create_model("swiftformer_xs"), path)
    assert report["source"] == "edgevits"


def test_checkpoint_implies_class_count_and_metadata_survives(tmp_path):
    model = edgevits.create_model("swiftformer_xs", num_classes=10, distillation=False)
    path = edgevits.save_checkpoint(model, tmp_path / "ft", extra={"note": "fine-tuned"})
    again = edgevits.create_model("swiftformer_xs", checkpoint=path)
    assert again.num_classes == 10 and again.head_dist is None
    _, meta = edgevits.read_checkpoint(path)
    assert meta["model"] == "swiftformer_xs" and meta["note"] == "fine-tuned"
    assert meta["config"]["attention_revision"] == "current"
    foreign = {k: v for k, v in model.state_dict().items()}  # no metadata: the class count comes from the head
    assert edgevits.create_model("swiftformer_xs", checkpoint=foreign).num_classes == 10


def test_an_edgevits_file_of_other_output_settings_is_refused(tmp_path):
    legacy = edgevits.create_model("swiftformer_xs", attention_revision="legacy")
    path = edgevits.save_checkpoint(legacy, tmp_path / "legacy")
    with pytest.raises(CheckpointError, match="attention_revision='legacy'"):
        edgevits.load_checkpoint(edgevits.create_model("swiftformer_xs"), path)
    assert edgevits.create_model("swiftformer_xs", checkpoint=path).config.attention_revision == "legacy"
    pooled = edgevits.create_model("efficientformer_l1", pool_size=5)
    path = edgevits.save_checkpoint(pooled, tmp_path / "pool5")
    with pytest.raises(CheckpointError, match="pool_size=5"):
        edgevits.load_checkpoint(edgevits.create_model("efficientformer_l1"), path)


def test_checkpoint_files_get_the_mode_an_ordinary_write_would(tmp_path):
    import os
    import stat
    umask = os.umask(0o022)
    try:
        path = edgevits.save_checkpoint(edgevits.create_model("efficientvit_m0"), tmp_path / "m0")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE(path.with_suffix(".json").stat().st_mode) == 0o644


def test_a_training_checkpoint_with_ema_and_raw_weights_loads_the_ema_ones_and_says_so(tmp_path):
    raw, ema = edgevits.create_model("efficientvit_m0"), edgevits.create_model("efficientvit_m0")
    path = tmp_path / "train.pth"
    torch.save({"model": raw.state_dict(), "model_ema": ema.state_dict(), "epoch": 3}, path)
    model = edgevits.create_model("efficientvit_m0")
    with pytest.warns(UserWarning, match="loading 'model_ema'"):
        report = edgevits.load_checkpoint(model, path)
    assert report["wrapper"] == "model_ema"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ema.state_dict().values()))
    edgevits.load_checkpoint(model, torch.load(path, weights_only=True)["model"])  # the raw ones, on request
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), raw.state_dict().values()))


def test_create_model_applies_the_same_checks_as_load_checkpoint(tmp_path):
    path = edgevits.save_checkpoint(edgevits.create_model("swiftformer_xs", attention_revision="legacy"),
                                    tmp_path / "legacy")
    with pytest.raises(CheckpointError, match="attention_revision='legacy'"):
        edgevits.create_model("swiftformer_xs", checkpoint=path, attention_revision="current")


def test_save_checkpoint_keeps_the_class_names_and_preprocessing_create_model_recorded(tmp_path):
    from edgevits.checkpoint.preprocess import data_config
    model = edgevits.create_model("swiftformer_xs", img_size=64, num_classes=3)
    model.class_names = ["cat", "dog", "eel"]
    model.data_config = data_config(model)
    again = edgevits.create_model("swiftformer_xs", checkpoint=edgevits.save_checkpoint(model, tmp_path / "w"))
    assert again.class_names == ["cat", "dog", "eel"] and again.data_config == model.data_config
