"""EfficientViT-MSRA: parity with timm for all six variants, official release files, bias tables that are never
stale, and a deploy form that equals the train/eval form at any size (window padding included)."""
import re

import pytest
import torch
import torch.nn.functional as F

import edgevits
from edgevits.layers.attention.cascaded import (CascadedGroupAttention, CascadedGroupAttentionDeploy,
                                                LocalWindowAttention, dw_matrix)
from edgevits.testing import assert_parity, calibrate_bn, calibrated, float64_reference, randomize_

VARIANTS = [f"efficientvit_m{i}" for i in range(6)]


def _check(ours, ref, x):
    with torch.no_grad():
        assert_parity(ours(x), ref(x), float64_reference(ref, x))


@pytest.mark.parametrize("name", VARIANTS)
def test_timm_weights_give_timm_outputs(name, timm_reference):
    ref = timm_reference(name)
    ours = edgevits.create_model(name, checkpoint=ref.state_dict()).eval()
    assert not ours.config.distillation
    _check(ours, ref, torch.randn(2, 3, 224, 224))


@pytest.mark.parametrize("size", [(160, 160), (384, 384), (192, 288), (200, 200), (100, 150)])
def test_a_model_built_at_224_matches_timm_at_any_input_size(size, timm_reference):
    # the windows keep the side they were built with (7, 7, 4 at 224): larger, smaller or non-square maps pad to
    # whole windows (stage 3 at 384 is 6x6: four padded 4x4 windows; at 192x288 stage 2 is 6x9: two 7x7 windows)
    ref = timm_reference("efficientvit_m1")
    ours = edgevits.create_model("efficientvit_m1", checkpoint=ref.state_dict()).eval()
    _check(ours, ref, torch.randn(2, 3, *size))


def test_window_padding_matches_timm_at_256(timm_reference):
    # 256 -> stage maps 16, 8, 4: stages 1 and 2 pad to 21 and 14 and attend in 7x7 windows, as timm does
    ref = timm_reference("efficientvit_m0", img_size=256)
    ours = edgevits.create_model("efficientvit_m0", checkpoint=ref.state_dict()).eval()
    _check(ours, ref, torch.randn(2, 3, 256, 256))


def _to_official(timm_sd, flat_se=()):
    """timm keys -> the official microsoft/Cream keys (the inverse of the key map), with the derived
    ``attention_bias_idxs`` buffers the release files carry; SE weights listed in ``flat_se`` stored 2-D."""
    out = {}
    for k, v in timm_sd.items():
        k = re.sub(r"^patch_embed\.conv(\d)\.", lambda m: f"patch_embed.{2 * (int(m.group(1)) - 1)}.", k)
        k = re.sub(r"\.conv\.(weight|bias)$", r".c.\1", k)
        k = re.sub(r"^(head|head_dist)\.linear\.", r"\1.l.", k)
        m = re.match(r"^stages\.(\d)\.(downsample\.(res1|patchmerge|res2)|blocks\.(\d+))\.(.*)", k)
        if m:
            s, rest = int(m.group(1)), m.group(5)
            if m.group(3):
                j = ("res1", "patchmerge", "res2").index(m.group(3))
            else:
                j = int(m.group(4)) + (3 if s > 0 else 0)
            k = f"blocks{s + 1}.{j}.{rest}"
        if k in flat_se:
            v = v.flatten(1)
        out[k] = v
        if k.endswith("attention_biases"):
            n = v.shape[1]
            out[k.replace("attention_biases", "attention_bias_idxs")] = torch.zeros(n, n, dtype=torch.long)
    return out


@pytest.mark.parametrize("name", ["efficientvit_m0", "efficientvit_m5"])
def test_official_release_file_loads_and_matches(name, tmp_path, timm_reference):
    ref = timm_reference(name)
    flat = ("blocks2.1.se.fc1.weight", "blocks3.1.se.fc2.weight")
    official = _to_official(ref.state_dict(), flat_se=flat)
    assert "blocks1.0.mixer.m.attn.qkvs.0.c.weight" in official and "head.l.weight" in official
    assert official[flat[0]].dim() == 2 and "blocks3.3.mixer.m.attn.attention_bias_idxs" in official
    path = tmp_path / f"{name}.pth"
    torch.save({"model": official}, path)
    ours = edgevits.create_model(name, checkpoint=path).eval()
    _check(ours, ref, torch.randn(2, 3, 224, 224))


def test_official_file_with_a_distillation_head_builds_one_and_averages_it(timm_reference):
    ref = timm_reference("efficientvit_m0")
    official = _to_official(ref.state_dict())
    g = torch.Generator().manual_seed(1)
    for k, v in ref.head.state_dict().items():
        v = torch.randn(v.shape, generator=g) if v.is_floating_point() else v
        official[f"head_dist.{k.replace('linear.', 'l.')}"] = v.abs() + 0.5 if k.endswith("running_var") else v
    ours = edgevits.create_model("efficientvit_m0", checkpoint={"model": official}).eval()
    assert ours.config.distillation and ours.head_dist is not None
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        feats = ours.pool(ours.forward_features(x))
        torch.testing.assert_close(ours(x), (ours.head(feats) + ours.head_dist(feats)) / 2, rtol=0, atol=0)
        fused = edgevits.fuse_model(ours)
        assert fused.head_dist is None
    _check(fused, ours, x)


def test_bias_tables_are_never_stale():
    model = calibrated(edgevits.create_model("efficientvit_m0"))
    x = torch.randn(2, 3, 224, 224)
    big = torch.randn(1, 3, 384, 384)  # stage 3 is 6x6 there: four padded 4x4 windows
    with torch.no_grad():
        before, before_big = model(x), model(big)
        for m in model.modules():
            if isinstance(m, CascadedGroupAttention):
                m.pos_bias.attention_biases.mul_(-1.5)  # an in-place write, as an EMA update or a load does
        after, after_big = model(x), model(big)
        fresh = edgevits.create_model("efficientvit_m0", checkpoint=model.state_dict()).eval()
        assert not torch.allclose(before, after) and not torch.allclose(before_big, after_big)
        torch.testing.assert_close(after, fresh(x), rtol=0, atol=0)
        torch.testing.assert_close(after_big, fresh(big), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["efficientvit_m0", "efficientvit_m1"])
def test_deploy_form_equals_the_eval_form_at_any_size(name):
    # in float64, so that the comparison checks the algebra (folding, cascade, windows) rather than fp32 rounding
    model = calibrated(edgevits.create_model(name)).double()
    fused = edgevits.fuse_model(model)
    assert any(isinstance(m, CascadedGroupAttentionDeploy) for m in fused.modules())
    assert not [m for m in fused.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for size in [(224, 224), (256, 256), (160, 160), (192, 288), (384, 384), (100, 150)]:
            for batch in (1, 2):
                x = torch.randn(batch, 3, *size, dtype=torch.float64)
                ref, out = model(x), fused(x)
                assert (out - ref).abs().max() <= 1e-9 * ref.abs().max(), (size, batch)


def test_deploy_form_in_float32_is_within_rounding():
    model = calibrated(edgevits.create_model("efficientvit_m2"))
    _check(edgevits.fuse_model(model), model, torch.randn(2, 3, 256, 256))


def test_depthwise_conv_as_a_matrix_equals_the_conv():
    for k, size in [(3, (4, 4)), (5, (7, 7)), (7, (3, 5))]:
        weight = torch.randn(6, 1, k, k, dtype=torch.float64)
        x = torch.randn(2, 6, *size, dtype=torch.float64)
        ref = F.conv2d(x, weight, padding=k // 2, groups=6).flatten(2)  # (B, C, N)
        out = torch.einsum("cnm,bcm->bcn", dw_matrix(weight, size), x.flatten(2))
        torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("matrix_dw", [True, False], ids=["dw-as-matrices", "dw-as-conv"])
def test_local_window_attention_alone_pads_and_fuses(matrix_dw, monkeypatch):
    if not matrix_dw:  # the deploy form's other path for the query conv (taken for windows over 49 tokens)
        monkeypatch.setattr(CascadedGroupAttentionDeploy, "matrix_dw_max_tokens", 0)
    layer = LocalWindowAttention(32, key_dim=16, num_heads=2, attn_ratio=1.0, resolution=14, window=7,
                                 kernels=(5, 3))
    randomize_(layer)
    layer = calibrate_bn(layer.double(), [torch.randn(2, 32, 9, 11, dtype=torch.float64)])
    x = torch.randn(2, 32, 9, 11, dtype=torch.float64)  # pads to 14x14: four windows
    fused = edgevits.fuse_model(layer)
    with torch.no_grad():
        assert layer(x).shape == x.shape
        # float64 throughout: the deploy algebra holds to float64 rounding (~1e-13 here; 1e-9 is far above it)
        assert (fused(x) - layer(x)).abs().max() <= 1e-9 * layer(x).abs().max()


def test_features_only_gives_strides_16_32_64():
    model = edgevits.create_model("efficientvit_m0", features_only=True).eval()
    assert [f["reduction"] for f in model.feature_info] == [16, 32, 64]
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 256, 256))
    assert [tuple(f.shape[1:]) for f in feats] == [(64, 16, 16), (128, 8, 8), (192, 4, 4)]
