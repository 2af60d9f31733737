"""One suite for every registered model: a variant is tested the moment it is registered."""
import copy
import functools

import pytest
import torch
from torch import nn

import edgevits
from edgevits.testing import calibrated, parity, randomize_

MODELS = edgevits.list_models()


@functools.lru_cache(maxsize=2)
def _model(name):
    return edgevits.create_model(name)


def _calibrated(name):
    return calibrated(edgevits.create_model(name), batches=1, batch_size=4)


@pytest.mark.parametrize("name", MODELS)
def test_parameter_count_matches_the_paper(name):
    expected = edgevits.get_entry(name).published["params_m"]
    assert abs(edgevits.count_params(_model(name)) / 1e6 - expected) <= 5e-4


@pytest.mark.parametrize("name", MODELS)
def test_macs_match_the_paper_within_two_percent(name):
    expected = edgevits.get_entry(name).published["gmacs"]
    assert edgevits.count_macs(_model(name)) / 1e9 == pytest.approx(expected, rel=0.02)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("size", [160, 224, 256, (192, 288)], ids=str)
def test_forward_gives_logits_at_any_supported_size(name, size):
    h, w = (size, size) if isinstance(size, int) else size
    model = _model(name).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, h, w))
    assert out.shape == (2, 1000)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", MODELS)
def test_backward_reaches_every_parameter(name):
    model = edgevits.create_model(name, num_classes=10).train()
    randomize_(model)  # layer scales at 1e-5 would make some gradients vanish numerically
    out = model(torch.randn(2, 3, 160, 160))
    loss = sum(o.square().mean() for o in (out if isinstance(out, tuple) else (out,)))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
               or (p.grad == 0).all()]
    assert not missing, f"no gradient reached: {missing[:10]}"


@pytest.mark.parametrize("name", MODELS)
def test_training_returns_two_heads_and_eval_their_mean(name):
    model = _calibrated(name)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        model.train()
        for m in model.modules():  # only the model itself trains: BN statistics and drop path stay fixed
            if m is not model:
                m.eval()
        out = model(x)
        model.eval()
        mean = model(x)
    if model.config.distillation:
        assert isinstance(out, tuple) and len(out) == 2
        torch.testing.assert_close((out[0] + out[1]) / 2, mean, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(out, mean, rtol=1e-5, atol=1e-5)


def _assert_fused_equals_eval(model, x):
    """The deploy form equals the eval form: exactly (<= 1e-9) in float64, where rounding cannot hide a mistake,
    and within 1e-4 in float32 with the deploy form's fast kernels (the randomised networks amplify float32
    rounding: the float32 eval model itself sits up to ~7e-6 from its float64 self)."""
    fused = edgevits.fuse_model(model)
    with torch.no_grad():
        logits, centred = parity(fused(x), model(x))
    assert logits <= 1e-4 and centred <= 1e-4, (logits, centred)
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        logits, centred = parity(edgevits.fuse_model(model64)(x.double()), model64(x.double()))
    assert logits <= 1e-9 and centred <= 1e-9, (logits, centred)
    return fused


@pytest.mark.parametrize("name", MODELS)
def test_fused_model_equals_eval_model_and_has_no_batchnorm(name):
    model = _calibrated(name)
    x = torch.randn(3, 3, 224, 224)
    fused = _assert_fused_equals_eval(model, x)
    assert not [n for n, m in fused.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    again = edgevits.fuse_model(fused)  # idempotent
    with torch.no_grad():
        torch.testing.assert_close(again(x), fused(x))


@pytest.mark.parametrize("name", MODELS)
def test_fused_model_also_matches_at_another_size(name):
    _assert_fused_equals_eval(_calibrated(name), torch.randn(2, 3, 192, 288))


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_round_trip_through_a_safetensors_file(name, tmp_path):
    model = _calibrated(name)
    path = edgevits.save_checkpoint(model, tmp_path / "weights")
    again = edgevits.create_model(name, checkpoint=path).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
    assert (tmp_path / "weights.json").exists()


@pytest.mark.parametrize("name", MODELS)
def test_reset_classifier_from_zero_back_to_n(name):
    model = edgevits.create_model(name).eval()
    x = torch.randn(1, 3, 224, 224)
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (1, model.num_features)
    model.reset_classifier(7)
    with torch.no_grad():
        assert model(x).shape == (1, 7)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (1, model.num_features)


@pytest.mark.parametrize("name", MODELS)
def test_features_only_gives_one_map_per_stage(name):
    model = edgevits.create_model(name, features_only=True).eval()
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 256, 256))
    assert len(feats) == len(model.feature_info)
    for f, info in zip(feats, model.feature_info):
        assert f.shape[1] == info["num_chs"]
        assert f.shape[-1] == 256 // info["reduction"]


@pytest.mark.parametrize("name", MODELS)
def test_without_distillation_head(name):
    model = edgevits.create_model(name, distillation=False).train()
    out = model(torch.randn(2, 3, 160, 160))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 1000)


@pytest.mark.parametrize("name", MODELS)
def test_bad_inputs_give_errors_that_say_what_was_expected(name):
    model = _model(name).eval()
    with pytest.raises(ValueError, match="expects"):
        model(torch.randn(1, 1, 224, 224))
    with pytest.raises(ValueError, match="divisible by"):
        model(torch.randn(1, 3, 225, 224))
