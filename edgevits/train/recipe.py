"""Where a run's unset settings come from: the papers' recipe (``--recipe paper``) or one that adapts to the run
(``--recipe auto``, the default). A flag given on the command line always wins.

The papers train on 1.28 M ImageNet images for 300 epochs (about 3.8e8 images seen) with a global batch of 1024,
RandAugment m9, Mixup 0.8, CutMix 1.0, random erasing 0.25, random resized crops down to 8 % of the image and an EMA
of 0.99996. On a few thousand images for ten epochs the same recipe barely learns (the learning rate scaled to the
batch is 6e-5 at batch 64, and the augmentation is made for a hundred times longer training). ``auto`` keeps the
papers' optimiser (AdamW, warm-up + cosine, label smoothing, adaptive gradient clipping) and scales what depends on
the run with the number of images it will see (images x epochs); every rule, and the runs that chose it, is in
docs/training.md ("How the defaults were chosen"; ``benchmarks/train_search.py``).
"""
from __future__ import annotations

import dataclasses
import math

from .config import TrainConfig

RECIPES = ("auto", "paper")

FIELDS = ("batch_size", "lr", "warmup_epochs", "ema_decay", "hflip", "scale_min", "randaugment", "color_jitter",
          "reprob", "mixup", "cutmix", "smoothing", "backbone_lr_scale", "bn_images")
"""The settings a recipe decides when the command line leaves them unset (``None``)."""

PAPER = dict(batch_size=128, warmup_epochs=5, ema_decay=0.99996, hflip=0.5, scale_min=0.08,
             randaugment="rand-m9-mstd0.5-inc1", color_jitter=0.4, reprob=0.25, mixup=0.8, cutmix=1.0, smoothing=0.1,
             backbone_lr_scale=1.0, bn_images=0)
"""The papers' recipe (DeiT's, as SwiftFormer, EfficientFormer V1/V2 and EfficientViT train); the learning rate is
1e-3 x global batch / 1024."""

PAPER_SCALE = 1.28e6 * 300
"""Images the papers' runs see (ImageNet-1k, 300 epochs): where ``auto`` reaches the papers' augmentation."""


def strength(images_seen: float) -> float:
    """How much of the papers' augmentation a run that sees ``images_seen`` images gets: 0 up to 1e5 images seen
    (a few thousand images for a few tens of epochs), 1 at the papers' 3.8e8, log-linear between."""
    return min(1.0, max(0.0, (math.log10(max(images_seen, 1.0)) - 5) / (math.log10(PAPER_SCALE) - 5)))


def _pow2_floor(x: float) -> int:
    return 2 ** int(math.floor(math.log2(max(x, 1.0))))


def auto(n_train: int, epochs: int, world_size: int, finetune: bool, batch: int | None = None
         ) -> tuple[dict, list[str]]:
    """The adaptive recipe for ``n_train`` training images and ``epochs`` epochs on ``world_size`` processes
    (``finetune``: the run starts from trained weights; ``batch``: the batch size when given). Returns the
    settings and one line of reasons each."""
    s = strength(n_train * epochs)
    given_batch = batch is not None
    batch = batch or min(128, max(8, _pow2_floor(n_train / 32 / world_size)))  # at least ~32 steps per epoch
    global_batch = batch * world_size
    base = 2e-3  # from scratch and fine-tuning alike: lower rates lost 2-35 points fine-tuning on mnist5k-rot
    # the small-run rule, moving geometrically to the papers' (1e-3 x global batch / 1024) as the run grows to theirs
    lr = (base * math.sqrt(global_batch / 64)) ** (1 - s) * (1e-3 * global_batch / 1024) ** s
    m = round(9 * s)
    values = dict(
        batch_size=batch, lr=lr, warmup_epochs=min(5, max(1, round(epochs / 10))),
        ema_decay=0.0 if epochs * math.ceil(n_train / global_batch) < 1000 else PAPER["ema_decay"],
        hflip=0.0, scale_min=round(0.08 + (1 - s) * (0.8 - 0.08), 2),
        randaugment=f"rand-m{m}-mstd0.5-inc1" if m >= 3 else "none", color_jitter=0.4 * s if m < 3 else 0.4,
        reprob=round(0.25 * s, 3) if s >= 0.3 else 0.0, mixup=round(0.8 * s, 3) if s >= 0.5 else 0.0,
        cutmix=round(s, 3) if s >= 0.5 else 0.0, smoothing=0.1, backbone_lr_scale=1.0,
        bn_images=min(n_train, 512))
    seen = f"{n_train:,} images x {epochs} epochs = {n_train * epochs:,.0f} seen: {100 * s:.0f}% of the papers' " \
           "augmentation"
    rate = f"{base:g} x sqrt(global batch / 64)" + (f", {100 * s:.0f}% of the way to the papers' 1e-3 x global " \
                                                    "batch / 1024" if s > 0 else "")
    why = [seen, f"batch {batch} per process " + ("(given)" if given_batch else
                                                  "(about 32 steps per epoch or more, at most 128)"),
           f"peak lr {lr:.3g} ({rate}" + ("; fine-tuning at the same rate, the backbone's as the head's"
                                          if finetune else "") + ")"]
    return values, why


def paper(world_size: int, batch: int | None = None) -> tuple[dict, list[str]]:
    """The papers' recipe; the learning rate scaled to the global batch (``batch`` per process when given, else
    128) as they scale it."""
    batch = batch or PAPER["batch_size"]
    values = dict(PAPER, batch_size=batch, lr=1e-3 * batch * world_size / 1024)
    return values, ["the papers' recipe (DeiT's): batch 128 per process, lr 1e-3 x global batch / 1024"]


def settle(cfg: TrainConfig, n_train: int, world_size: int) -> tuple[TrainConfig, list[str]]:
    """``cfg`` with every recipe setting it leaves unset decided (``cfg.recipe``), and the lines that say what was
    decided and why (the run's log shows them)."""
    finetune = bool(cfg.checkpoint or cfg.pretrained)
    chosen, why = (auto(n_train, cfg.epochs, world_size, finetune, cfg.batch_size) if cfg.recipe == "auto"
                   else paper(world_size, cfg.batch_size))
    given = {f: getattr(cfg, f) for f in FIELDS if getattr(cfg, f) is not None}
    settled = dataclasses.replace(cfg, **{**chosen, **given})
    lines = [f"recipe {cfg.recipe}: " + "; ".join(why)]
    decided = [f for f in FIELDS if f not in given]
    if decided:
        lines.append("  decided: " + ", ".join(f"{f.replace('_', '-')} {getattr(settled, f)}" for f in decided))
    if given:
        lines.append("  given: " + ", ".join(f"{f.replace('_', '-')} {v}" for f, v in given.items()))
    flips = "on (p=%g)" % settled.hflip if settled.hflip else "off"
    lines.append(f"  horizontal flips {flips}: " + ("pass --hflip 0 for digits, text, or anything whose mirror "
                                                   "image is another class" if settled.hflip else
                                                   "pass --hflip 0.5 for photographs of things a mirror does not "
                                                   "change (a mirrored digit or letter can be another class, so "
                                                   "auto does not flip)"))
    return settled, lines
