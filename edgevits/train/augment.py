"""The training augmentation, built from albumentations' ops: random resized crop, horizontal flip, RandAugment (or
colour jitter), normalisation, random erasing. Mixup and CutMix act on whole batches and stay in ``data.Mixer``.

albumentations was measured 2.8x (32 px) and 6.5x (224 px) faster than kornia for this pipeline on one CPU thread
(``benchmarks/augment_speed.py``); against the PIL code it replaces it is 2.2x faster at 224 px and 2.4x slower at
32 px (per-image overhead; still about 1,600 images/s on one thread, five times what the models train at on 32 px
images). It has no RandAugment, so
``RandAugment`` below draws ``num_ops`` of its ops per image, as timm's ``rand-m9-mstd0.5-inc1`` does, with these
differences (docs/training.md): the magnitude sets the *range* an op's strength is drawn from uniformly, not the
centre of a normal draw (so ``mstd`` only widens the range), there is no SolarizeAdd, and the ops are
albumentations' (OpenCV) implementations, whose rounding and fill differ slightly from PIL's.

Every random choice is seeded per image from (seed, epoch, position in the epoch), so a resumed run sees exactly
the images an uninterrupted one does, whatever the number of loader processes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import albumentations as A
from albumentations.core.composition import BaseCompose
import cv2
import numpy as np
import torch
from PIL import Image

from ..checkpoint.preprocess import IMAGENET_MEAN, IMAGENET_STD

_INTERPOLATION = {"bicubic": cv2.INTER_CUBIC, "bilinear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST,
                  "lanczos": cv2.INTER_LANCZOS4, "box": cv2.INTER_AREA, "hamming": cv2.INTER_LINEAR}
"""OpenCV's kernel for each of ``preprocess.INTERPOLATIONS`` (OpenCV has no Hamming window: bilinear; its area
averaging stands for PIL's box filter)."""


@dataclass(frozen=True)
class RandAugment:
    """A RandAugment policy: ``num_ops`` ops per image, each applied with probability ``prob``, their strength
    drawn within ``magnitude`` (0-10) widened by ``magnitude_std``; written as timm writes it,
    ``rand-m9-n2-mstd0.5-inc1`` (``none`` turns it off)."""

    magnitude: float = 9.0
    num_ops: int = 2
    magnitude_std: float = 0.5
    prob: float = 0.5

    @classmethod
    def parse(cls, spec: str) -> "RandAugment | None":
        """Parse ``rand-m<M>[-n<N>][-mstd<S>][-p<P>][-inc1]``; ``none`` or ``''`` -> None; else ``ValueError``."""
        if not spec or spec.lower() == "none":
            return None
        parts = spec.split("-")
        if parts[0] != "rand":
            raise ValueError(f"unsupported augmentation policy {spec!r}: expected rand-m<M>-n<N>-mstd<S>")
        kw = {}
        names = {"m": "magnitude", "n": "num_ops", "mstd": "magnitude_std", "p": "prob"}
        for part in parts[1:]:
            m = re.fullmatch(r"(mstd|inc|m|n|p)([\d.]+)", part)
            if not m:
                raise ValueError(f"cannot read {part!r} in augmentation policy {spec!r}")
            key, val = m.groups()
            if key == "inc":
                if val != "1":
                    raise ValueError("only the increasing op set (inc1) is implemented")
                continue
            kw[names[key]] = int(val) if key == "n" else float(val)
        if not 0 <= kw.get("magnitude", 9) <= 10 or kw.get("num_ops", 2) < 1 or not 0 <= kw.get("prob", 0.5) <= 1:
            raise ValueError(f"augmentation policy {spec!r}: m must be in [0, 10], n >= 1 and p in [0, 1]")
        return cls(**kw)

    def ops(self, fill: tuple[int, ...]) -> A.SomeOf:
        """The albumentations ops at this policy's strength: geometric ones fill with ``fill`` (the mean colour)."""
        v = min(10.0, self.magnitude + 2 * self.magnitude_std) / 10  # the widest strength drawn
        p = self.prob
        geo = dict(fill=fill, p=p)
        shear, shift = float(np.degrees(np.arctan(0.3 * v))), 0.45 * v
        ops = [
            A.AutoContrast(p=p), A.Equalize(p=p), A.InvertImg(p=p),
            A.Affine(rotate=(-30 * v, 30 * v), **geo),
            A.Affine(shear={"x": (-shear, shear), "y": (0, 0)}, **geo),
            A.Affine(shear={"x": (0, 0), "y": (-shear, shear)}, **geo),
            A.Affine(translate_percent={"x": (-shift, shift), "y": (0, 0)}, **geo),
            A.Affine(translate_percent={"x": (0, 0), "y": (-shift, shift)}, **geo),
            A.Posterize(num_bits=(max(1, int(round(4 - 4 * v))), 8), p=p),
            A.Solarize(threshold_range=(1 - v, 1.0), p=p),
            A.ColorJitter(brightness=0, contrast=0, saturation=(max(0.0, 1 - 0.9 * v), 1 + 0.9 * v), hue=0, p=p),
            A.RandomBrightnessContrast(brightness_limit=0, contrast_limit=0.9 * v, p=p),
            A.RandomBrightnessContrast(brightness_limit=0.9 * v, contrast_limit=0, p=p),
            A.Sharpen(alpha=(0.0, min(1.0, 0.9 * v)), p=p),
        ]
        return A.SomeOf(ops, n=self.num_ops, replace=True, p=1.0)


class TrainTransform:
    """PIL image + seed -> normalised tensor (C, H, W): random resized crop (area ``scale_min``-1, the run's
    interpolation), horizontal flip with probability ``hflip``, RandAugment or else colour jitter of strength
    ``color_jitter``, normalisation with the run's ``mean`` and ``std``, random erasing with probability ``reprob``
    (the rectangle filled with N(0, 1) noise of the normalised image, as timm's "pixel" mode)."""

    def __init__(self, size: int, scale_min: float = 0.08, hflip: float = 0.5, randaugment: RandAugment | None = None,
                 color_jitter: float = 0.0, reprob: float = 0.0, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 interpolation: str = "bicubic"):
        self.size, self.reprob, self.mean = size, reprob, tuple(mean)
        fill = tuple(int(round(255 * m)) for m in self.mean)
        steps = [A.RandomResizedCrop((size, size), scale=(scale_min, 1.0),
                                     interpolation=_INTERPOLATION[interpolation])]
        if hflip > 0:
            steps.append(A.HorizontalFlip(p=hflip))
        if randaugment is not None:
            steps.append(randaugment.ops(fill))
        elif color_jitter > 0:
            steps.append(A.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter,
                                       hue=0, p=1.0))
        steps.append(A.Normalize(mean=self.mean, std=tuple(std), max_pixel_value=255.0))
        self.steps = steps
        self.pipeline = A.Compose(steps, seed=0)

    def __call__(self, img: Image.Image, seed: int) -> torch.Tensor:
        own = np.random.SeedSequence(seed).spawn(len(self.steps) + 1)
        self.pipeline.set_random_seed(seed)  # (it hands every step the same seed: their draws would be tied)
        for step, child in zip(self.steps, own):
            _seed_tree(step, child)
        x = self.pipeline(image=np.asarray(img.convert("RGB")))["image"]  # (H, W, C) float32, normalised
        out = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))
        return _erase(out, np.random.default_rng(own[-1]), self.reprob)


def _seed_tree(transform, seq: np.random.SeedSequence) -> None:
    """Seed ``transform`` and, for a container (RandAugment's ``SomeOf``), each of its ops from its own child of
    ``seq``, so that no two random choices of an image share a stream."""
    transform.set_random_seed(int(seq.generate_state(1)[0]))
    children = transform.transforms if isinstance(transform, BaseCompose) else []
    for child, child_seq in zip(children, seq.spawn(len(children))):
        _seed_tree(child, child_seq)


def _erase(x: torch.Tensor, rng: np.random.Generator, prob: float, area=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3),
           tries: int = 10) -> torch.Tensor:
    """With probability ``prob`` replace one random rectangle of the normalised image by N(0, 1) noise (timm's
    "pixel" random erasing; albumentations' ``Erasing`` fills with a constant or uniform noise instead)."""
    if prob <= 0 or rng.random() >= prob:
        return x
    c, h, w = x.shape
    for _ in range(tries):
        target = h * w * rng.uniform(*area)
        aspect = float(np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]))))
        eh, ew = int(round((target * aspect) ** 0.5)), int(round((target / aspect) ** 0.5))
        if 0 < eh < h and 0 < ew < w:
            top, left = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
            x[:, top:top + eh, left:left + ew] = torch.from_numpy(rng.standard_normal((c, eh, ew), dtype=np.float32))
            break
    return x


def item_seed(seed: int, epoch: int, position: int) -> int:
    """The seed of one training image's augmentation: a function of the run's seed, the epoch and the image's
    position in the epoch (never of the loader process that makes it)."""
    return int(np.random.SeedSequence([seed, epoch, position]).generate_state(1)[0])
