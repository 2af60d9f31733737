"""SwiftFormer: exact parity with timm (current revision) and Hugging Face transformers (legacy revision), and
official-format checkpoints."""
import re

import pytest
import torch

import edgevits
from edgevits.testing import assert_parity, calibrated, float64_reference

VARIANTS = ["swiftformer_xs", "swiftformer_s", "swiftformer_l1", "swiftformer_l3"]


def _check(ours, ref, x):
    with torch.no_grad():
        assert_parity(ours(x), ref(x), float64_reference(ref, x))


@pytest.mark.parametrize("name", VARIANTS)
def test_timm_weights_give_timm_outputs(name, timm_reference):
    ref = timm_reference(name)
    ours = edgevits.create_model(name, checkpoint=ref.state_dict()).eval()
    _check(ours, ref, torch.randn(2, 3, 128, 128))


def _to_official(timm_sd):
    """timm keys -> the official Amshaker/SwiftFormer keys (inverse of timm's checkpoint filter)."""
    out = {}
    for k, v in timm_sd.items():
        k = k.replace("stem.", "patch_embed.").replace("head_dist.", "dist_head.").replace("attn.proj.", "attn.Proj.")
        k = re.sub(r"\.(layer_scale(?:_1|_2)?)\.gamma$", r".\1", k)
        m = re.match(r"^stages\.(\d+)\.(blocks|downsample)\.(.*)", k)
        if m:
            i, kind, rest = int(m.group(1)), m.group(2), m.group(3)
            k = f"network.{2 * i}.{rest}" if kind == "blocks" else f"network.{2 * i - 1}.{rest}"
        out[k] = v
    return out


def test_official_checkpoint_file_loads_and_matches(tmp_path, timm_reference):
    ref = timm_reference("swiftformer_xs")
    official = _to_official(ref.state_dict())
    assert "network.0.2.attn.Proj.weight" in official and official["network.0.0.layer_scale"].shape == (48, 1, 1)
    path = tmp_path / "swiftformer_xs.pth"
    torch.save({"model": official}, path)
    ours = edgevits.create_model("swiftformer_xs", checkpoint=path).eval()
    _check(ours, ref, torch.randn(3, 3, 96, 96))


def _hf_reference(dims, depths):
    from transformers import SwiftFormerConfig, SwiftFormerForImageClassification
    hf = SwiftFormerForImageClassification(SwiftFormerConfig(embed_dims=list(dims), depths=list(depths),
                                                             num_labels=1000))
    return calibrated(hf, batches=1, batch_size=4, size=96)


class _Logits(torch.nn.Module):
    """Hugging Face's model returning the logits tensor (for the float64 reference)."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, x):
        return self.hf(x).logits


@pytest.mark.parametrize("name", ["swiftformer_xs", "swiftformer_l1"])
def test_hugging_face_weights_select_the_legacy_revision_and_match(name):
    cfg = edgevits.get_entry(name).config
    hf = _hf_reference(cfg.embed_dims, cfg.depths)
    ours = edgevits.create_model(name, checkpoint=hf.state_dict()).eval()
    assert ours.config.attention_revision == "legacy"
    _check(ours, _Logits(hf), torch.randn(2, 3, 96, 96))


def test_the_two_revisions_differ_and_a_mismatch_is_refused():
    hf = _hf_reference((48, 56, 112, 220), (3, 3, 6, 4))
    legacy = edgevits.create_model("swiftformer_xs", checkpoint=hf.state_dict()).eval()
    current = edgevits.create_model("swiftformer_xs").eval()
    current.load_state_dict(legacy.state_dict())
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert (current(x) - legacy(x)).abs().max() > 1e-4  # w_g matters only in the current revision
    with pytest.raises(edgevits.CheckpointError, match="attention_revision"):
        edgevits.load_checkpoint(edgevits.create_model("swiftformer_xs"), hf.state_dict())


def test_legacy_revision_ignores_w_g():
    model = calibrated(edgevits.create_model("swiftformer_xs", attention_revision="legacy"), size=96)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        before = model(x)
        for name, p in model.named_parameters():
            if name.endswith("w_g"):
                p.mul_(-3.0)
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)  # the same arithmetic, w_g unused


def test_any_size_divisible_by_32_matches_timm(timm_reference):
    ref = timm_reference("swiftformer_xs")
    ours = edgevits.create_model("swiftformer_xs", checkpoint=ref.state_dict()).eval()
    _check(ours, ref, torch.randn(2, 3, 160, 288))


def test_reset_classifier_works_where_timm_crashes():
    model = edgevits.create_model("swiftformer_xs")
    model.reset_classifier(0)
    model.reset_classifier(0)
    model.reset_classifier(5)
    assert model.head.out_features == 5 and model.head_dist.out_features == 5
