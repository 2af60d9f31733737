"""Evaluation: top-1/top-5 of a model over a loader (summed over processes), and of a checkpoint on a folder."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import read_checkpoint
from ..checkpoint.preprocess import DataConfig, EvalTransform, data_config
from ..checkpoint.weights import get_weights, imagenet_classes, weights_table
from ..errors import ConfigError, DataError
from ..registry import create_model
from ..runtime.settings import num_threads
from .config import check_device, check_model_size, check_values
from .data import ImageFolderDataset, check_classes, class_list, collate_skipping, scan_image_folder
from .distributed import Runtime, all_reduce
from .files import load_state


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, rt: Runtime | None = None,
             amp: bool = False, num_classes: int | None = None) -> dict:
    """Top-1 / top-5 (fractions), mean loss and image counts over ``loader`` (summed over processes); with
    ``num_classes``, also ``confusion``: the ``confusion_matrix`` of the top-1 predictions (an int64 CPU tensor)."""
    rt = rt or Runtime()
    was_training = model.training
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss, top1, top5, images, skipped
    counts = torch.zeros((num_classes or 0, num_classes or 0), dtype=torch.int64, device=device)
    for x, y, skipped in loader:
        sums[4] += skipped
        if x is None:
            continue
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if device.type == "cuda" and amp:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            out = model(x)
        out = out.float()
        top = out.topk(min(5, out.shape[1]), dim=1).indices
        sums[0] += F.cross_entropy(out, y, reduction="sum").double()
        sums[1] += (top[:, 0] == y).sum()
        sums[2] += (top == y[:, None]).any(dim=1).sum()
        sums[3] += y.numel()
        if num_classes:
            counts += confusion_matrix(y, top[:, 0], num_classes)
    loss, top1, top5, images, skipped = all_reduce(sums, rt).tolist()
    model.train(was_training)
    n = max(images, 1.0)
    res = {"top1": top1 / n, "top5": top5 / n, "loss": loss / n, "images": int(images), "skipped": int(skipped)}
    if num_classes:
        res["confusion"] = all_reduce(counts, rt).cpu()
    return res


def confusion_matrix(targets: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``counts[t, p]``: how many of the images of true class ``t`` were predicted as class ``p`` (rows: true
    classes, columns: predictions; int64, ``num_classes`` x ``num_classes``)."""
    targets, predictions = targets.long().flatten(), predictions.long().flatten()
    if targets.shape != predictions.shape:
        raise ValueError(f"one prediction per target expected, got {predictions.numel()} for {targets.numel()}")
    labels = torch.cat([targets, predictions])
    if bool(((labels < 0) | (labels >= num_classes)).any()):  # (one check: a single device sync per call)
        raise ValueError(f"classes must lie in 0..{num_classes - 1}, got {labels.min().item()}..{labels.max().item()}")
    flat = torch.bincount(targets * num_classes + predictions, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def per_class_accuracy(confusion, classes: list[str]) -> list[dict]:
    """One row per class of a confusion matrix (rows: true classes): ``class``, ``images``, ``correct`` and
    ``accuracy`` (a fraction; None for a class without images)."""
    counts = torch.as_tensor(confusion, dtype=torch.int64)
    images, correct = counts.sum(dim=1).tolist(), counts.diagonal().tolist()
    return [{"class": name, "images": n, "correct": c, "accuracy": c / n if n else None}
            for name, n, c in zip(classes, images, correct)]


def default_workers(world_size: int) -> int:
    """Loader processes per training process: one less than the cores available to each (at most 8)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(0, min(8, cpus // max(world_size, 1) - 1))


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader, device: torch.device, rt: Runtime | None = None) -> int:
    """Recompute the running mean and variance of every BatchNorm layer of ``model`` as plain averages of their
    batch statistics over ``loader`` ("precise BN"), averaged over processes; nothing else is run in training
    mode (no dropout or drop-path draws). Early in a short run the momentum averages lag weights that move
    quickly, and validation judges the network by them. Returns the images seen (0: nothing changed)."""
    rt = rt or Runtime()
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    was_training = model.training
    saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone()) for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average of the batches' statistics
        m.train()
    images = 0
    for x, _, _ in loader:
        if x is not None and x.shape[0] >= 2:
            model(x.to(device, non_blocking=True))
            images += x.shape[0]
    seen = int(all_reduce(torch.tensor([images], dtype=torch.float64, device=device), rt).item())
    for m, (momentum, mean, var) in zip(norms, saved):
        m.momentum = momentum
        if not seen:  # nothing readable: keep what there was
            m.running_mean.copy_(mean), m.running_var.copy_(var)
        elif rt.world_size > 1:  # every process averaged its own share of the images: weigh by the shares
            for buf in (m.running_mean, m.running_var):
                all_reduce(buf.mul_(images), rt).div_(seen)
    model.train(was_training)
    return seen


def val_loader(root, classes, preprocess: DataConfig, batch_size: int, workers: int, rt: Runtime):
    """Loader over ``root`` (ImageFolder; its classes must equal ``classes`` when given), preprocessed as
    ``preprocess`` says (``EvalTransform``); each process takes every ``world_size``-th image, so the summed counts
    cover every image exactly once. Returns it and the classes."""
    samples, found = scan_image_folder(root, classes)
    return eval_loader(samples, found, preprocess, batch_size, workers, rt), found


def eval_loader(samples, classes, preprocess: DataConfig, batch_size: int, workers: int, rt: Runtime):
    """The evaluation loader over scanned ``samples`` (see ``val_loader``), each process taking its share."""
    ds = ImageFolderDataset(samples, classes, EvalTransform(preprocess), train=False)
    indices = list(range(rt.rank, len(ds), rt.world_size))
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=indices, num_workers=workers,
                                       collate_fn=collate_skipping, pin_memory=rt.device.type == "cuda",
                                       persistent_workers=workers > 0,
                                       generator=torch.Generator())  # own generator: see the train loader


def evaluate_checkpoint(data: str, checkpoint: str | None = None, model_name: str | None = None,
                        img_size: int | None = None, batch_size: int = 100, crop_pct: float | None = None,
                        workers: int = -1, device: str = "auto", threads: int = 0,
                        pretrained: str | bool | None = None) -> dict:
    """Evaluate a checkpoint, or a model's published weights (``pretrained``: True or a tag), on an ImageFolder
    (``data`` holds class folders, or ``val/``). ``checkpoint`` is a weights file, a training state
    (``*.state.pt``) or a run folder (its ``best.safetensors``). An edgevits training checkpoint holds the weights
    its run evaluated (the EMA when EMA was on); foreign training checkpoints with a ``model_ema`` entry are read
    from it. Images are preprocessed as the weights were evaluated (``edgevits.data_config``: what an edgevits
    checkpoint stored, the published weights' own, else the official evaluation's), with ``img_size`` and
    ``crop_pct`` when given. ``threads``: torch CPU threads for this call (0 keeps torch's choice). Returns
    top-1/top-5 as fractions and what was evaluated, and the per-class numbers: ``classes`` (the folders' order),
    ``confusion`` (``confusion[t][p]``: images of true class ``t`` predicted as ``p``) and ``per_class`` (see
    ``per_class_accuracy``).

    Bad input fails before the model is built: settings out of range (``ConfigError``), a checkpoint that cannot
    be read safely (``CheckpointError``), class folders other than the classes the checkpoint records (published
    weights: ImageNet-1k's synset folders) or than its class count (``DataError``, naming both)."""
    check_values({"img_size": img_size, "batch_size": batch_size, "crop_pct": crop_pct, "workers": workers,
                  "threads": threads})
    check_device(device)
    source, meta, name = _eval_source(checkpoint, model_name, pretrained)
    size = img_size or meta.get("img_size") or (meta.get("config") or {}).get("img_size") or 224
    size = size[0] if isinstance(size, (list, tuple)) else int(size)
    check_model_size(name, size)
    root = Path(data)
    if (root / "val").is_dir() and (root / "train").is_dir():
        root = root / "val"
    samples, found = scan_image_folder(root)
    what = f"checkpoint {str(checkpoint)!r}" if checkpoint else f"{name}'s published weights"
    check_classes(found, meta.get("classes"), str(root), what)
    rt = Runtime(device=torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                     ("cpu" if device == "auto" else device)))
    preprocess = eval_preprocess(name, meta, size, crop_pct)
    with num_threads(threads):
        extra = {"img_size": size} if img_size or source is not checkpoint else {}
        model = create_model(name, pretrained=meta.get("pretrained") or False, checkpoint=source, **extra)
        if model.num_classes != len(found):
            raise DataError(f"{what} predicts {model.num_classes} classes but {root} has {class_list(found)}: pass "
                            "a folder with one folder per class the model was trained on")
        workers = default_workers(1) if workers < 0 else workers
        loader = eval_loader(samples, found, preprocess, batch_size, workers, rt)
        res = evaluate(model.to(rt.device), loader, rt.device, rt, amp=rt.device.type == "cuda",
                       num_classes=len(found))
    return {"model": name, "checkpoint": str(checkpoint) if checkpoint else None, "pretrained": meta.get("pretrained"),
            "data": str(root), "img_size": size, "preprocess": preprocess.to_dict(),
            "weights": meta.get("weights", "model"), "val_top1": res["top1"], "val_top5": res["top5"],
            "val_loss": res["loss"], "images": res["images"], "skipped": res["skipped"],
            "recorded_val_top1": meta.get("val_top1"), "classes": list(found),
            "confusion": res["confusion"].tolist(), "per_class": per_class_accuracy(res["confusion"], found)}


def eval_preprocess(name: str, meta: dict, size: int, crop_pct: float | None = None) -> DataConfig:
    """The preprocessing to evaluate ``name`` with, from what its weights record (``meta``: an edgevits
    checkpoint's stored ``data_config``, a ``pretrained`` tag, an older checkpoint's ``crop_pct``), else the
    official evaluation's (ImageNet defaults for a model without published weights); at ``size``, with
    ``crop_pct`` when given."""
    if meta.get("data_config"):
        base = DataConfig.from_dict(meta["data_config"])
    elif meta.get("pretrained"):
        base = data_config(name, meta["pretrained"])
    else:
        base = data_config(name, "official") if name in weights_table() else DataConfig()
        crop_pct = crop_pct or meta.get("crop_pct")
    base = base.with_size(size)
    return dataclasses.replace(base, crop_pct=crop_pct) if crop_pct else base


def _eval_source(checkpoint: str | None, model_name: str | None, pretrained) -> tuple:
    """``(weights or path, metadata, model name)`` to evaluate: published weights (``pretrained``; their
    metadata: the tag and ImageNet's synsets as classes), a training state (``*.state.pt``: its EMA weights when it
    has them, else its model weights), or another file, or a run folder (its ``best.safetensors``), read as it is."""
    if pretrained:
        if checkpoint:
            raise ConfigError("--pretrained and --checkpoint both given: pass one")
        if not model_name:
            raise ConfigError("--pretrained needs --model NAME")
        tag = get_weights(model_name, pretrained).tag
        return None, {"pretrained": tag, "classes": imagenet_classes(synsets=True)}, model_name
    if not checkpoint:
        raise ConfigError("nothing to evaluate: pass --checkpoint PATH or --pretrained [TAG] (with --model)")
    if str(checkpoint).endswith(".state.pt"):
        state = load_state(checkpoint)
        config = state.get("config") or {}
        ema = state.get("ema")
        meta = {"model": config.get("model"), "img_size": config.get("img_size"), "crop_pct": config.get("crop_pct"),
                "pretrained": None, "classes": state.get("classes"), "weights": "ema" if ema else "model",
                "data_config": _state_preprocess(config)}
        source = ema["weights"] if ema else state["model"]
    else:
        source, meta = checkpoint, read_checkpoint(checkpoint)[1]
    name = model_name or meta.get("model")
    if not name:
        raise ConfigError(f"{checkpoint} does not record its model: pass --model NAME")
    return source, meta, name


def _state_preprocess(config: dict) -> dict | None:
    """The preprocessing a training state's run used (its saved ``TrainConfig``), or None when it cannot say."""
    from .config import TrainConfig
    try:
        return TrainConfig(**config).data_config().to_dict()
    except (TypeError, ValueError, KeyError):  # a config of another version, a model no longer registered
        return None
