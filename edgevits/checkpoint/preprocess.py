"""Preprocessing: the input size, normalisation, interpolation and crop each set of published weights was evaluated
with (``data_config``), and the transforms that apply a ``DataConfig`` to a PIL image (``transforms``).

The evaluation transform resizes the shorter side to ``floor(size / crop_pct)`` and takes the centre ``size`` crop, as
torchvision's ``Resize(int)`` + ``CenterCrop`` do (the longer side truncated, the crop offset rounded): all three
official repositories evaluate with ``Resize(256)`` + ``CenterCrop(224)`` (crop 0.875), while timm records 0.95 for
EfficientFormer V1/V2 and SwiftFormer (0.875 for EfficientViT).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError, DataError, UnknownModelError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
INTERPOLATIONS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
                  "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}


@dataclass(frozen=True)
class DataConfig:
    """How images are turned into a model's input: ``input_size`` (channels, height, width), per-channel ``mean``
    and ``std`` of pixels scaled to [0, 1], the resize ``interpolation``, and ``crop_pct`` (the evaluation resize
    is ``size / crop_pct``, then the centre ``size`` crop). ``source`` says where the values come from."""

    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    source: str = "ImageNet defaults"

    def __post_init__(self):
        """Check every field (``ConfigError`` saying what was expected and found); lists become tuples."""
        for name in ("input_size", "mean", "std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        c, h, w = self.input_size if len(self.input_size) == 3 else (0, 0, 0)
        if min(c, h, w) < 1:
            raise ConfigError(f"input_size must be (channels, height, width) of positive sizes, got {self.input_size}")
        if len(self.mean) != c or len(self.std) != c or min(self.std) <= 0:
            raise ConfigError(f"mean and std need one value per channel ({c}) and std > 0, got mean {self.mean}, "
                              f"std {self.std}")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        if not 0 < self.crop_pct <= 1:
            raise ConfigError(f"crop_pct must be in (0, 1], got {self.crop_pct!r}")

    @property
    def img_size(self) -> tuple[int, int]:
        """``(height, width)`` of the model input."""
        return self.input_size[1], self.input_size[2]

    def with_size(self, img_size: int | tuple[int, int] | None) -> "DataConfig":
        """The same preprocessing for another input size (``None``: unchanged)."""
        if img_size is None:
            return self
        h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        return dataclasses.replace(self, input_size=(self.input_size[0], int(h), int(w)))

    def to_dict(self) -> dict:
        """A JSON-ready dict (what checkpoints store)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> "DataConfig":
        """A ``DataConfig`` from ``to_dict``'s output (keys it does not know are ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def data_config(model_or_name: Any, tag: str | bool | None = None) -> DataConfig:
    """The preprocessing of a model or of a registered name's published weights.

    ``model_or_name``: a model made by ``create_model`` (the preprocessing of the weights it was given: published
    weights, or an edgevits checkpoint that stored one; else the official evaluation's, at the model's input size)
    or a model name (the preprocessing of its weights tagged ``tag``; ``None``, ``True`` or ``"default"``: the
    default weights of ``pretrained=True``). Raises ``UnknownModelError`` for a name without published weights and
    ``ConfigError`` for a tag it does not have."""
    from .weights import get_weights, weights_table
    if isinstance(model_or_name, str):
        return get_weights(model_or_name, tag).preprocess
    model = model_or_name
    own = getattr(model, "data_config", None)
    size = getattr(getattr(model, "config", None), "img_size", None)
    if tag not in (None, False):
        name = getattr(model, "model_name", "")
        return get_weights(name, tag).preprocess.with_size(size)
    if isinstance(own, DataConfig):
        return own.with_size(size)
    name = getattr(model, "model_name", "")
    base = get_weights(name, "official").preprocess if name in weights_table() else DataConfig()
    return base.with_size(size)


def unknown_name(name: str, known) -> UnknownModelError:
    """The error for a model name without an entry, suggesting close names."""
    close = difflib.get_close_matches(name, list(known), n=4, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(sorted(known))}"
    return UnknownModelError(f"no published weights are recorded for {name!r}{hint}")


# ---- transforms ----------------------------------------------------------------------------------------------------

def to_tensor(img: Image.Image, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """PIL RGB -> normalised float tensor (3, H, W)."""
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
    return x.sub_(torch.tensor(mean).view(3, 1, 1)).div_(torch.tensor(std).view(3, 1, 1))


def resize_shorter(img: Image.Image, short: int, interpolation: str = "bicubic") -> Image.Image:
    """Resize so that the shorter side is ``short`` and the longer keeps the aspect ratio (truncated, as
    torchvision's ``Resize(int)``)."""
    w, h = img.size
    if w <= h:
        size = (short, max(1, int(short * h / w)))
    else:
        size = (max(1, int(short * w / h)), short)
    return img if size == (w, h) else img.resize(size, INTERPOLATIONS[interpolation])


def center_crop(img: Image.Image, h: int, w: int) -> Image.Image:
    """The centre ``h`` x ``w`` of ``img`` (offsets rounded, as torchvision's ``CenterCrop``)."""
    iw, ih = img.size
    top, left = int(round((ih - h) / 2.0)), int(round((iw - w) / 2.0))
    return img.crop((left, top, left + w, top + h))


@dataclass(frozen=True)
class EvalTransform:
    """Resize (shorter side to ``size / crop_pct``; a non-square input: each side), centre crop, normalise."""

    config: DataConfig

    def __call__(self, img: Image.Image) -> torch.Tensor:
        cfg = self.config
        h, w = cfg.img_size
        img = img if img.mode == "RGB" else img.convert("RGB")
        if h == w:
            img = resize_shorter(img, int(math.floor(h / cfg.crop_pct)), cfg.interpolation)
        else:
            img = img.resize((int(math.floor(w / cfg.crop_pct)), int(math.floor(h / cfg.crop_pct))),
                             INTERPOLATIONS[cfg.interpolation])
        return to_tensor(center_crop(img, h, w), cfg.mean, cfg.std)


def random_resized_crop(img: Image.Image, size: int, rng: np.random.Generator, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3), interpolation: str = "bicubic") -> Image.Image:
    """A crop of random area fraction in ``scale`` and aspect ratio in ``ratio``, resized to ``size``."""
    w, h = img.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            break
    else:  # fall back to the largest centred crop within the ratio range
        aspect = w / h
        cw, ch = (w, int(round(w / ratio[0]))) if aspect < ratio[0] else (
            (int(round(h * ratio[1])), h) if aspect > ratio[1] else (w, h))
        cw, ch = min(cw, w), min(ch, h)
        left, top = (w - cw) // 2, (h - ch) // 2
    return img.resize((size, size), INTERPOLATIONS[interpolation], box=(left, top, left + cw, top + ch))


@dataclass(frozen=True)
class BasicTrainTransform:
    """Random resized crop (area ``scale``), horizontal flip with probability ``hflip``, normalise: the geometric
    part of the papers' training transform (``edgevits train`` adds RandAugment, erasing, mixup). Called as
    ``transform(img, rng=None)``; ``rng`` a numpy generator (a fresh one when not given)."""

    config: DataConfig
    scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        rng = rng if rng is not None else np.random.default_rng()
        cfg = self.config
        img = img if img.mode == "RGB" else img.convert("RGB")
        img = random_resized_crop(img, cfg.img_size[0], rng, scale=self.scale, interpolation=cfg.interpolation)
        if self.hflip > 0 and rng.random() < self.hflip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return to_tensor(img, cfg.mean, cfg.std)


def transforms(config: DataConfig | dict, train: bool = False):
    """The transform of ``config`` (a ``DataConfig``, or its dict): for evaluation (``train=False``) an
    ``EvalTransform``, PIL image -> normalised tensor (C, H, W); for training a ``BasicTrainTransform``."""
    config = config if isinstance(config, DataConfig) else DataConfig.from_dict(config)
    if train:
        if config.img_size[0] != config.img_size[1]:
            raise ConfigError(f"the training transform makes square crops; got input size {config.img_size}")
        return BasicTrainTransform(config)
    return EvalTransform(config)


def open_image(path) -> Image.Image:
    """The image at ``path`` as RGB, fully decoded; a ``DataError`` naming the file when pillow cannot decode it."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")  # forces the full decode: a truncated file raises here
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot decode {str(path)!r} as an image ({type(e).__name__}: {e})") from None
