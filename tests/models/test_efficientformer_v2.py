"""EfficientFormerV2: parity with timm and with official-format files, bias tables at any size, never stale."""
import itertools
import math
import re

import pytest
import torch

import edgevits
from edgevits.checkpoint import CheckpointError
from edgevits.layers import RelPosBias, resize_table
from edgevits.testing import assert_parity, calibrate_bn, float64_reference, parity, randomize_

VARIANTS = ["efficientformerv2_s0", "efficientformerv2_s1", "efficientformerv2_s2", "efficientformerv2_l"]


def _check(ours, ref, x):
    with torch.no_grad():
        assert_parity(ours(x), ref(x), float64_reference(ref, x))


def _biases(model):
    return [m.attention_biases for m in model.modules() if isinstance(m, RelPosBias)]


@pytest.mark.parametrize("name", VARIANTS)
def test_timm_weights_give_timm_logits(name, timm_reference):
    ref = timm_reference(name, 128)  # both built for 128: bias tables of that grid
    model = edgevits.create_model(name, checkpoint=ref.state_dict(), img_size=128).eval()
    _check(model, ref, torch.randn(2, 3, 128, 128))


# -- official files ------------------------------------------------------------------------------------------------
# timm -> official key names (snap-research/EfficientFormer models/efficientformer_v2.py), the inverse of the map
# timm's own checkpoint filter applies, written independently of edgevits.checkpoint.convert.
_TO_OFFICIAL = [
    (r"^stem\.conv1\.conv\.", "patch_embed.0."), (r"^stem\.conv1\.bn\.", "patch_embed.1."),
    (r"^stem\.conv2\.conv\.", "patch_embed.3."), (r"^stem\.conv2\.bn\.", "patch_embed.4."),
    (r"^head_dist\.", "dist_head."),
    (r"\.mlp\.fc1\.conv\.", ".mlp.fc1."), (r"\.mlp\.fc1\.bn\.", ".mlp.norm1."),
    (r"\.mlp\.mid\.conv\.", ".mlp.mid."), (r"\.mlp\.mid\.bn\.", ".mlp.mid_norm."),
    (r"\.mlp\.fc2\.conv\.", ".mlp.fc2."), (r"\.mlp\.fc2\.bn\.", ".mlp.norm2."),
    (r"\.ls([12])\.gamma$", r".layer_scale_\1"),
    (r"\.attn\.q\.local\.", ".attn.q.local.0."),
    (r"\.q\.proj\.conv\.", ".q.proj.0."), (r"\.q\.proj\.bn\.", ".q.proj.1."),
    (r"\.proj\.conv\.", ".proj.1."), (r"\.proj\.bn\.", ".proj.2."),
    (r"\.conv\.", ".0."), (r"\.bn\.", ".1."),
]


def _official_key(key):
    m = re.match(r"^stages\.(\d+)\.downsample\.conv\.(conv|bn)\.(.*)", key)
    if m:  # the embeddings' conv + BN: proj/norm (network.1, .3), conv/bn next to the attention (network.5)
        n, part, leaf = int(m.group(1)), m.group(2), m.group(3)
        names = {"conv": "proj", "bn": "norm"} if n < 3 else {"conv": "conv", "bn": "bn"}
        return f"network.{2 * n - 1}.{names[part]}.{leaf}"
    for pattern, repl in _TO_OFFICIAL:
        key = re.sub(pattern, repl, key)
    m = re.match(r"^stages\.(\d+)\.blocks\.(.*)", key)
    if m:
        return f"network.{2 * int(m.group(1))}.{m.group(2)}"
    m = re.match(r"^stages\.(\d+)\.downsample\.(.*)", key)
    if m:
        return f"network.{2 * int(m.group(1)) - 1}.{m.group(2)}"
    return key


def _official_index(q_res, k_res, step):
    """attention_bias_idxs as the official code builds it: offset ids in first-seen order."""
    offsets, idxs = {}, []
    for p1 in itertools.product(range(q_res), range(q_res)):
        for p2 in itertools.product(range(k_res), range(k_res)):
            off = (abs(p1[0] * step - p2[0]), abs(p1[1] * step - p2[1]))
            idxs.append(offsets.setdefault(off, len(offsets)))
    return torch.tensor(idxs).view(q_res * q_res, k_res * k_res)


def _official_state_dict(ref):
    sd = {}
    for key, value in ref.state_dict().items():
        new = _official_key(key)
        if new.endswith(("layer_scale_1", "layer_scale_2")):
            value = value.reshape(-1, 1, 1)
        sd[new] = value
        if new.endswith("attention_biases"):
            k_res = math.isqrt(value.shape[1])
            down = ".attn." in new  # the downsampling attention: 7x7 queries on the 14x14 key grid
            index = _official_index(k_res // 2, k_res, 2) if down else _official_index(k_res, k_res, 1)
            sd[new.replace("attention_biases", "attention_bias_idxs")] = index
    return sd


def test_official_file_with_index_buffers_loads_and_matches(tmp_path, timm_reference):
    name = "efficientformerv2_s0"
    ref = timm_reference(name)
    sd = _official_state_dict(ref)
    assert "network.5.attn.q.local.0.weight" in sd and "network.4.5.token_mixer.proj.1.weight" in sd
    assert "network.5.attn.attention_bias_idxs" in sd and sd["network.5.attn.attention_bias_idxs"].shape == (49, 196)
    assert "network.3.proj.weight" in sd and "dist_head.weight" in sd
    path = tmp_path / "eformer_s0_450.pth"
    torch.save({"model": sd}, path)
    model = edgevits.create_model(name, checkpoint=path).eval()
    _check(model, ref, torch.randn(2, 3, 224, 224))
    report = edgevits.load_checkpoint(model, path)
    assert report["source"] == "official"


# -- bias tables ---------------------------------------------------------------------------------------------------
def test_tables_resize_on_load_at_another_size(timm_reference):
    name = "efficientformerv2_s0"
    ref = timm_reference(name)
    at224 = edgevits.create_model(name, checkpoint=ref.state_dict()).eval()
    at256 = edgevits.create_model(name, img_size=256, checkpoint=ref.state_dict()).eval()
    shapes = sorted({tuple(b.shape) for b in _biases(at256)})
    assert shapes == [(8, 64), (8, 256)]  # 8x8 attention grids, the 16x16 key grid of the downsampling attention
    table = at256.stages[3].blocks[-1].token_mixer.pos_bias.attention_biases
    stored = ref.stages[3].blocks[-1].token_mixer.attention_biases
    torch.testing.assert_close(table, resize_table(stored, (7, 7), (8, 8)), rtol=0, atol=0)  # the same op
    # a model defined at 224 resizes its tables at run time the same way
    x = torch.randn(2, 3, 256, 256)
    _check(at256, at224, x)
    _check(edgevits.fuse_model(at256), at256, x)


@pytest.mark.parametrize("size", [160, 384, (192, 288)], ids=str)
def test_deploy_form_matches_at_other_sizes(size, timm_reference):
    h, w = (size, size) if isinstance(size, int) else size
    model = timm_reference("efficientformerv2_s0")
    model = edgevits.create_model("efficientformerv2_s0", checkpoint=model.state_dict()).eval()
    fused = edgevits.fuse_model(model)
    x = torch.randn(2, 3, h, w)
    _check(fused, model, x)
    with torch.no_grad():
        again = fused(x)  # the per-size gather is cached, the second call must agree
        torch.testing.assert_close(again, fused(x), rtol=0, atol=0)


def test_in_place_bias_change_is_never_stale():
    model = edgevits.create_model("efficientformerv2_s0")
    randomize_(model)
    model = calibrate_bn(model, [torch.randn(2, 3, 224, 224)])
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        model(x)  # the official code and timm would cache the gathered bias here
        for table in _biases(model):
            table.mul_(-2.0).add_(0.5)  # as an EMA update or a .data write would
        out = model(x)
        fresh = edgevits.create_model("efficientformerv2_s0", checkpoint=model.state_dict()).eval()
        torch.testing.assert_close(out, fresh(x), rtol=0, atol=0)
        model.load_state_dict(edgevits.create_model("efficientformerv2_s0").state_dict())
        assert not torch.allclose(model(x), out)


# -- heads and checkpoints -----------------------------------------------------------------------------------------
def test_without_distillation_head_trains_fuses_and_loads():
    model = edgevits.create_model("efficientformerv2_s0", distillation=False, num_classes=10)
    assert model.head_dist is None
    out = model.train()(torch.randn(2, 3, 160, 160))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 10)
    sd = {k: v for k, v in model.state_dict().items()}
    again = edgevits.create_model("efficientformerv2_s0", checkpoint=sd)  # the missing head_dist is inferred
    assert again.head_dist is None and again.num_classes == 10
    fused = edgevits.fuse_model(model.eval())
    _check(fused, model, torch.randn(2, 3, 224, 224))


def test_checkpoint_of_another_variant_raises_a_checkpoint_error():
    sd = edgevits.create_model("efficientformerv2_s0").state_dict()
    with pytest.raises(CheckpointError, match="shape clashes"):
        edgevits.create_model("efficientformerv2_s1", checkpoint=sd)
    with pytest.raises(CheckpointError, match="no known efficientformer_v2 format"):
        edgevits.create_model("efficientformerv2_s0", checkpoint={"foo.weight": torch.zeros(1)})


def test_deploy_form_fused_cpu_kernels_match_plain_ops(monkeypatch):
    from edgevits.layers import kernels as onednn
    model = edgevits.create_model("efficientformerv2_s0")
    randomize_(model)
    fused = edgevits.fuse_model(calibrate_bn(model, [torch.randn(2, 3, 224, 224)]))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        fast = fused(x)
        # every fused conv on ordinary ops (the 1x1 GEMM path too), as on GPUs, other builds and while tracing
        monkeypatch.setattr(onednn.FusedConv, "_fast_ok", lambda *args: False)
        plain = fused(x)
    assert_parity(fast, plain, float64_reference(fused, x))


@pytest.mark.parametrize("size", [224, (192, 288)], ids=str)
def test_deploy_algebra_is_exact_in_float64(size):
    # float32 rounding, amplified by the randomised BNs and layer scales, hides small mistakes near the 1e-5
    # parity threshold; in float64 every fold (BN, layer scale, q scale, talking head into the bias, the
    # query's subsampling into its dw conv) must hold to rounding.
    h, w = (size, size) if isinstance(size, int) else size
    model = edgevits.create_model("efficientformerv2_s0")
    randomize_(model)
    model = calibrate_bn(model.double(), [torch.randn(2, 3, 224, 224, dtype=torch.float64)])
    fused = edgevits.fuse_model(model)
    x = torch.randn(2, 3, h, w, dtype=torch.float64)
    with torch.no_grad():
        logits, centred = parity(fused(x), model(x))
    assert logits <= 1e-9 and centred <= 1e-9, (logits, centred)
