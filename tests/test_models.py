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


# (params in M with the distillation head, GMACs at 224, tolerance on the GMACs): the papers' / official figures,
# written out here so that a change to the registry cannot move the target. SwiftFormer's and V2's MACs are given
# to three decimals (checked to them); V1's and EfficientViT's are rounded in the papers (checked to 2%).
PAPER = {
    "swiftformer_xs": (3.475, 0.602, 5e-4), "swiftformer_s": (6.092, 0.985, 5e-4),
    "swiftformer_l1": (12.058, 1.596, 5e-4), "swiftformer_l3": (28.495, 4.008, 5e-4),
    "efficientformer_l1": (12.290, 1.30, 0.02), "efficientformer_l3": (31.406, 3.93, 0.02),
    "efficientformer_l7": (82.229, 10.16, 0.02),
    "efficientformerv2_s0": (3.600, 0.396, 5e-4), "efficientformerv2_s1": (6.186, 0.652, 5e-4),
    "efficientformerv2_s2": (12.710, 1.247, 5e-4), "efficientformerv2_l": (26.322, 2.553, 5e-4),
    "efficientvit_m0": (2.349, 0.079, 0.02), "efficientvit_m1": (2.981, 0.167, 0.02),
    "efficientvit_m2": (4.188, 0.201, 0.02), "efficientvit_m3": (6.901, 0.263, 0.02),
    "efficientvit_m4": (8.804, 0.299, 0.02), "efficientvit_m5": (12.474, 0.522, 0.02),
}


def test_every_registered_model_has_its_paper_figures_here():
    assert sorted(PAPER) == MODELS


@pytest.mark.parametrize("name", MODELS)
def test_parameter_count_matches_the_paper(name):
    assert abs(edgevits.count_params(_model(name)) / 1e6 - PAPER[name][0]) <= 5e-4


@pytest.mark.parametrize("name", MODELS)
def test_macs_match_the_paper(name):
    _, gmacs, tol = PAPER[name]
    counted = edgevits.count_macs(_model(name)) / 1e9
    if tol < 0.01:  # given to three decimals: equal when rounded
        assert abs(counted - gmacs) <= tol, counted
    else:
        assert counted == pytest.approx(gmacs, rel=tol)


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
    and within float32 rounding with the deploy form's fast kernels: the randomised, BN-calibrated networks
    amplify rounding, so the float32 eval form itself sits up to ~1e-5 from its float64 self, and the two
    float32 forms (different op orders) up to ~1.4e-5 from each other (measured over every variant)."""
    fused = edgevits.fuse_model(model)
    with torch.no_grad():
        logits, centred = parity(fused(x), model(x))
    assert logits <= 2e-5 and centred <= 3e-5, (logits, centred)
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
def test_a_checkpoint_saved_after_reset_classifier_records_the_new_class_count(name, tmp_path):
    model = edgevits.create_model(name)
    model.reset_classifier(5)
    assert model.config.num_classes == 5
    path = edgevits.save_checkpoint(model.eval(), tmp_path / "finetuned")
    again = edgevits.create_model(name, checkpoint=path).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", MODELS)
def test_deploy_form_keeps_normalised_features_without_a_head_and_after_a_reset(name):
    model = _calibrated(name)
    x = torch.randn(2, 3, 224, 224)
    fused = edgevits.fuse_model(model)
    headless = edgevits.fuse_model(edgevits.create_model(name, checkpoint=model.state_dict(), num_classes=0))
    assert not [n for n, m in headless.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        ref = model.forward_head(model.forward_features(x), pre_logits=True)
        assert parity(fused.forward_head(fused.forward_features(x), pre_logits=True), ref)[0] <= 1e-4
        assert parity(headless(x), ref)[0] <= 1e-4
        fused.reset_classifier(0)
        assert parity(fused(x), ref)[0] <= 1e-4


@pytest.mark.parametrize("name", MODELS)
def test_a_backbone_loads_a_classification_checkpoint_and_trains_every_parameter(name):
    full = edgevits.create_model(name)
    backbone = edgevits.create_model(name, features_only=True)
    report = edgevits.load_checkpoint(backbone, full.state_dict())
    assert report["ignored"] and all(k.split(".")[0] in ("head", "head_dist", "norm") for k in report["ignored"])
    assert not [n for n, m in edgevits.fuse_model(backbone).named_modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    backbone.train()
    randomize_(backbone)
    sum(f.square().mean() for f in backbone(torch.randn(2, 3, 160, 160))).backward()
    assert not [n for n, p in backbone.named_parameters() if p.grad is None]  # no unused parameter (DDP)


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
    if model.stride > 1:  # EfficientViT takes any size (its windows pad)
        with pytest.raises(ValueError, match="divisible by"):
            model(torch.randn(1, 3, 225, 224))


@pytest.mark.parametrize("name", ["efficientformer_l1", "efficientformerv2_s0", "efficientvit_m0"])
def test_deploy_form_follows_an_in_place_change_of_its_bias_tables(name):
    from edgevits.layers import FrozenRelPosBias
    from edgevits.layers.bias import gather_bias
    fused = edgevits.fuse_model(calibrated(edgevits.create_model(name)))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        before = fused(x)
        for m in fused.modules():
            if isinstance(m, FrozenRelPosBias):
                m.table.mul_(-1.5)  # an in-place write, as a load_state_dict or an EMA update does
        after = fused(x)
        expected = copy.deepcopy(fused)  # the same tables, every bias gathered afresh from them
        for m in expected.modules():
            if isinstance(m, FrozenRelPosBias):
                m.bias.copy_(gather_bias(m.table, m.table_size, *m.default_key))
        assert not torch.allclose(before, after)
        torch.testing.assert_close(after, expected(x), rtol=0, atol=0)


def test_reset_classifier_on_a_backbone_is_refused():
    with pytest.raises(ValueError, match="features_only"):
        edgevits.create_model("swiftformer_xs", features_only=True).reset_classifier(10)
