"""EfficientFormer V1: exact parity with timm and with official-format files, any input size, a bias that is never
stale, resizing bias tables on load, and errors for checkpoints of another variant."""
import re

import pytest
import torch

import edgevits
from edgevits import CheckpointError
from edgevits.layers.attention.mhsa import MHSA
from edgevits.testing import assert_parity, calibrated, float64_reference

VARIANTS = ["efficientformer_l1", "efficientformer_l3", "efficientformer_l7"]


def _random_model(name="efficientformer_l1", **kw):
    return calibrated(edgevits.create_model(name, **kw), batches=1, batch_size=4, size=kw.get("img_size", 224))


def _check(ours, ref, x):
    with torch.no_grad():
        assert_parity(ours(x), ref(x), float64_reference(ref, x))


@pytest.mark.parametrize("name", VARIANTS)
def test_timm_weights_give_timm_outputs(name, timm_reference):
    ref = timm_reference(name)  # timm's V1 runs at 224 only
    ours = edgevits.create_model(name, checkpoint=ref.state_dict()).eval()
    _check(ours, ref, torch.randn(2, 3, 224, 224))


def _to_official(timm_sd):
    """timm keys -> official snap-research keys (the inverse of timm's checkpoint filter)."""
    stem = {"conv1": "0", "norm1": "1", "conv2": "3", "norm2": "4"}
    out = {}
    for k, v in timm_sd.items():
        k = re.sub(r"^stem\.(conv1|norm1|conv2|norm2)\.", lambda m: f"patch_embed.{stem[m[1]]}.", k)
        k = re.sub(r"^stages\.(\d+)\.blocks\.", lambda m: f"network.{2 * int(m[1])}.", k)
        k = re.sub(r"^stages\.(\d+)\.downsample\.conv\.", lambda m: f"network.{2 * int(m[1]) - 1}.proj.", k)
        k = re.sub(r"^stages\.(\d+)\.downsample\.norm\.", lambda m: f"network.{2 * int(m[1]) - 1}.norm.", k)
        k = re.sub(r"\.ls([12])\.gamma$", r".layer_scale_\1", k).replace("head_dist.", "dist_head.")
        out[k] = v
    return out


def test_official_checkpoint_file_loads_and_matches(tmp_path, timm_reference):
    ref = timm_reference("efficientformer_l1")
    official = _to_official(ref.state_dict())
    assert "network.6.4.token_mixer.attention_bias_idxs" in official  # the derived buffer is in the file
    assert "network.5.proj.weight" in official and official["network.0.0.layer_scale_1"].shape == (48,)
    path = tmp_path / "efficientformer_l1.pth"
    torch.save({"model": official}, path)
    ours = edgevits.create_model("efficientformer_l1", checkpoint=path).eval()
    _check(ours, ref, torch.randn(2, 3, 224, 224))
    report = edgevits.load_checkpoint(ours, path)
    assert report["source"] == "official" and not report["missing"]


def test_tables_resized_on_load_match_tables_resized_at_run_time():
    sd = _random_model().state_dict()
    at_224 = edgevits.create_model("efficientformer_l1", checkpoint=sd).eval()
    at_256 = edgevits.create_model("efficientformer_l1", img_size=256, checkpoint=sd).eval()
    assert at_256.stages[3].blocks[-1].attn.rel_pos.attention_biases.shape == (8, 64)
    _check(at_256, at_224, torch.randn(2, 3, 256, 256))  # the same resize, on load or at run time


def test_any_size_divisible_by_32_in_eval_and_deploy_form():
    model = _random_model()
    deployed = edgevits.fuse_model(model)
    for h, w in [(160, 160), (256, 256), (384, 384), (192, 288)]:
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            out = deployed(x)
        assert out.shape == (2, 1000)
        _check(deployed, model, x)


def test_bias_is_never_stale_after_in_place_updates():
    model = _random_model().eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        model(x)  # the official code and timm would cache the gathered bias here
        for module in model.modules():
            if hasattr(module, "attention_biases"):
                module.attention_biases.data.add_(1.0)  # an in-place write
                module.attention_biases.mul_(0.9).add_(0.1 * torch.randn_like(module.attention_biases))  # EMA-like
        fresh = edgevits.create_model("efficientformer_l1", checkpoint=model.state_dict()).eval()
        assert torch.equal(model(x), fresh(x))
        # load_state_dict after eval() is honoured too
        other = calibrated(edgevits.create_model("efficientformer_l1"), seed=1).state_dict()
        model.load_state_dict(other)
        assert torch.equal(model(x), edgevits.create_model("efficientformer_l1", checkpoint=other).eval()(x))


def test_deploy_form_gathers_once_and_folds_every_in_block_norm_affine():
    deployed = edgevits.fuse_model(_random_model())
    names = {type(m).__name__ for m in deployed.modules()}
    assert "BatchNorm2d" not in names and "RelPosBias" not in names and "RelPosBiasDeploy" in names
    # inside the blocks every LayerNorm affine is folded into the next Linear; the final norm keeps its affine, so
    # that forward_features returns what the eval form returns
    assert all(not isinstance(m, torch.nn.LayerNorm) or m.weight is None for m in deployed.stages.modules())
    assert deployed.head_dist is None
    assert not any("attention_biases" in k for k, _ in deployed.named_parameters())


def test_checkpoint_of_another_variant_names_the_shape_clashes():
    sd = edgevits.create_model("efficientformer_l1").state_dict()
    with pytest.raises(CheckpointError, match=r"shape clashes") as info:
        edgevits.create_model("efficientformer_l3", checkpoint=sd)
    assert "stem.0.conv.weight" in str(info.value)


def test_mhsa_without_bias_is_plain_self_attention():
    attn = MHSA(64, key_dim=16, num_heads=4, attn_ratio=2).eval()
    assert attn.rel_pos is None
    x = torch.randn(2, 12, 64)

    def formula(attn, x):
        q, k, v = attn.qkv(x).view(2, 12, 4, -1).transpose(1, 2).split([16, 16, 32], dim=3)
        weights = ((q @ k.transpose(-1, -2)) * 16 ** -0.5).softmax(-1)
        return attn.proj(weights.matmul(v).transpose(1, 2).reshape(2, 12, -1))
    with torch.no_grad():
        assert_parity(attn(x), formula(attn, x), formula(attn.double(), x.double()))


def test_mhsa_with_bias_needs_the_grid_for_non_square_token_counts():
    attn = MHSA(32, key_dim=8, num_heads=2, resolution=(2, 3))
    assert attn(torch.randn(1, 6, 32), hw=(2, 3)).shape == (1, 6, 32)
    with pytest.raises(ValueError, match="hw="):
        attn(torch.randn(1, 6, 32))


def test_deploy_form_uses_plain_ops_for_autograd_and_counting():
    model = _random_model()
    deployed = edgevits.fuse_model(model)
    assert abs(edgevits.count_macs(deployed) - edgevits.count_macs(model)) <= 0.001 * edgevits.count_macs(model)
    x = torch.randn(1, 3, 224, 224, requires_grad=True)
    deployed(x).sum().backward()  # the oneDNN kernels have no autograd; the plain path is taken
    with torch.no_grad():
        assert_parity(deployed(x), model(x), float64_reference(model, x), check_dependence=False)
    assert x.grad is not None and x.grad.abs().sum() > 0
