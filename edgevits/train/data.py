"""Data: ImageFolder scanning, pillow decoding, the dataset, a deterministic sampler and batch mixing (Mixup,
CutMix). The per-image training augmentation is ``augment.TrainTransform`` (albumentations); normalisation,
interpolation and the evaluation crop come from a ``DataConfig`` (``edgevits.data_config``: the preprocessing of the
weights a run starts from, else the official evaluation's); the evaluation transform is
``edgevits.checkpoint.preprocess.EvalTransform``.

Every random choice of the training transform is seeded with (seed, epoch, position in the epoch), so the images a
step sees do not depend on the number of loader processes, and a resumed run sees the same images as an
uninterrupted one. Images that cannot be decoded are skipped with a warning and counted.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..checkpoint.preprocess import IMG_EXTENSIONS
from ..errors import DataError
from .augment import RandAugment, TrainTransform, item_seed

__all__ = ["EpochSampler", "ImageFolderDataset", "Mixer", "RandAugment", "TrainTransform", "check_classes",
           "class_list", "collate_skipping", "load_image", "one_hot_smooth", "scan_image_folder"]


# ---- folder layout -------------------------------------------------------------------------------------------------

def class_list(names, limit: int = 8) -> str:
    """Class names for a message, shortened when long: ``3 classes ['a', 'b', 'c']``,
    ``1000 classes ['n01440764', ..., 'n15075141']``."""
    names = list(names)
    shown = [repr(n) for n in names] if len(names) <= limit else \
        [repr(n) for n in names[:limit - 2]] + ["...", repr(names[-1])]
    return f"{len(names)} classes [{', '.join(shown)}]"


def check_classes(found: list[str], recorded, where: str, source: str) -> None:
    """A ``DataError`` naming both lists when the class folders ``found`` in ``where`` are not the classes
    ``recorded`` by ``source`` (a checkpoint or training state; ``None`` or empty: nothing recorded, no check)."""
    if recorded and list(recorded) != list(found):
        raise DataError(f"the class folders of {where} ({class_list(found)}) are not the classes {source} was "
                        f"trained on ({class_list(recorded)}): pass a folder with one folder per training class, "
                        "named as in training")


def scan_image_folder(root: str | os.PathLike, classes: list[str] | None = None) -> tuple[list[tuple[str, int]],
                                                                                          list[str]]:
    """``(samples, classes)`` of an ImageFolder ``root`` (one sub-folder of images per class, sorted by name).

    With ``classes`` given (the training split's), the folder must hold exactly those classes. Raises ``DataError``
    for a missing folder, images outside class folders, an empty class, or classes that differ from ``classes``.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{str(root)!r} is not a folder; expected an ImageFolder layout: {root}/<class>/<image>")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        loose = [p.name for p in root.iterdir() if p.suffix.lower() in IMG_EXTENSIONS]
        what = f"{len(loose)} images directly in it" if loose else "nothing usable"
        raise DataError(f"{str(root)!r} holds no class folders ({what}); expected {root}/<class>/<image>")
    if classes is not None and found != list(classes):
        missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
        raise DataError(f"class folders of {str(root)!r} differ from the training split's: missing {missing[:10]}, "
                        f"unexpected {extra[:10]} (both splits need the same class folders)")
    samples: list[tuple[str, int]] = []
    empty = []
    for idx, name in enumerate(found):
        files = []
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames.sort()
            files += [os.path.join(dirpath, f) for f in sorted(filenames)
                      if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith(".")]
        if not files:
            empty.append(name)
        samples += [(f, idx) for f in files]
    if empty:
        raise DataError(f"class folder(s) without images in {str(root)!r}: {empty[:10]} "
                        f"(extensions read: {', '.join(IMG_EXTENSIONS)})")
    return samples, found


def load_image(path: str) -> Image.Image | None:
    """The image as RGB, or None (with a warning) if pillow cannot decode it completely."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")  # forces the full decode: a truncated file raises here
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        warnings.warn(f"skipping unreadable image {path}: {type(e).__name__}: {e}", stacklevel=2)
        return None


# ---- datasets, sampler, collate ------------------------------------------------------------------------------------

class ImageFolderDataset(torch.utils.data.Dataset):
    """Training items are keyed ``(index, epoch, position)`` by ``EpochSampler``; the transform's randomness is
    seeded from ``(seed, epoch, position)``. Evaluation items are plain indices. Unreadable images give None."""

    def __init__(self, samples: list[tuple[str, int]], classes: list[str], transform, seed: int = 0,
                 train: bool = True):
        self.samples, self.classes, self.transform, self.seed, self.train = samples, classes, transform, seed, train

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        index, epoch, position = key if isinstance(key, tuple) else (key, 0, 0)
        path, target = self.samples[index]
        img = load_image(path)
        if img is None:
            return None
        if self.train:
            return self.transform(img, item_seed(self.seed, epoch, position)), target
        return self.transform(img), target


class EpochSampler(torch.utils.data.Sampler):
    """Shuffles with a generator seeded by (seed, epoch), repeats each image ``repeats`` times (DeiT's repeated
    augmentation) and gives every process ``ceil(n / world_size)`` items. Yields ``(index, epoch, position)``."""

    def __init__(self, n: int, seed: int = 0, rank: int = 0, world_size: int = 1, repeats: int = 1,
                 shuffle: bool = True):
        self.n, self.seed, self.rank, self.world_size, self.repeats, self.shuffle = (
            n, seed, rank, world_size, repeats, shuffle)
        self.epoch = 0
        self.num_samples = math.ceil(n / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        order = order.repeat_interleave(self.repeats).tolist()
        total = self.num_samples * self.world_size
        order += order[: max(0, total - len(order))]  # pad (only when n does not divide)
        mine = order[self.rank:total:self.world_size][: self.num_samples]
        for i, index in enumerate(mine):
            yield index, self.epoch, i * self.world_size + self.rank


def collate_skipping(batch):
    """Stack the readable items; returns ``(images, targets, n_skipped)``."""
    good = [b for b in batch if b is not None]
    skipped = len(batch) - len(good)
    if not good:
        return None, None, skipped
    return torch.stack([b[0] for b in good]), torch.tensor([b[1] for b in good]), skipped


# ---- batch mixing ------------------------------------------------------------------------------------------------

def one_hot_smooth(target: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """One-hot rows of ``target`` with label smoothing: ``1 - smoothing + smoothing / n`` on the class, ``smoothing
    / n`` elsewhere."""
    off = smoothing / num_classes
    y = torch.full((target.numel(), num_classes), off, device=target.device)
    return y.scatter_(1, target.view(-1, 1), 1.0 - smoothing + off)


@dataclass(frozen=True)
class Mixer:
    """Mixup / CutMix of a batch with its reverse (as DeiT), returning smoothed soft targets."""

    num_classes: int
    mixup: float = 0.8
    cutmix: float = 1.0
    prob: float = 1.0
    switch_prob: float = 0.5
    smoothing: float = 0.1

    @property
    def active(self) -> bool:
        return self.prob > 0 and (self.mixup > 0 or self.cutmix > 0)

    def __call__(self, x: torch.Tensor, target: torch.Tensor, rng: np.random.Generator):
        y = one_hot_smooth(target, self.num_classes, self.smoothing)
        if not self.active or rng.random() >= self.prob or x.shape[0] < 2:
            return x, y
        use_cutmix = self.cutmix > 0 and (self.mixup <= 0 or rng.random() < self.switch_prob)
        lam = float(rng.beta(self.cutmix, self.cutmix) if use_cutmix else rng.beta(self.mixup, self.mixup))
        if use_cutmix:  # a box covering about (1 - lam) of the image, clipped at the border
            h, w = x.shape[-2:]
            cut = math.sqrt(1 - lam)
            ch, cw = int(h * cut), int(w * cut)
            cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
            y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
            x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
            x = x.clone()
            x[..., y0:y1, x0:x1] = x.flip(0)[..., y0:y1, x0:x1]
            lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
        else:
            x = x * lam + x.flip(0) * (1 - lam)
        return x, y * lam + y.flip(0) * (1 - lam)
