"""Shared layers: BN folding algebra, bias tables, the oneDNN fused linear, stochastic depth."""
import copy
import itertools

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from edgevits.layers import (ConvNorm, DropPath, NormLinear, RelPosBias, bias_index, fuse_bn_conv, fuse_bn_linear,
                             fuse_linear_bn, resize_table)
from edgevits.layers.misc import gelu_
from edgevits.layers.kernels import FusedLinear
from edgevits.testing import assert_parity, float64_reference


def _parity(out, ref, ref64):
    """``assert_parity`` for layer outputs on random inputs (no batch dependence to check)."""
    assert_parity(out, ref, ref64, check_dependence=False)


def _random_bn(bn):
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    return bn.eval()


def test_conv_bn_folds_exactly():
    unit = ConvNorm(8, 16, 3, stride=2, groups=2, bias=True)
    _random_bn(unit.bn)
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        _parity(unit.fuse()(x), unit(x), float64_reference(unit, x))


def test_bn_before_a_1x1_conv_folds_and_a_padded_conv_is_refused():
    bn, conv = _random_bn(nn.BatchNorm2d(8)), nn.Conv2d(8, 4, 1)
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        _parity(fuse_bn_conv(bn, conv)(x), conv(bn(x)), float64_reference(nn.Sequential(bn, conv), x))
    with pytest.raises(ValueError, match="padding"):
        fuse_bn_conv(bn, nn.Conv2d(8, 4, 3, padding=1))


def test_bn_and_linear_fold_both_ways():
    x = torch.randn(4, 8)
    unit = NormLinear(8, 3)
    _random_bn(unit.bn)
    with torch.no_grad():
        _parity(unit.fuse()(x), unit(x), float64_reference(unit, x))
        lin, bn = nn.Linear(8, 3), _random_bn(nn.BatchNorm1d(3))
        _parity(fuse_linear_bn(lin, bn)(x), bn(lin(x)), float64_reference(nn.Sequential(lin, bn), x))
        bn2d, head = _random_bn(nn.BatchNorm2d(8)), nn.Linear(8, 3)  # BN2d -> spatial mean -> Linear
        m = torch.randn(2, 8, 4, 4)

        def plain(bn2d, head, m):
            return head(bn2d(m).mean((2, 3)))
        m64 = m.double()
        _parity(fuse_bn_linear(bn2d, head)(m.mean((2, 3))), plain(bn2d, head, m),
                plain(copy.deepcopy(bn2d).double(), copy.deepcopy(head).double(), m64))


def _official_index(q_res, k_res, stride):
    """The official codes' first-seen enumeration of offsets (as in EfficientFormer V1/V2 and EfficientViT)."""
    q_points = list(itertools.product(range(q_res), range(q_res)))
    k_points = list(itertools.product(range(k_res), range(k_res)))
    offsets, idxs = {}, []
    for p1 in q_points:
        for p2 in k_points:
            off = (abs(p1[0] * stride - p2[0]), abs(p1[1] * stride - p2[1]))
            if off not in offsets:
                offsets[off] = len(offsets)
            idxs.append(offsets[off])
    return torch.tensor(idxs).view(len(q_points), len(k_points)), len(offsets)


@pytest.mark.parametrize("q_res,k_res,stride", [(7, 7, 1), (4, 4, 1), (7, 14, 2)])
def test_bias_index_equals_the_official_enumeration(q_res, k_res, stride):
    expected, n = _official_index(q_res, k_res, stride)
    assert n == k_res * k_res
    assert torch.equal(bias_index((q_res, q_res), (k_res, k_res), stride), expected)


def test_bias_table_resizes_bicubically_and_is_identity_at_its_own_size():
    table = torch.randn(8, 49)
    assert resize_table(table, (7, 7), (7, 7)) is table
    big = resize_table(table, (7, 7), (9, 12))
    assert big.shape == (8, 108)
    corner = big.view(8, 9, 12)[:, 0, 0]
    assert torch.allclose(corner, table.view(8, 7, 7)[:, 0, 0], atol=0.6)  # bicubic keeps the corner close


def test_bias_follows_in_place_edits_in_eval_form_and_freezes_once_fused():
    bias = RelPosBias(4, (7, 7))
    with torch.no_grad():
        bias.attention_biases.normal_()
    before = bias((7, 7), (7, 7)).clone()
    bias.attention_biases.data.add_(1.0)  # a .data write bypasses autograd's version counter
    assert torch.equal(bias((7, 7), (7, 7)), before + 1.0)  # a gather commutes with adding 1: exactly
    frozen = bias.fuse()
    assert torch.equal(frozen((7, 7), (7, 7)), bias((7, 7), (7, 7)))
    assert torch.equal(frozen((5, 5), (5, 5)), bias((5, 5), (5, 5)))  # other sizes: gathered once per size
    with torch.no_grad():
        frozen.table.add_(1.0)
    with torch.no_grad():  # resized to 5x5 bicubically: equal to the rounding of the resize
        shifted64 = RelPosBias(4, (7, 7)).double()
        shifted64.attention_biases.copy_(bias.attention_biases.double() + 1.0)
        _parity(frozen((5, 5), (5, 5)), bias((5, 5), (5, 5)) + 1.0, shifted64((5, 5), (5, 5)))
    assert torch.equal(frozen((7, 7), (7, 7)), bias((7, 7), (7, 7)) + 1.0)  # the training size too (a gather)


def test_frozen_bias_follows_a_loaded_table_at_every_size():
    src = RelPosBias(4, (7, 7))
    frozen = src.fuse()
    frozen((5, 5), (5, 5))  # fill the per-size cache
    other = RelPosBias(4, (7, 7))
    with torch.no_grad():
        other.attention_biases.normal_()
    frozen.load_state_dict({"table": other.attention_biases.detach(), "bias": frozen.bias})  # table only changes
    for size in [(7, 7), (5, 5)]:
        assert torch.equal(frozen(size, size), other(size, size))


@pytest.mark.parametrize("gelu_on_onednn", [False, True])
def test_fused_linear_equals_plain_ops_and_honours_weight_edits(gelu_on_onednn, monkeypatch):
    from edgevits.layers import kernels as onednn
    if gelu_on_onednn:  # a GELU on more than GEMM_GELU_MAX outputs runs fused in oneDNN's kernel
        monkeypatch.setattr(onednn, "GEMM_GELU_MAX", 0)
    lin = FusedLinear(16, 32)
    x, r = torch.randn(3, 5, 16), torch.randn(3, 5, 32)
    F = nn.functional

    def plain(act=None, residual=None, dtype=torch.float32):
        y = F.linear(x.to(dtype), lin.weight.to(dtype), lin.bias.to(dtype))
        y = F.gelu(y) if act else y
        return y if residual is None else y + residual.to(dtype)
    with torch.inference_mode():
        for kw in ({}, {"act": "gelu"}, {"residual": r}):
            _parity(lin(x, **kw), plain(**kw), plain(**kw, dtype=torch.float64))
    with torch.no_grad():
        lin.weight.mul_(2.0)
    with torch.inference_mode():
        _parity(lin(x), plain(), plain(dtype=torch.float64))
    clone = copy.deepcopy(lin)
    with torch.inference_mode():
        torch.testing.assert_close(clone(x, act="gelu"), lin(x, act="gelu"), rtol=0, atol=0)  # the same kernel
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        lin(x, act="gelu")
    assert counter.get_total_flops() == 2 * 3 * 5 * 16 * 32  # plain ops while counting
    y = lin(x.requires_grad_(), act="gelu")
    y.sum().backward()
    assert lin.weight.grad is not None


@pytest.mark.parametrize("kind, act, residual, bias", [
    ("1x1", None, False, True), ("1x1", "gelu", False, True), ("1x1", None, True, True), ("1x1", "gelu", True, False),
    ("dw3x3", "gelu", False, True), ("dw3x3", "gelu", True, True), ("3x3s2", None, False, True)])
def test_fused_conv_kernels_equal_plain_ops_and_follow_weight_edits(kind, act, residual, bias, monkeypatch):
    from edgevits.layers import kernels as onednn
    cin, cout = (16, 24) if kind != "dw3x3" else (16, 16)
    conv = {"1x1": lambda: nn.Conv2d(cin, cout, 1, bias=bias),
            "dw3x3": lambda: nn.Conv2d(cin, cout, 3, padding=1, groups=cin, bias=bias),
            "3x3s2": lambda: nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=bias)}[kind]()
    fused = onednn.FusedConv(conv, act)
    cl = torch.channels_last
    x = torch.randn(2, cin, 10, 12).contiguous(memory_format=cl)
    out_hw = (5, 6) if kind == "3x3s2" else (10, 12)
    r = torch.randn(2, cout, *out_hw).contiguous(memory_format=cl) if residual else None

    def want(dtype=torch.float32):
        c = copy.deepcopy(conv).to(dtype)
        y = c(x.to(dtype)) + (r.to(dtype) if residual else 0)
        return nn.functional.gelu(y) if act else y

    thresholds = [onednn.GEMM_GELU_MAX, 0] if kind == "1x1" and act else [onednn.GEMM_GELU_MAX]
    for limit in thresholds:  # a 1x1 conv with a GELU on a big map goes to oneDNN, on a small one to addmm
        monkeypatch.setattr(onednn, "GEMM_GELU_MAX", limit)
        with torch.inference_mode():
            got = fused(x, r)
        assert got.is_contiguous(memory_format=cl) and got.shape == (2, cout, *out_hw)
        with torch.no_grad():
            _parity(got, want(), want(torch.float64))
            conv.weight.mul_(-0.5)  # the kernel's prepared copy of the weight must follow an in-place edit
        with torch.inference_mode():
            got = fused(x, r)
        with torch.no_grad():
            _parity(got, want(), want(torch.float64))


def test_a_model_fused_under_inference_mode_keeps_its_prepared_weights_between_calls():
    import edgevits
    from edgevits.layers import kernels as onednn
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        model = edgevits.create_model("efficientformerv2_s0", num_classes=10).eval()
        fused = edgevits.fuse_model(model)
        assert not any(t.is_inference() for t in itertools.chain(fused.parameters(), fused.buffers()))
        first = fused(x)
        layers = [m for m in fused.modules() if isinstance(m, (onednn.FusedConv, onednn.FusedLinear))]
        prepared = [dict(m.__dict__.get("_onednn_packed", {})) for m in layers]
        assert all(prepared) or not onednn.conv_probe()
        torch.testing.assert_close(fused(x), first, rtol=0, atol=0)
        for m, before in zip(layers, prepared):  # cached, not re-made
            after = m.__dict__.get("_onednn_packed", {})
            assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
        ref = model(x)
    assert_parity(first, ref, float64_reference(model, x), check_dependence=False)


def test_fused_layers_broadcast_a_residual_as_the_plain_ops_do():
    from edgevits.layers import kernels as onednn
    conv = onednn.FusedConv(nn.Conv2d(8, 16, 1))
    lin = FusedLinear(8, 16)
    x = torch.randn(2, 8, 5, 6).contiguous(memory_format=torch.channels_last)
    r = torch.randn(1, 16, 1, 1).contiguous(memory_format=torch.channels_last)  # broadcasts over batch and map
    t, rt = torch.randn(2, 7, 8), torch.randn(16)
    lin64, conv64 = copy.deepcopy(lin).double(), copy.deepcopy(conv.conv).double()
    with torch.inference_mode():
        _parity(conv(x, r), conv.conv(x) + r, conv64(x.double()) + r.double())
        ref64 = nn.functional.linear(t.double(), lin64.weight, lin64.bias) + rt.double()
        _parity(lin(t, residual=rt), nn.functional.linear(t, lin.weight, lin.bias) + rt, ref64)
        out = lin(t, residual=rt.double())  # a float64 residual promotes, as the plain ops do
        assert out.dtype == torch.float64
        _parity(out.float(), nn.functional.linear(t, lin.weight, lin.bias) + rt, ref64)


def test_unfreezing_one_layer_of_a_deploy_model_gives_it_a_gradient():
    import edgevits
    fused = edgevits.fuse_model(edgevits.create_model("efficientformerv2_s0", num_classes=10).eval())
    first = fused.stem[0].conv.weight.requires_grad_(True)  # every layer after it gets an input needing a gradient
    fused(torch.randn(1, 3, 64, 64)).sum().backward()
    assert first.grad is not None and first.grad.abs().sum() > 0


def test_a_deploy_forward_with_autograd_takes_the_plain_ops_and_gives_gradients():
    import edgevits
    model = edgevits.create_model("efficientformerv2_s0", num_classes=10).eval()
    fused = edgevits.fuse_model(model)
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    fused(x).sum().backward()  # the oneDNN kernels have no autograd: a fused scope must not open here
    got = x.grad.clone()
    x.grad = None
    model(x).sum().backward()
    x64 = x.detach().double().requires_grad_()
    copy.deepcopy(model).double()(x64).sum().backward()
    assert_parity(got, x.grad, x64.grad, check_dependence=False)
    with torch.no_grad():  # and counting FLOPs sees every op of the deploy form
        assert edgevits.count_macs(fused, 64) > 0.9 * edgevits.count_macs(model, 64)


@pytest.mark.parametrize("layout", ["channels_last", "contiguous", "strided"])
def test_inplace_gelu_equals_gelu_in_every_layout(layout):
    base = torch.randn(2, 48, 6, 5) * 30  # large values: the channels-last case used to take PyTorch's slow path
    if layout == "channels_last":
        base = base.contiguous(memory_format=torch.channels_last)
    view = (lambda t: t[:, ::2]) if layout == "strided" else (lambda t: t)
    x = view(base)
    want = nn.functional.gelu(x)
    with torch.no_grad():
        y = view(base.clone(memory_format=torch.preserve_format))
        out = gelu_(y)
    assert out.data_ptr() == y.data_ptr() and out.stride() == x.stride()  # in place, layout kept
    _parity(out, want, nn.functional.gelu(x.double()))
    leaf = x.clone().requires_grad_()
    gelu_(leaf).sum().backward()  # with autograd it is out of place and differentiable
    assert leaf.grad is not None and torch.equal(leaf.detach(), x)


def test_drop_path_is_identity_in_eval_and_keeps_the_mean_in_training():
    dp = DropPath(0.5)
    x = torch.ones(4000, 3)
    assert dp.eval()(x) is x
    out = dp.train()(x)
    assert set(out.unique().tolist()) <= {0.0, 2.0} and abs(out.mean().item() - 1.0) < 0.1


def _deploy_subjects():
    from edgevits.layers import PreNormConvMlp
    from edgevits.layers.attention.attention4d import Attention4D, Attention4DDownsample
    return {
        "prenorm_mlp": lambda act: PreNormConvMlp(32, 64, act=act),
        "attention4d": lambda act: Attention4D(32, resolution=(7, 7), act=act),
        "attention4d_stride": lambda act: Attention4D(32, resolution=(4, 4), stride=2, act=act),
        "attention4d_downsample": lambda act: Attention4DDownsample(32, 48, resolution=7, act=act),
    }


@pytest.mark.parametrize("act", [nn.GELU, nn.ReLU, nn.SiLU], ids=lambda a: a.__name__)
@pytest.mark.parametrize("subject", list(_deploy_subjects()))
def test_a_deploy_form_keeps_its_source_activation_and_input_layout(subject, act):
    # fuse() fuses the exact GELU and ReLU into the kernels and runs any other activation as itself; the deploy
    # form takes the same (B, C, H, W) maps as its source, in either memory format
    from edgevits import fuse_model
    from edgevits.testing import calibrate_bn, randomize_
    torch.manual_seed(0)
    model = calibrate_bn(randomize_(_deploy_subjects()[subject](act)), [torch.randn(4, 32, 7, 7)])
    deployed = fuse_model(model)
    x = torch.randn(2, 32, 7, 7)
    with torch.no_grad():
        ref = model(x)
        for layout in (torch.contiguous_format, torch.channels_last):
            _parity(deployed(x.contiguous(memory_format=layout)), ref, float64_reference(model, x))


def test_fuse_leaves_its_source_as_it_was():
    # fuse() returns a new module: the folds (layer scales, LayerNorm affines) never write into the module it was
    # called on. Walked bottom-up as fuse_model does, checking every module's state around its own fuse().
    import edgevits
    from edgevits.layers import DeployModule
    from edgevits.testing import calibrated

    def walk(module):
        if isinstance(module, DeployModule):
            return module
        for name, child in list(module.named_children()):
            setattr(module, name, walk(child))
        if not callable(getattr(module, "fuse", None)):
            return module
        before = {k: v.clone() for k, v in module.state_dict().items()}
        out = module.fuse()
        after = module.state_dict()
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        assert not changed, f"{type(module).__name__}.fuse() changed {changed[:3]}"
        return out

    for name in ("swiftformer_xs", "efficientformer_l1", "efficientformerv2_s0", "efficientvit_m0"):
        with torch.no_grad():
            walk(calibrated(edgevits.create_model(name, img_size=64), size=64))


def test_the_kernel_probes_ignore_the_default_dtype_and_device_at_first_use():
    import subprocess
    import sys
    code = ("import torch\nfrom edgevits.layers import kernels\n{setup}"
            "print(kernels.linear_probe(), kernels.conv_probe())\n")
    plain = subprocess.run([sys.executable, "-c", code.format(setup="")], capture_output=True, text=True,
                           check=True).stdout
    odd = "torch.set_default_dtype(torch.float64)\ntorch.set_default_device('meta')\n"
    assert subprocess.run([sys.executable, "-c", code.format(setup=odd)], capture_output=True, text=True,
                          check=True).stdout == plain


def test_fuse_model_leaves_the_global_rng_alone():
    # its new layers' default initialisation (overwritten at once) once drew from the caller's random numbers
    import edgevits
    model = edgevits.create_model("efficientvit_m0", img_size=64).eval()
    state = torch.get_rng_state()
    edgevits.fuse_model(model)
    assert torch.equal(torch.get_rng_state(), state)
