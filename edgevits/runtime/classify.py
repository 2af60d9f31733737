"""Predicting the classes of image files: ``Classifier`` (a model, its preprocessing, its class names and a backend
behind one call) and ``predict`` (the one-call form). Used by ``edgevits predict``; prints nothing."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from PIL import Image
from torch import nn

from ..checkpoint.preprocess import IMG_EXTENSIONS, data_config, open_image, transforms
from ..errors import ConfigError, DataError
from ..fuse import fuse_model
from ..registry import create_model
from .choose import deploy
from .settings import num_threads

PREDICT_BACKENDS = ("auto", "eager", "onnxruntime", "openvino")


@dataclass(frozen=True)
class Prediction:
    """The top classes of one image: ``(class index, class name, probability)``, most probable first."""

    image: str
    top: list[tuple[int, str, float]]

    def to_dict(self) -> dict:
        """``{"image": ..., "top": [{"index", "label", "probability"}, ...]}`` (what ``--json`` prints)."""
        return {"image": self.image, "top": [{"index": i, "label": name, "probability": p}
                                             for i, name, p in self.top]}


@dataclass(frozen=True)
class Skipped:
    """An input that was not classified, and why (an undecodable file, a file that is not an image)."""

    image: str
    reason: str


def image_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """The image files ``paths`` name: files as they are, folders expanded to the image files under them (sorted,
    recursively, by extension). A path that does not exist, or a folder without images, is a ``DataError``."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMG_EXTENSIONS
                           and not f.name.startswith("."))
            if not found:
                raise DataError(f"{str(p)!r} holds no image files (extensions read: {', '.join(IMG_EXTENSIONS)})")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{str(p)!r} does not exist: pass image files or folders of them")
    return files


class Classifier:
    """A model ready to classify images: its preprocessing (``edgevits.data_config(model)``), its class names and
    the backend it runs on.

    ``model``: a model name (built with ``pretrained`` or ``checkpoint``, as ``create_model`` does; ``img_size``
    overrides the input size) or a model already built. ``backend``: ``eager`` (the PyTorch deploy form),
    ``onnxruntime`` or ``openvino`` (an exported graph, checked against PyTorch), or ``auto`` (the fastest of them
    measured here, as ``edgevits.deploy``); ``progress(done, total, label)`` follows the export and check.
    ``threads``: torch CPU threads while classifying (None keeps torch's choice). Class names: the model's
    ``class_names`` (ImageNet-1k names for published weights, a fine-tuned checkpoint's classes), else
    ``"class <i>"``."""

    def __init__(self, model: str | nn.Module, *, pretrained: bool | str = False, checkpoint: Any = None,
                 backend: str = "eager", img_size: int | None = None, threads: int | None = None,
                 progress: Callable[[int, int, str], None] | None = None):
        if backend not in PREDICT_BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(PREDICT_BACKENDS)}, got {backend!r}")
        if isinstance(model, str):
            extra = {"img_size": img_size} if img_size else {}
            model = create_model(model, pretrained=pretrained, checkpoint=checkpoint, **extra)
        self.model = model.eval()
        self.config = data_config(model)
        self.transform = transforms(self.config)
        n = int(getattr(model, "num_classes", 0) or 0)
        names = getattr(model, "class_names", None)
        self.class_names = list(names) if names and len(names) == n else [f"class {i}" for i in range(n)]
        self.threads = threads
        with num_threads(threads):
            if backend == "eager":
                deployed = fuse_model(model)
                self.backend, self._run = "eager", deployed
            else:
                chosen = deploy(model, backend=backend, img_size=self.config.img_size, threads=threads,
                                progress=progress)
                self.backend, self._run = chosen.backend, chosen

    def logits(self, images: list[Image.Image]) -> torch.Tensor:
        """The logits of PIL images, preprocessed as the weights expect."""
        x = torch.stack([self.transform(img) for img in images])
        with num_threads(self.threads), torch.inference_mode():
            return self._run(x).float()

    def classify(self, images: list[Image.Image], topk: int = 5, names: list[str] | None = None) -> list[Prediction]:
        """The ``topk`` classes of each PIL image (``names``: what to call each image in the results)."""
        if topk < 1:
            raise ConfigError(f"topk must be >= 1, got {topk}")
        probs = self.logits(images).softmax(-1)
        k = min(topk, probs.shape[-1])
        values, indices = probs.topk(k, dim=-1)
        names = names or [f"image {i}" for i in range(len(images))]
        return [Prediction(name, [(int(i), self.class_names[int(i)], float(p)) for p, i in zip(vs, ids)])
                for name, vs, ids in zip(names, values, indices)]

    def predict_files(self, paths: Iterable[str | os.PathLike], topk: int = 5,
                      batch_size: int = 16) -> Iterator[Prediction | Skipped]:
        """A ``Prediction`` for each image file ``paths`` name (folders expanded, see ``image_files``), in order,
        ``batch_size`` at a time, and a ``Skipped`` for each file that cannot be decoded."""
        batch: list[tuple[str, Image.Image]] = []
        for path in image_files(paths):
            try:
                batch.append((str(path), open_image(path)))
            except DataError as e:
                yield Skipped(str(path), str(e))
                continue
            if len(batch) == batch_size:
                yield from self.classify([img for _, img in batch], topk, [p for p, _ in batch])
                batch = []
        if batch:
            yield from self.classify([img for _, img in batch], topk, [p for p, _ in batch])


def predict(images: Iterable[str | os.PathLike] | str | os.PathLike, model: str | nn.Module, *,
            pretrained: bool | str = False, checkpoint: Any = None, topk: int = 5, backend: str = "eager",
            batch_size: int = 16) -> list[Prediction | Skipped]:
    """The ``topk`` classes of image files (or folders of them) with ``model`` (a name with ``pretrained`` or
    ``checkpoint``, or a built model); see ``Classifier``. Undecodable files come back as ``Skipped``::

        for p in edgevits.predict(["cat.jpg", "photos/"], "efficientvit_m0", pretrained=True):
            print(p.image, p.top[0] if isinstance(p, Prediction) else p.reason)  # top: (index, name, prob)
    """
    if isinstance(images, (str, os.PathLike)):
        images = [images]
    clf = Classifier(model, pretrained=pretrained, checkpoint=checkpoint, backend=backend)
    return list(clf.predict_files(images, topk, batch_size))
