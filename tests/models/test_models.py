"""One suite for every registered model: a variant is tested the moment it is registered.

Each model's tests share one xdist group, so that the per-worker caches below build every variant once per run
(``make test`` runs pytest with ``--dist loadgroup``). Inputs are small (64-160 pixels): every code path of the
full-size models runs at them (bias tables resized both ways, EfficientViT's padded windows), at a fraction of the
cost."""
import copy
import functools

import numpy as np
import pytest
import torch
from torch import nn

import edgevits
from edgevits.testing import assert_parity, calibrated, calibrated_variant, float64_reference, parity, randomize_

MODELS = edgevits.list_models()
SIZE = 96  # the training size of the calibrated models (bias tables built for it: the deploy form's cached path)
OTHER = (64, 128)  # another size (tables resized at run time, EfficientViT's windows padded)


def per_model(fn):
    """Parametrize over every registered model, one xdist group per model."""
    return pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xdist_group(n)) for n in MODELS])(fn)


@functools.cache
def _meta_model(name):
    """The variant at its defaults on the meta device: shapes without memory or initialisation (counting only)."""
    with torch.device("meta"):
        return edgevits.create_model(name)


@functools.cache
def _default(name):
    return edgevits.create_model(name).eval()


def _fresh(name):
    """A copy of the variant at its defaults, to change as a test likes."""
    return copy.deepcopy(_default(name))



@functools.cache
def _deployed(name):
    return edgevits.fuse_model(calibrated_variant(name))


def _x(batch, size, seed=0):
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


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


@per_model
def test_parameter_count_matches_the_paper(name):
    assert abs(edgevits.count_params(_meta_model(name)) / 1e6 - PAPER[name][0]) <= 5e-4


@per_model
def test_macs_match_the_paper(name):
    _, gmacs, tol = PAPER[name]
    counted = edgevits.count_macs(_meta_model(name)) / 1e9  # counted from the shapes: the same on the meta device
    if tol < 0.01:  # given to three decimals: equal when rounded
        assert abs(counted - gmacs) <= tol, counted
    else:
        assert counted == pytest.approx(gmacs, rel=tol)


@per_model
@pytest.mark.parametrize("size", [96, (256, 96)], ids=str)
def test_forward_gives_logits_at_any_supported_size(name, size):
    # a model built for 224 at a smaller size, and at a taller, narrower one (tables resized up and down)
    with torch.no_grad():
        out = _default(name)(_x(2, size))
    assert out.shape == (2, 1000)
    assert torch.isfinite(out).all()


@per_model
def test_backward_reaches_every_parameter(name):
    # no stochastic depth: with a batch of two, a dropped branch (V2-L has rate 0.1) would get no gradient
    model = edgevits.create_model(name, num_classes=10, drop_path_rate=0.0).train()
    randomize_(model)  # layer scales at 1e-5 would make some gradients vanish numerically
    out = model(_x(2, 96))
    loss = sum(o.square().mean() for o in (out if isinstance(out, tuple) else (out,)))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
               or (p.grad == 0).all()]
    assert not missing, f"no gradient reached: {missing[:10]}"


@per_model
def test_training_returns_two_heads_and_eval_their_mean(name):
    model = copy.deepcopy(calibrated_variant(name))
    x = _x(2, SIZE)
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
        torch.testing.assert_close((out[0] + out[1]) / 2, mean, rtol=0, atol=0)  # the same arithmetic
    else:
        torch.testing.assert_close(out, mean, rtol=0, atol=0)


def _assert_deploy_equals_eval(model, fused, x):
    """The deploy form equals the eval form: exactly (<= 1e-9) in float64, where rounding cannot hide a mistake, and
    to the float32 rounding present with the deploy form's fast kernels (``assert_parity``)."""
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        ref64 = model64(x.double())
        logits, centred = parity(edgevits.fuse_model(model64)(x.double()), ref64)
        assert logits <= 1e-9 and centred <= 1e-9, (logits, centred)  # ~1e4 x float64's rounding at most
        assert_parity(fused(x), model(x), ref64)


@per_model
def test_fused_model_equals_eval_model_at_two_sizes_and_has_no_batchnorm(name):
    model, fused = calibrated_variant(name), _deployed(name)
    for size in (SIZE, OTHER):
        _assert_deploy_equals_eval(model, fused, _x(2, size))
    assert not [n for n, m in fused.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    again = edgevits.fuse_model(fused)  # idempotent
    x = _x(2, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(again(x), fused(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["swiftformer_xs", "efficientformer_l1", "efficientformerv2_s0", "efficientvit_m0"])
def test_the_parity_bound_fails_a_deploy_form_off_by_1e4(name):
    # the bound is a multiple of the rounding present; it must still catch a real mistake of 1e-4 (relative)
    model = calibrated_variant(name) if name != "efficientvit_m0" else calibrated(edgevits.create_model(name))
    size = SIZE if name != "efficientvit_m0" else 224  # M0 at 128 rounds to 2e-5: its bound would be 2e-4
    fused = edgevits.fuse_model(model)
    x = _x(2, size)
    with torch.no_grad():
        ref, ref64, out = model(x), float64_reference(model, x), fused(x)
    assert_parity(out, ref, ref64)
    off = out.clone()
    off[0, 0] += 1e-4 * ref.abs().max()  # one logit off by 1e-4 of the largest
    with pytest.raises(AssertionError, match="bound"):
        assert_parity(off, ref, ref64)
    with torch.no_grad():  # and the classifier's weights scaled by 1 + 1e-4: every logit off by 1e-4 (relative)
        head = copy.deepcopy(fused)
        head.head.weight.mul_(1 + 1e-4)
        head.head.bias.mul_(1 + 1e-4)
        with pytest.raises(AssertionError, match="bound"):
            assert_parity(head(x), ref, ref64)


@per_model
def test_a_safetensors_file_round_trips_also_after_reset_classifier(name, tmp_path):
    model = copy.deepcopy(calibrated_variant(name))
    path = edgevits.save_checkpoint(model, tmp_path / "weights")
    again = edgevits.create_model(name, checkpoint=path).eval()
    x = _x(2, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
    assert (tmp_path / "weights.json").exists()
    # a checkpoint saved after reset_classifier records the new class count
    model.reset_classifier(5)
    assert model.config.num_classes == 5
    path = edgevits.save_checkpoint(model.eval(), tmp_path / "finetuned")
    again = edgevits.create_model(name, checkpoint=path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


@per_model
def test_reset_classifier_from_zero_back_to_n(name):
    model = _fresh(name)
    x = _x(1, 64)
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (1, model.num_features)
    model.reset_classifier(7)
    with torch.no_grad():
        assert model(x).shape == (1, 7)
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (1, model.num_features)


@per_model
def test_deploy_form_keeps_normalised_features_without_a_head_and_after_a_reset(name):
    model = calibrated_variant(name)
    x = _x(2, SIZE)
    fused = copy.deepcopy(_deployed(name))
    headless = edgevits.fuse_model(edgevits.create_model(name, checkpoint=model.state_dict(), num_classes=0,
                                                        img_size=SIZE))
    assert not [n for n, m in headless.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        ref = model.forward_head(model.forward_features(x), pre_logits=True)
        ref64 = model64.forward_head(model64.forward_features(x.double()), pre_logits=True)
        assert_parity(fused.forward_head(fused.forward_features(x), pre_logits=True), ref, ref64)
        assert_parity(headless(x), ref, ref64)
        fused.reset_classifier(0)
        assert_parity(fused(x), ref, ref64)


@per_model
def test_a_backbone_loads_a_classification_checkpoint_and_trains_every_parameter(name):
    backbone = edgevits.create_model(name, features_only=True)
    report = edgevits.load_checkpoint(backbone, _default(name).state_dict())
    assert report["ignored"] and all(k.split(".")[0] in ("head", "head_dist", "norm") for k in report["ignored"])
    assert not [n for n, m in edgevits.fuse_model(backbone).named_modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    backbone.train()
    randomize_(backbone)
    sum(f.square().mean() for f in backbone(_x(2, 96))).backward()
    assert not [n for n, p in backbone.named_parameters() if p.grad is None]  # no unused parameter (DDP)


@per_model
def test_features_only_gives_one_map_per_stage(name):
    model = edgevits.create_model(name, features_only=True).eval()
    with torch.no_grad():
        feats = model(_x(1, 128))
    assert len(feats) == len(model.feature_info)
    for f, info in zip(feats, model.feature_info):
        assert f.shape[1] == info["num_chs"]
        assert f.shape[-1] == 128 // info["reduction"]


@per_model
def test_without_distillation_head(name):
    model = edgevits.create_model(name, distillation=False).train()
    out = model(_x(2, 64))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 1000)


@per_model
def test_bad_inputs_give_errors_that_say_what_was_expected(name):
    model = _default(name)
    with pytest.raises(ValueError, match="expects"):
        model(torch.randn(1, 1, 64, 64))
    if model.stride > 1:  # EfficientViT takes any size (its windows pad)
        with pytest.raises(ValueError, match="divisible by"):
            model(torch.randn(1, 3, 65, 64))


BAD_TENSORS = {  # input -> words the error must contain
    "float64": (lambda: torch.randn(1, 3, 64, 64, dtype=torch.float64), "x.to(torch.float32)"),
    "uint8": (lambda: torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "normalise"),
    "numpy": (lambda: np.zeros((1, 3, 64, 64), np.float32), "torch.from_numpy"),
    "one image": (lambda: torch.randn(3, 64, 64), "unsqueeze(0)"),
    "empty batch": (lambda: torch.randn(0, 3, 64, 64), "empty batch"),
}


@pytest.mark.parametrize("name", ["efficientformer_l1", "efficientformerv2_s0", "efficientvit_m0", "swiftformer_xs"])
def test_the_eval_and_the_deploy_form_refuse_the_same_bad_tensors_alike(name):
    # float64, uint8 and numpy inputs, one image without its batch axis and an empty batch: the same clear error
    # from both forms (an InputError, also a TypeError and a ValueError), never a kernel's message
    model = _default(name)
    fused = edgevits.fuse_model(model)
    for what, (make, words) in BAD_TENSORS.items():
        messages = []
        for form in (model, fused):
            with pytest.raises(edgevits.InputError) as info:
                form(make())
            messages.append(str(info.value))
        assert messages[0] == messages[1] and words in messages[0], (what, messages)


@pytest.mark.parametrize("name", ["efficientformer_l1", "efficientformerv2_s0", "efficientvit_m0"])
def test_deploy_form_follows_an_in_place_change_of_its_bias_tables(name):
    from edgevits.layers import RelPosBiasDeploy
    from edgevits.layers.bias import gather_bias
    fused = copy.deepcopy(_deployed(name))
    x = _x(2, SIZE)
    with torch.no_grad():
        before = fused(x)
        for m in fused.modules():
            if isinstance(m, RelPosBiasDeploy):
                m.table.mul_(-1.5)  # an in-place write, as a load_state_dict or an EMA update does
        after = fused(x)
        expected = copy.deepcopy(fused)  # the same tables, every bias gathered afresh from them
        for m in expected.modules():
            if isinstance(m, RelPosBiasDeploy):
                m.bias.copy_(gather_bias(m.table, m.table_size, *m.default_key))
        assert not torch.allclose(before, after)
        torch.testing.assert_close(after, expected(x), rtol=0, atol=0)


def test_reset_classifier_on_a_backbone_is_refused():
    with pytest.raises(ValueError, match="features_only"):
        edgevits.create_model("swiftformer_xs", features_only=True).reset_classifier(10)
