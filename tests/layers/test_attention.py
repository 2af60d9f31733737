"""The attention zoo: one interface, reference formulas, swapping into SwiftFormer, and the cost analysis."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import edgevits
from edgevits.layers.attention import (REGISTRY, AdditiveAttention, MapToTokens, SeparableAttention,
                                       TokensToMap, TransposedAttention)
from edgevits.testing import assert_parity, calibrate_bn, import_timm, parity, randomize_

DIM = 32


def _matches(module, formula, x, reference=None):
    """``module(x)`` equals ``formula(reference or module, x)`` to the float32 rounding present (the formula, run on
    a float64 copy, gives the yardstick)."""
    import copy
    reference = module if reference is None else reference
    with torch.no_grad():
        ref64 = formula(copy.deepcopy(reference).double(), x.double())
        assert_parity(module(x), formula(reference, x), ref64, check_dependence=False)


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_attention_maps_tokens_to_tokens_and_trains(name):
    torch.manual_seed(0)
    attn = REGISTRY[name](DIM)
    with torch.no_grad():
        randomize_(attn)  # EfficientViT's output BN starts at zero, which would stop every gradient
    x = torch.randn(2, 20, DIM, requires_grad=True)  # a 4x5 grid, not square
    y = attn(x, (4, 5))
    assert y.shape == x.shape
    y.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for pname, p in attn.named_parameters():
        assert p.grad is not None, f"{name}: no gradient reached {pname}"
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient at {pname}"


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_attention_documents_its_complexity(name):
    cls = REGISTRY[name]
    doc = (cls.__doc__ or "") + (getattr(cls(DIM).__class__, "__doc__", "") or "")
    assert "O(N" in doc, f"{name}: the docstring should state the cost in N"


def test_additive_attention_matches_the_formula_in_both_revisions():
    torch.manual_seed(0)
    x = torch.randn(2, 9, DIM)
    for revision in ("current", "legacy"):
        def formula(attn, x):
            q = F.normalize(x @ attn.to_query.weight.T + attn.to_query.bias, dim=-1)
            k = F.normalize(x @ attn.to_key.weight.T + attn.to_key.bias, dim=-1)
            if revision == "current":
                a = (q @ attn.w_g) / math.sqrt(DIM)  # (B, N, 1)
                a = a / a.norm(dim=1, keepdim=True)  # L2 over the tokens
            else:
                a = torch.ones(2, 9, 1, dtype=x.dtype)  # softmax over a size-1 axis
            g = (a * q).sum(dim=1, keepdim=True)
            inner = (g * k) @ attn.proj.weight.T + attn.proj.bias + q
            return inner @ attn.final.weight.T + attn.final.bias
        _matches(AdditiveAttention(DIM, revision=revision), formula, x)


def test_legacy_additive_attention_ignores_w_g():
    torch.manual_seed(0)
    attn = AdditiveAttention(DIM, revision="legacy")
    x = torch.randn(1, 9, DIM)
    before = attn(x)
    with torch.no_grad():
        attn.w_g.mul_(-3.0)
    assert torch.equal(before, attn(x))


def test_separable_attention_matches_the_formula():
    torch.manual_seed(0)
    attn = SeparableAttention(DIM)
    x = torch.randn(2, 12, DIM)

    def formula(attn, x):
        w, b = attn.qkv_proj.weight, attn.qkv_proj.bias
        scores = x @ w[:1].T + b[:1]  # (B, N, 1)
        key = x @ w[1:DIM + 1].T + b[1:DIM + 1]
        value = x @ w[DIM + 1:].T + b[DIM + 1:]
        weights = torch.exp(scores) / torch.exp(scores).sum(dim=1, keepdim=True)
        context = (weights * key).sum(dim=1, keepdim=True)
        return (torch.clamp(value, min=0) * context) @ attn.out_proj.weight.T + attn.out_proj.bias
    _matches(attn, formula, x)


def test_separable_attention_equals_mobilevit_v2_on_one_patch_pixel():
    """timm's MobileViT-v2 layer on (B, C, P=1, N) is the same map with 1x1 convolutions."""
    timm = import_timm()
    from timm.models.mobilevit import LinearSelfAttention
    torch.manual_seed(0)
    ours, ref = SeparableAttention(DIM).eval(), LinearSelfAttention(DIM).eval()
    sd = {k: v.reshape(ref.state_dict()[k].shape) for k, v in ours.state_dict().items()}
    ref.load_state_dict(sd)
    x = torch.randn(2, 12, DIM)

    def on_one_patch_pixel(ref, x):  # (B, N, C) -> (B, C, 1, N) -> (B, N, C)
        return ref(x.transpose(1, 2).unsqueeze(2)).squeeze(2).transpose(1, 2)
    assert timm is not None
    _matches(ours, on_one_patch_pixel, x, reference=ref)


def test_transposed_attention_equals_xcit_cross_covariance_attention():
    import_timm()
    from timm.models.edgenext import CrossCovarianceAttn
    torch.manual_seed(0)
    ours = TransposedAttention(DIM, num_heads=4).eval()
    ref = CrossCovarianceAttn(DIM, num_heads=4, qkv_bias=True).eval()
    with torch.no_grad():
        ours.temperature.uniform_(0.5, 2.0)
    ref.load_state_dict(ours.state_dict())
    _matches(ours, lambda ref, x: ref(x), torch.randn(2, 12, DIM), reference=ref)


def test_transposed_attention_picks_a_head_count_dividing_the_width():
    assert TransposedAttention(220).num_heads == 5
    assert TransposedAttention(64).num_heads == 8
    with pytest.raises(ValueError, match="divisible"):
        TransposedAttention(30, num_heads=4)


def test_map_and_token_adapters_are_inverse_layouts():
    torch.manual_seed(0)
    attn = SeparableAttention(DIM)
    x = torch.randn(2, DIM, 3, 5)
    tokens = x.flatten(2).transpose(1, 2)
    y = TokensToMap(attn)(x)
    # layout changes only: the same arithmetic on the same values, so exactly equal
    torch.testing.assert_close(y.flatten(2).transpose(1, 2), attn(tokens), rtol=0, atol=0)
    back = MapToTokens(TokensToMap(attn))(tokens, (3, 5))
    torch.testing.assert_close(back, attn(tokens), rtol=0, atol=0)
    with pytest.raises(ValueError, match="hw="):
        MapToTokens(TokensToMap(attn))(tokens)  # 15 tokens are not a square


@pytest.mark.parametrize("name", list(REGISTRY))
def test_swiftformer_with_another_attention_builds_trains_and_fuses(name):
    torch.manual_seed(0)
    model = edgevits.create_model("swiftformer_xs", attention=name, num_classes=10, depths=(1, 1, 1, 1))
    x = torch.randn(2, 3, 64, 64)
    cls, dist = model(x)
    (cls.sum() + dist.sum()).backward()
    assert all(p.grad is not None for p in model.parameters())
    # float64: the randomised network amplifies float32 rounding (to ~4e-4 for local_window), hiding real errors
    model, x = model.double(), x.double()
    with torch.no_grad():
        randomize_(model)
        calibrate_bn(model, [torch.randn(4, 3, 64, 64, dtype=torch.float64) for _ in range(2)])
        ref = model(x)
        fused = edgevits.fuse_model(model)
        out = fused(x)
    assert out.shape == (2, 10)
    # this random 4-stage network amplifies a relative input change of 1e-14 to ~2e-9 at the logits (measured),
    # so float64 rounding shows up at ~1e-10..1e-9; a real mistake shows up at 1e-3 and above
    assert parity(out, ref)[0] < 1e-8
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())


def test_swiftformer_rejects_an_unknown_attention_with_the_choices():
    with pytest.raises(ValueError, match="separable"):
        edgevits.create_model("swiftformer_xs", attention="linformer")


def test_default_swiftformer_state_dict_keys_do_not_depend_on_the_zoo():
    keys = set(edgevits.create_model("swiftformer_xs").state_dict())
    assert "stages.0.blocks.2.attn.w_g" in keys and not any(".attn.attn." in k for k in keys)
