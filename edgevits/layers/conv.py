"""Convolution/linear + BatchNorm units and the algebra that folds BatchNorm away for deployment.

Every family builds its conv+BN and BN+linear pairs from the two classes here, so fusion is written once.
"""
from __future__ import annotations

import torch
from torch import nn


def _bn_scale_shift(bn: nn.BatchNorm1d | nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel affine map an eval-mode BatchNorm applies: y = x * scale + shift."""
    scale = bn.running_var.add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


@torch.no_grad()
def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """Return one conv equal to ``bn(conv(x))`` (BN in eval mode)."""
    scale, shift = _bn_scale_shift(bn)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
                      device=conv.weight.device, dtype=conv.weight.dtype)
    fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(shift)
    fused.bias.copy_(bias * scale + shift)
    return fused


@torch.no_grad()
def fuse_bn_conv(bn: nn.BatchNorm2d, conv: nn.Conv2d) -> nn.Conv2d:
    """Return one conv equal to ``conv(bn(x))``; exact only for an unpadded, ungrouped conv (a 1x1)."""
    if any(p != 0 for p in conv.padding) or conv.groups != 1:
        raise ValueError("a BatchNorm can only be folded into a following conv without padding or groups")
    scale, shift = _bn_scale_shift(bn)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0,
                      conv.dilation, 1, bias=True, device=conv.weight.device, dtype=conv.weight.dtype)
    fused.weight.copy_(conv.weight * scale.view(1, -1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(fused.bias)
    fused.bias.copy_(bias + (conv.weight.sum(dim=(2, 3)) * shift).sum(dim=1))
    return fused


@torch.no_grad()
def fuse_bn_linear(bn: nn.BatchNorm1d | nn.BatchNorm2d, linear: nn.Linear) -> nn.Linear:
    """Return one Linear equal to ``linear(bn(x))`` for per-feature BN (also BN2d followed by a spatial mean)."""
    scale, shift = _bn_scale_shift(bn)
    fused = nn.Linear(linear.in_features, linear.out_features, bias=True,
                      device=linear.weight.device, dtype=linear.weight.dtype)
    fused.weight.copy_(linear.weight * scale.view(1, -1))
    bias = linear.bias if linear.bias is not None else torch.zeros_like(fused.bias)
    fused.bias.copy_(bias + linear.weight @ shift)
    return fused


class ChannelAffine(nn.Module):
    """``x * weight + bias`` per channel of a (B, C, H, W) map: an eval-mode BatchNorm2d with nothing to fold
    it into (the deploy form of a model's final norm). Keeps the memory format of ``x``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight.detach().clone().view(1, -1, 1, 1))
        self.register_buffer("bias", bias.detach().clone().view(1, -1, 1, 1))

    @classmethod
    @torch.no_grad()
    def from_bn(cls, bn: nn.BatchNorm2d) -> "ChannelAffine":
        return cls(*_bn_scale_shift(bn))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.bias, x, self.weight)

    def extra_repr(self) -> str:
        return f"channels={self.weight.shape[1]}"


@torch.no_grad()
def fuse_linear_bn(linear: nn.Linear, bn: nn.BatchNorm1d) -> nn.Linear:
    """Return one Linear equal to ``bn(linear(x))``."""
    scale, shift = _bn_scale_shift(bn)
    fused = nn.Linear(linear.in_features, linear.out_features, bias=True,
                      device=linear.weight.device, dtype=linear.weight.dtype)
    fused.weight.copy_(linear.weight * scale.view(-1, 1))
    bias = linear.bias if linear.bias is not None else torch.zeros_like(shift)
    fused.bias.copy_(bias * scale + shift)
    return fused


@torch.no_grad()
def conv1x1_to_linear(conv: nn.Conv2d) -> nn.Linear:
    """The Linear equal to an ungrouped 1x1 conv, for running it on (..., C) tokens or channels-last maps."""
    if conv.kernel_size != (1, 1) or conv.groups != 1 or conv.stride != (1, 1):
        raise ValueError("only an ungrouped, unstrided 1x1 conv is a Linear")
    linear = nn.Linear(conv.in_channels, conv.out_channels, bias=conv.bias is not None,
                       device=conv.weight.device, dtype=conv.weight.dtype)
    linear.weight.copy_(conv.weight.flatten(1))
    if conv.bias is not None:
        linear.bias.copy_(conv.bias)
    return linear


@torch.no_grad()
def merge_convs(convs: list[nn.Conv2d], scales: list[float] | None = None) -> nn.Conv2d:
    """One 1x1 conv whose output channels are those of ``convs`` stacked, each optionally multiplied by a scale."""
    scales = scales or [1.0] * len(convs)
    ref = convs[0]
    out_chs = sum(c.out_channels for c in convs)
    merged = nn.Conv2d(ref.in_channels, out_chs, ref.kernel_size, ref.stride, ref.padding, bias=True,
                       device=ref.weight.device, dtype=ref.weight.dtype)
    merged.weight.copy_(torch.cat([c.weight * s for c, s in zip(convs, scales)]))
    merged.bias.copy_(torch.cat([(c.bias if c.bias is not None else torch.zeros(c.out_channels)) * s
                                 for c, s in zip(convs, scales)]))
    return merged


@torch.no_grad()
def scale_output_(layer: nn.Conv2d | nn.Linear, gamma: torch.Tensor) -> None:
    """Fold a per-channel output scale (a layer scale) into ``layer`` in place: layer(x) * gamma."""
    gamma = gamma.reshape(-1)
    layer.weight.mul_(gamma.view(-1, *([1] * (layer.weight.dim() - 1))))
    if layer.bias is not None:
        layer.bias.mul_(gamma)


@torch.no_grad()
def average_linears(a: nn.Linear, b: nn.Linear) -> nn.Linear:
    """One Linear equal to ``(a(x) + b(x)) / 2``: the two DeiT heads collapsed for inference."""
    out = nn.Linear(a.in_features, a.out_features, bias=True, device=a.weight.device, dtype=a.weight.dtype)
    out.weight.copy_((a.weight + b.weight) / 2)
    zero = torch.zeros(a.out_features, device=a.weight.device, dtype=a.weight.dtype)
    out.bias.copy_(((a.bias if a.bias is not None else zero) + (b.bias if b.bias is not None else zero)) / 2)
    return out


def folded_conv(module: nn.Module) -> nn.Conv2d:
    """The conv of a conv+BN pair with its BN folded in, whether ``module`` is still a ``ConvNorm`` or already the
    plain conv its ``fuse()`` returned (children are fused before their parents)."""
    if isinstance(module, ConvNorm):
        return module.fuse()
    if isinstance(module, nn.Conv2d):
        return module
    raise TypeError(f"expected a ConvNorm or a folded Conv2d, got {type(module).__name__}")


@torch.no_grad()
def channels_last_weights_(module: nn.Module) -> nn.Module:
    """Store the weights of every conv in ``module`` channels-last (in place), the layout the deploy forms compute
    in: oneDNN then never re-lays them out per call. Returns ``module``."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
    return module


class ConvNorm(nn.Module):
    """``BatchNorm2d(Conv2d(x))``; ``fuse()`` returns the single equivalent conv.

    ``bn_weight_init`` sets the BN scale at construction (EfficientViT starts some residual branches at 0).
    """

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1, padding: int | None = None,
                 groups: int = 1, bias: bool = False, bn_weight_init: float = 1.0):
        super().__init__()
        if padding is None:
            padding = kernel_size // 2
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, groups=groups, bias=bias)
        self.bn = nn.BatchNorm2d(out_chs)
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))

    def fuse(self) -> nn.Conv2d:
        return fuse_conv_bn(self.conv, self.bn)


class NormLinear(nn.Module):
    """``Linear(BatchNorm1d(x))`` (EfficientViT's classifier); ``fuse()`` returns one Linear."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.bn = nn.BatchNorm1d(in_features)
        self.linear = nn.Linear(in_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.bn(x))

    def fuse(self) -> nn.Linear:
        return fuse_bn_linear(self.bn, self.linear)
