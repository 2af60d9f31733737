"""What every edgevits classifier shares: common config fields, the DeiT-style heads, the common interface."""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager

import torch
from torch import nn

from ..layers import ChannelAffine, ConvNorm, average_linears, check_image_input, to_2tuple


@dataclass(frozen=True)
class Variant:
    """A variant a family module offers in its ``VARIANTS`` table (read by ``edgevits.registry``): its config and
    what its paper published (params_m, gmacs, top1, latency_ms or throughput, latency_device). ``timm_name``:
    timm's name for it when that differs from ours (None: the same name)."""

    config: Any
    published: dict = field(default_factory=dict)
    timm_name: str | None = None


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Fields every family accepts. Families subclass this with their architecture fields."""

    num_classes: int = 1000
    in_chans: int = 3
    img_size: int | tuple[int, int] = 224  # the training resolution; sizes bias tables where a family has them
    distillation: bool = True  # a second (DeiT) head: (cls, dist) in training, their mean in eval
    drop_rate: float = 0.0  # dropout before the classifier
    drop_path_rate: float = 0.0
    features_only: bool = False  # forward returns the list of stage outputs

    def __post_init__(self):
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if min(to_2tuple(self.img_size)) < 1 or self.in_chans < 1:
            raise ValueError(f"img_size and in_chans must be >= 1, got img_size={self.img_size}, "
                             f"in_chans={self.in_chans}")


def conv_stem(in_chans: int, dim: int, act: type[nn.Module]) -> nn.Sequential:
    """Two 3x3 stride-2 conv+BN (with bias) with ``act`` after each: stride 4, ``dim // 2`` then ``dim`` channels
    (SwiftFormer and both EfficientFormers)."""
    return nn.Sequential(ConvNorm(in_chans, dim // 2, 3, stride=2, bias=True), act(),
                         ConvNorm(dim // 2, dim, 3, stride=2, bias=True), act())


def drop_path_rates(rate: float, depths: tuple[int, ...]) -> list[list[float]]:
    """Stochastic-depth rates growing linearly from 0 to ``rate`` over all blocks (the official codes' rule), one
    list per stage."""
    total = sum(depths)
    flat = [rate * i / max(total - 1, 1) for i in range(total)]
    starts = [sum(depths[:i]) for i in range(len(depths))]
    return [flat[s:s + d] for s, d in zip(starts, depths)]


def stage_info(i: int, channels: int, reduction: int) -> dict:
    """A ``feature_info`` entry: stage ``i``'s output channels and stride."""
    return dict(num_chs=channels, reduction=reduction, module=f"stages.{i}")


class ClassifierModel(nn.Module):
    """Base of every family.

    A family defines ``stem``, ``stages`` (the stage outputs are (B, C, H, W) maps), ``norm`` (the final norm, or
    an Identity), ``num_features``, ``feature_info`` and ``stride`` (the input multiple it needs), and overrides
    ``forward_features`` / ``pool`` where its features are not a normalised map; the heads and the rest live here.
    """

    family = ""
    stride = 32
    channels_last = False  # deploy forms that run on channels-last maps set this on the instance
    # A context every forward pass runs in, or None. The deploy form (``edgevits.fuse_model``) sets the fast CPU
    # kernels' scope here, so that their global checks are made once per pass instead of once per layer.
    forward_context: Callable[[], ContextManager] | None = None

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model_name = ""
        self.num_classes = 0 if config.features_only else config.num_classes

    # -- heads -----------------------------------------------------------------------------------------------
    def _make_head(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _init_heads(self, norm: nn.Module) -> None:
        """Set the final ``norm`` and build the classifier(s) on the last stage's channels; each family calls this
        last in ``__init__``, after ``feature_info``. A ``features_only`` model returns the stage outputs, so it has
        no final norm either (no parameter left without a gradient)."""
        self.num_features = self.feature_info[-1]["num_chs"]
        self.norm = nn.Identity() if self.config.features_only else norm
        self.head_drop = nn.Dropout(self.config.drop_rate)
        self.head = self._make_head(self.num_classes)
        self.head_dist = self._make_head(self.num_classes) if self.config.distillation else None

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier(s) with fresh ones for ``num_classes`` (0 removes them: pooled features out).

        ``config.num_classes`` follows, so a checkpoint saved afterwards records the new class count."""
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        if self.config.features_only:
            raise ValueError("a features_only model returns the stage outputs and has no classifier to reset; "
                             "build it with features_only=False to classify")
        ref = next(itertools.chain(self.parameters(), self.buffers()))  # the device and dtype to build on
        self.num_classes = num_classes
        self.config = dataclasses.replace(self.config, num_classes=num_classes)
        self.head = self._make_head(num_classes).to(ref.device, ref.dtype).train(self.training)
        if self.head_dist is not None:  # fresh heads follow the model's mode (a BN1d head must not train in eval)
            self.head_dist = self._make_head(num_classes).to(ref.device, ref.dtype).train(self.training)

    def get_classifier(self) -> nn.Module:
        return self.head

    def check_input(self, x: torch.Tensor) -> None:
        """Raise an ``InputError`` naming what was expected when ``x`` is not a batch of images this model takes
        (the eval and the deploy form check alike)."""
        ref = next(self.parameters(), None)
        check_image_input(x, self.config.in_chans, self.stride, self.model_name or type(self).__name__,
                          None if ref is None or not ref.is_floating_point() else ref.dtype,
                          None if ref is None else ref.device)

    # -- forward ---------------------------------------------------------------------------------------------
    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x.contiguous(memory_format=torch.channels_last) if self.channels_last else x)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output of every stage, as (B, C, H, W) maps (``features_only``)."""
        x = self._stem(x)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's output after the final norm (unpooled)."""
        x = self._stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.norm(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3), keepdim=True).flatten(1)  # keepdim: the form XNNPACK's delegate takes

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        """Pool the features and classify. Training with a distillation head returns ``(cls, dist)`` logits."""
        x = self.head_drop(self.pool(x))
        if pre_logits:
            return x
        if self.head_dist is None:
            return self.head(x)
        cls, dist = self.head(x), self.head_dist(x)
        if self.training and not torch.jit.is_scripting():
            return cls, dist
        return (cls + dist) / 2

    def forward(self, x: torch.Tensor):
        self.check_input(x)
        if self.forward_context is None or torch.compiler.is_compiling():  # keeps dynamo out of the context
            return self._forward(x)
        with self.forward_context():
            return self._forward(x)

    def _forward(self, x: torch.Tensor):
        if self.config.features_only:
            return self.forward_stages(x)
        return self.forward_head(self.forward_features(x))

    # -- deploy form -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def finish_deploy_(self) -> None:
        """The model-level part of the deploy form, in place (called by ``edgevits.fuse_model`` on its copy once the
        children are fused): a final BatchNorm becomes a fixed per-channel affine (so ``forward_features`` still
        returns normalised features and a later ``reset_classifier`` keeps them) and the two heads collapse into one
        Linear. Logits are unchanged. Families extend it (memory layout, stem)."""
        if isinstance(getattr(self, "norm", None), nn.BatchNorm2d):
            self.norm = ChannelAffine.from_bn(self.norm)
        if isinstance(self.head, nn.Linear) and isinstance(self.head_dist, nn.Linear):
            self.head = average_linears(self.head, self.head_dist)
            self.head_dist = None
