"""The training loop and evaluation: one process or many (torchrun + DDP), atomic checkpoints, exact resume.

``train(config)`` returns a ``TrainResult``; ``evaluate_checkpoint(...)`` returns a dict. Neither prints: they call
the ``log`` function they are given (rank 0 only).

Files in the output folder:

* ``config.json`` — the ``TrainConfig`` and the values derived from it (learning rate, warm-up, EMA decay, ...);
* ``metrics.jsonl`` — one JSON object per epoch (``epoch`` counts from 1; accuracies are fractions);
* ``last.safetensors`` / ``best.safetensors`` (+ ``.json``) — the weights evaluation uses (the EMA when EMA is on),
  with metadata (epoch, ``val_top1``, classes, resolution);
* ``last.state.pt`` — everything ``--resume`` needs (model, EMA, optimizer, RNG states, epoch), saved with
  ``torch.save`` of tensors and plain values only, read back with ``weights_only=True``.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..checkpoint import atomic_write, config_hints, read_checkpoint, save_checkpoint
from ..registry import create_model, get_entry
from .config import TrainConfig
from .data import (EpochSampler, ImageFolderDataset, Mixer, RandAugment, TrainTransform, collate_skipping,
                   eval_transform, scan_image_folder)
from .ema import ModelEma
from .losses import DistillationLoss

_TIMING_KEYS = ("img_per_s", "epoch_time_s", "eval_time_s")


@dataclass
class TrainResult:
    output: Path
    metrics: list[dict] = field(default_factory=list)
    best_top1: float = -1.0
    best_epoch: int = 0
    finished: bool = False  # False when --stop-after ended the run early


# ---- distributed setup -------------------------------------------------------------------------------------------

@dataclass
class Runtime:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_runtime(device: str = "auto") -> Runtime:
    """Read torchrun's environment; start the process group (nccl on GPU, gloo on CPU) when there are 2+ processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    rt = Runtime(rank, world, local, dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        rt.owns_group = True
    return rt


def _all_reduce(t: torch.Tensor, rt: Runtime, op=None) -> torch.Tensor:
    """Reduce ``t`` over the processes in place (a sum unless ``op``) and return it. The collective runs on
    ``rt.device`` (NCCL reduces CUDA tensors only, gloo CPU ones): a tensor elsewhere is reduced as a copy there."""
    if rt.world_size > 1:
        buf = t if t.device == rt.device else t.to(rt.device)
        dist.all_reduce(buf, op=op or dist.ReduceOp.SUM)
        if buf is not t:
            t.copy_(buf)
    return t


def _any_process(flag: bool, rt: Runtime) -> bool:
    """``flag`` OR-ed over the processes (collective when there are 2+: every process must call it)."""
    if rt.world_size == 1:
        return flag
    return bool(_all_reduce(torch.tensor([float(flag)], device=rt.device), rt, dist.ReduceOp.MAX).item())


# ---- model, teacher, optimiser, schedule --------------------------------------------------------------------------

def build_student(cfg: TrainConfig, num_classes: int, log: Callable[[str], None] = print) -> nn.Module:
    """The student: fresh, or from ``cfg.checkpoint`` with its head reset when the class count differs. A
    distillation head missing from the checkpoint starts as a copy of the class head."""
    want_dist = cfg.distillation != "none"
    common = dict(img_size=cfg.img_size, drop_path_rate=cfg.drop_path)
    if not cfg.checkpoint:
        return create_model(cfg.model, num_classes=num_classes, distillation=want_dist, **common)
    from ..checkpoint import CheckpointError, load_checkpoint
    sd, meta = read_checkpoint(cfg.checkpoint)
    hints = config_hints(get_entry(cfg.model), sd, meta)
    hints.pop("features_only", None)
    has_dist = bool(hints.get("distillation", False))
    ckpt_classes = int(hints.pop("num_classes", num_classes) or num_classes)
    model = create_model(cfg.model, **{**hints, **common, "num_classes": ckpt_classes,
                                       "distillation": want_dist or has_dist})
    report = load_checkpoint(model, sd, strict=False)
    missing = [k for k in report["missing"] if not k.startswith(("head.", "head_dist."))]
    if missing or report["unexpected"]:
        raise CheckpointError(f"{cfg.checkpoint} does not fit {cfg.model}: missing {missing[:10]}, "
                              f"unexpected {report['unexpected'][:10]}")
    head_missing = any(k.startswith("head.") for k in report["missing"])
    if model.head_dist is not None and any(k.startswith("head_dist.") for k in report["missing"]) \
            and not head_missing:
        model.head_dist.load_state_dict(model.head.state_dict())
    if ckpt_classes != num_classes or head_missing:
        log(f"checkpoint head has {ckpt_classes} classes, the data {num_classes}: classifier reset")
        model.reset_classifier(num_classes)
    return model


def build_teacher(cfg: TrainConfig, num_classes: int, log: Callable[[str], None] = print) -> nn.Module:
    """The teacher from ``--teacher`` (a model name, with ``--teacher-checkpoint``, or an edgevits checkpoint).
    Raises ``CheckpointError`` when its checkpoint names no model or predicts another number of classes."""
    from ..checkpoint import CheckpointError
    spec = cfg.teacher
    if os.path.isfile(spec):
        _, meta = read_checkpoint(spec)
        if not meta.get("model"):
            raise CheckpointError(f"teacher checkpoint {spec!r} does not record its model: pass --teacher "
                                  f"MODEL_NAME --teacher-checkpoint {spec}")
        teacher = create_model(meta["model"], checkpoint=spec)
    else:
        if not cfg.teacher_checkpoint:
            log(f"warning: teacher {spec!r} has no --teacher-checkpoint: it distils random weights")
        teacher = create_model(spec, checkpoint=cfg.teacher_checkpoint) if cfg.teacher_checkpoint else \
            create_model(spec, num_classes=num_classes)
    if getattr(teacher, "num_classes", num_classes) != num_classes:
        raise CheckpointError(f"the teacher ({cfg.teacher_checkpoint or spec}) predicts {teacher.num_classes} "
                              f"classes, the data has {num_classes}: distil from a teacher trained on these classes "
                              "(e.g. fine-tuned with edgevits train --checkpoint)")
    return teacher.eval().requires_grad_(False)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on norms, biases, layer scales and attention-bias tables."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(".bias") or "attention_bias" in name or "layer_scale" in name
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _unitwise_norm(t: torch.Tensor) -> torch.Tensor:
    """L2 norm per output unit (dims 1.. of a weight), or of the whole tensor for biases and scales."""
    if t.ndim <= 1:
        return t.norm()
    return torch.linalg.vector_norm(t, dim=tuple(range(1, t.ndim)), keepdim=True)


@torch.no_grad()
def clip_gradients(params, value: float, mode: str = "agc", eps: float = 1e-3) -> None:
    """Clip gradients in place. ``agc`` (adaptive gradient clipping, Brock et al. 2021): each unit's gradient norm
    is scaled down to at most ``value`` x its weight norm (weight norms below ``eps`` count as ``eps``);
    ``norm``: the global gradient norm to ``value``; ``value``: each element to [-value, value]."""
    params = [p for p in params if p.grad is not None]
    if mode == "norm":
        nn.utils.clip_grad_norm_(params, value)
    elif mode == "value":
        nn.utils.clip_grad_value_(params, value)
    elif mode == "agc":
        for p in params:
            limit = _unitwise_norm(p.detach()).clamp_(min=eps) * value
            norm = _unitwise_norm(p.grad)
            p.grad.mul_(torch.where(norm > limit, limit / norm.clamp(min=1e-6), torch.ones_like(norm)))
    else:
        raise ValueError(f"unknown clip mode {mode!r}")


@dataclass(frozen=True)
class Schedule:
    """Per-step learning rate: linear warm-up, then cosine down to ``min_lr``."""

    peak: float
    total_steps: int
    warmup_steps: int
    warmup_lr: float
    min_lr: float

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr + (self.peak - self.warmup_lr) * step / self.warmup_steps
        t = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return self.min_lr + 0.5 * (self.peak - self.min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


MIN_LR_FRACTION = 0.01  # the cosine floor, as a fraction of the peak, when --min-lr is not below the peak


def resolve(cfg: TrainConfig, world_size: int, steps_per_epoch: int) -> dict:
    """The values the run derives from its config (also written to config.json). The schedule never rises: the
    cosine ends at ``min_lr`` only when it is below the peak, else at ``MIN_LR_FRACTION`` x the peak (the papers'
    1e-5 / 1e-3); the warm-up starts at ``warmup_lr`` or at the peak, whichever is lower."""
    global_batch = cfg.batch_size * world_size
    total = cfg.epochs * steps_per_epoch
    ema = min(cfg.ema_decay, max(1 - 5 / max(total, 1), 0.9)) if cfg.ema_decay > 0 else 0.0
    lr = cfg.lr if cfg.lr is not None else 1e-3 * global_batch / 1024
    return {"lr": lr, "min_lr": cfg.min_lr if cfg.min_lr < lr else lr * MIN_LR_FRACTION,
            "warmup_lr": min(cfg.warmup_lr, lr), "global_batch": global_batch,
            "world_size": world_size, "steps_per_epoch": steps_per_epoch, "total_steps": total,
            "warmup_epochs": min(cfg.warmup_epochs, cfg.epochs // 5), "ema_decay": max(ema, 0.0)}


# ---- evaluation ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, rt: Runtime | None = None,
             amp: bool = False) -> dict:
    """Top-1 / top-5 (fractions), mean loss and image counts over ``loader`` (summed over processes)."""
    rt = rt or Runtime()
    was_training = model.training
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss, top1, top5, images, skipped
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
    loss, top1, top5, images, skipped = _all_reduce(sums, rt).tolist()
    model.train(was_training)
    n = max(images, 1.0)
    return {"top1": top1 / n, "top5": top5 / n, "loss": loss / n, "images": int(images), "skipped": int(skipped)}


def default_workers(world_size: int) -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(0, min(8, cpus // max(world_size, 1) - 1))


def val_loader(root, classes, img_size: int, crop_pct: float, batch_size: int, workers: int, rt: Runtime):
    """Loader over ``root`` (ImageFolder; its classes must equal ``classes`` when given); each process takes every
    ``world_size``-th image, so the summed counts cover every image exactly once."""
    samples, found = scan_image_folder(root, classes)
    ds = ImageFolderDataset(samples, found, lambda img: eval_transform(img, img_size, crop_pct), train=False)
    indices = list(range(rt.rank, len(ds), rt.world_size))
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=indices, num_workers=workers,
                                       collate_fn=collate_skipping, pin_memory=rt.device.type == "cuda",
                                       persistent_workers=workers > 0,
                                       generator=torch.Generator()), found  # own generator: see train loader


def evaluate_checkpoint(data: str, checkpoint: str, model_name: str | None = None, img_size: int | None = None,
                        batch_size: int = 100, crop_pct: float | None = None, workers: int = -1,
                        device: str = "auto") -> dict:
    """Evaluate a checkpoint on an ImageFolder (``data`` holds class folders, or ``val/``). An edgevits training
    checkpoint holds the weights its run evaluated (the EMA when EMA was on); foreign training checkpoints with a
    ``model_ema`` entry are read from it. Returns top-1/top-5 as fractions and what was evaluated."""
    source, meta = _eval_source(checkpoint)
    name = model_name or meta.get("model")
    if not name:
        raise ValueError(f"{checkpoint} does not record its model: pass --model")
    root = Path(data)
    if (root / "val").is_dir() and (root / "train").is_dir():
        root = root / "val"
    size = img_size or meta.get("img_size") or (meta.get("config") or {}).get("img_size") or 224
    size = size[0] if isinstance(size, (list, tuple)) else int(size)
    model = create_model(name, checkpoint=source, **({"img_size": size} if img_size or source is not checkpoint
                                                      else {}))
    rt = Runtime(device=torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                     ("cpu" if device == "auto" else device)))
    model.to(rt.device)
    classes = meta.get("classes")
    loader, found = val_loader(root, None, size, crop_pct or meta.get("crop_pct", 0.875), batch_size,
                               default_workers(1) if workers < 0 else workers, rt)
    if classes and list(classes) != found:
        raise ValueError(f"{root} has classes {found[:5]}... ({len(found)}) but the checkpoint was trained on "
                         f"{classes[:5]}... ({len(classes)})")
    res = evaluate(model, loader, rt.device, rt, amp=rt.device.type == "cuda")
    return {"model": name, "checkpoint": str(checkpoint), "data": str(root), "img_size": size,
            "weights": meta.get("weights", "model"), "val_top1": res["top1"], "val_top5": res["top5"],
            "val_loss": res["loss"], "images": res["images"], "skipped": res["skipped"],
            "recorded_val_top1": meta.get("val_top1")}


def _eval_source(checkpoint: str) -> tuple:
    """``(weights or path, metadata)`` to evaluate: a training state (``*.state.pt``) gives its EMA weights when
    it has them, else its model weights; other files are read as they are."""
    if str(checkpoint).endswith(".state.pt"):
        state = load_state(checkpoint)
        config = state.get("config") or {}
        ema = state.get("ema")
        meta = {"model": config.get("model"), "img_size": config.get("img_size"),
                "crop_pct": config.get("crop_pct", 0.875), "classes": state.get("classes"),
                "weights": "ema" if ema else "model"}
        return (ema["weights"] if ema else state["model"]), meta
    return checkpoint, read_checkpoint(checkpoint)[1]


# ---- resume state --------------------------------------------------------------------------------------------------

def resume_path(path: str | os.PathLike) -> Path:
    """``OUT``, ``OUT/last.safetensors``, ``OUT/last.json`` or ``OUT/last.state.pt`` -> ``OUT/last.state.pt``."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--resume {str(p)!r}: no such file or folder")
    if p.is_dir():
        p = p / "last.state.pt"
    elif not p.name.endswith(".state.pt"):
        p = p.with_name(p.name.split(".")[0] + ".state.pt")
    if not p.is_file():
        raise FileNotFoundError(f"no training state at {p} (written at the end of every epoch by edgevits train)")
    return p


def load_state(path: str | os.PathLike) -> dict:
    return torch.load(str(resume_path(path)), map_location="cpu", weights_only=True)


def _rng_state(device: torch.device) -> dict:
    """This process's random state: the CPU generator's, and that of the GPU it trains on (only that one: touching
    every visible GPU would open a CUDA context on each from every process)."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    """Restore ``_rng_state``; a GPU state is restored on ``device`` only (a CPU run ignores it)."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, (list, tuple)):  # written by earlier versions: one state per visible GPU
        cuda = cuda[min(device.index or 0, len(cuda) - 1)] if cuda else None
    if device.type == "cuda" and cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def _write_metrics(path: Path, rows: list[dict]) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in rows)))


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a metrics.jsonl file."""
    p = Path(path)
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.is_file() else []


def strip_timing(row: dict) -> dict:
    """A metrics row without its wall-clock fields (what must match between a resumed and a straight run)."""
    return {k: v for k, v in row.items() if k not in _TIMING_KEYS}


# ---- the loop ------------------------------------------------------------------------------------------------------

def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data``; see the module docstring for what is written where."""
    rt = setup_runtime(cfg.device)
    threads = torch.get_num_threads()
    try:
        return _train(cfg, rt, log if rt.main else (lambda *_: None))
    finally:
        torch.set_num_threads(threads)  # --threads applies to this run only
        if rt.owns_group:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, rt: Runtime, log: Callable[[str], None]) -> TrainResult:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.output)
    state = load_state(cfg.resume) if cfg.resume else None
    amp = cfg.amp and rt.device.type == "cuda"

    # data
    root = Path(cfg.data)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise FileNotFoundError(f"{root / split} is missing: --data needs train/ and val/ folders, each with a "
                                    "folder of images per class")
    train_samples, classes = scan_image_folder(root / "train")
    workers = default_workers(rt.world_size) if cfg.workers < 0 else cfg.workers
    vloader, _ = val_loader(root / "val", classes, cfg.img_size, cfg.crop_pct, cfg.batch_size, workers, rt)
    transform = TrainTransform(cfg.img_size, cfg.scale_min, cfg.hflip, RandAugment.parse(cfg.randaugment),
                               cfg.color_jitter, cfg.reprob)
    train_ds = ImageFolderDataset(train_samples, classes, transform, seed=cfg.seed)
    sampler = EpochSampler(len(train_ds), cfg.seed, rt.rank, rt.world_size, cfg.repeated_aug)
    drop_last = len(sampler) > cfg.batch_size
    tloader = torch.utils.data.DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler,
                                          num_workers=workers, collate_fn=collate_skipping, drop_last=drop_last,
                                          persistent_workers=workers > 0, pin_memory=rt.device.type == "cuda",
                                          generator=torch.Generator())
    # (a loader draws its workers' base seed from its generator each time it starts an epoch; with the global
    # one, the dropout stream would depend on the number of loader processes and on where a run was resumed)
    steps_per_epoch = len(tloader)
    derived = resolve(cfg, rt.world_size, steps_per_epoch)
    num_classes = len(classes)

    # model, teacher, optimiser
    torch.manual_seed(cfg.seed)  # identical initialisation on every process
    model = build_student(cfg, num_classes, log).to(rt.device)
    if amp:
        model = model.to(memory_format=torch.channels_last)
    teacher = build_teacher(cfg, num_classes, log).to(rt.device) if cfg.teacher else None
    loss_fn = DistillationLoss(teacher, cfg.distillation, cfg.distillation_alpha, cfg.distillation_tau,
                               cfg.teacher_img_size)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=derived["lr"], eps=cfg.opt_eps,
                            betas=(0.9, 0.999))
    ema = ModelEma(model, derived["ema_decay"]) if derived["ema_decay"] > 0 else None
    schedule = Schedule(derived["lr"], derived["total_steps"], derived["warmup_epochs"] * steps_per_epoch,
                        derived["warmup_lr"], derived["min_lr"])
    mixer = Mixer(num_classes, cfg.mixup, cfg.cutmix, cfg.mixup_prob, cfg.mixup_switch_prob, cfg.smoothing)

    start_epoch, best_top1, best_epoch = 0, -1.0, 0
    torch.manual_seed(cfg.seed + 1 + rt.rank)  # dropout / drop-path stream, per process
    metrics_path = out / "metrics.jsonl"
    rows: list[dict] = []
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state(state["ema"])
        start_epoch, best_top1, best_epoch = int(state["epochs_done"]), float(state["best_top1"]), \
            int(state["best_epoch"])
        if rt.world_size == len(state["rng"]):
            _set_rng_state(state["rng"][rt.rank], rt.device)
        else:
            log(f"warning: resuming with {rt.world_size} processes, saved with {len(state['rng'])}: "
                "the random streams differ from an uninterrupted run")
            _set_rng_state(state["rng"][0], rt.device)
        rows = [r for r in read_metrics(metrics_path) if r["epoch"] <= start_epoch]
        log(f"resumed from {cfg.resume} after epoch {start_epoch}")
    if rt.main:
        out.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"config": cfg.to_dict(), "derived": derived, "classes": classes}, indent=2)
        atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(text))
        _write_metrics(metrics_path, rows)

    raw = model
    if rt.world_size > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    if derived["min_lr"] != cfg.min_lr:
        log(f"note: --min-lr {cfg.min_lr:.3g} is not below the peak lr {derived['lr']:.3g}: the cosine ends at "
            f"{derived['min_lr']:.3g} instead")
    log(f"training {cfg.model} ({sum(p.numel() for p in raw.parameters()) / 1e6:.2f} M params) on "
        f"{len(train_ds)} images / {num_classes} classes, {rt.world_size} process(es) on {rt.device}, "
        f"{steps_per_epoch} steps/epoch, lr {derived['lr']:.3g}, EMA {derived['ema_decay']:.6g}")
    extra_meta = {"classes": classes, "img_size": cfg.img_size, "crop_pct": cfg.crop_pct,
                  "train_config": cfg.to_dict()}
    result = TrainResult(out, rows, best_top1, best_epoch)
    last_epoch = cfg.epochs if cfg.stop_after is None else min(cfg.epochs, cfg.stop_after)

    for epoch in range(start_epoch, last_epoch):
        sampler.set_epoch(epoch)
        model.train()
        loss_fn.train()
        sums = torch.zeros(4, dtype=torch.float64, device=rt.device)  # loss x images, images, skipped, bad steps
        lr = schedule(epoch * steps_per_epoch)
        t0 = time.perf_counter()
        bar = _progress(tloader, rt.main and cfg.progress, f"epoch {epoch + 1}/{cfg.epochs}")
        for step, (x, y, skipped) in enumerate(bar):
            sums[2] += skipped
            if _any_process(x is None or x.shape[0] < 2, rt):
                sums[3] += 1  # a batch of fewer than 2 readable images (BN needs 2) is skipped on every process
                continue
            global_step = epoch * steps_per_epoch + step
            lr = schedule(global_step)
            for group in opt.param_groups:
                group["lr"] = lr
            x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
            x, target = mixer(x, y, np.random.default_rng([cfg.seed, epoch, step, rt.rank, 17]))
            if amp:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(rt.device.type, dtype=torch.bfloat16, enabled=amp):
                outputs = model(x)
                loss = loss_fn(x, outputs, target)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch + 1} step {step}: lower --lr or "
                                         "raise --warmup-epochs")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad:
                clip_gradients(raw.parameters(), cfg.clip_grad, cfg.clip_mode)
            opt.step()
            if ema is not None:
                ema.update(raw)
            sums[0] += loss.detach().double() * x.shape[0]
            sums[1] += x.shape[0]
            if rt.main and cfg.progress and step % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}")
        train_time = time.perf_counter() - t0
        loss_sum, images, skipped_images, skipped_steps = _all_reduce(sums, rt).tolist()

        t1 = time.perf_counter()
        eval_model = ema.module if ema is not None else raw
        val = evaluate(eval_model, vloader, rt.device, rt, amp)
        row = {"epoch": epoch + 1, "train_loss": loss_sum / max(images, 1.0),
               "val_top1": val["top1"], "val_top5": val["top5"], "val_loss": val["loss"], "lr": lr,
               "weights": "ema" if ema is not None else "model"}
        if ema is not None:
            row["val_top1_raw"] = evaluate(raw, vloader, rt.device, rt, amp)["top1"]
        row.update({"train_images": int(images), "skipped_train_images": int(skipped_images),
                    "skipped_steps": int(skipped_steps), "val_images": val["images"],
                    "skipped_val_images": val["skipped"],
                    "img_per_s": images / max(train_time, 1e-9), "epoch_time_s": train_time,
                    "eval_time_s": time.perf_counter() - t1})
        rows.append(row)
        improved = row["val_top1"] > best_top1
        if improved:
            best_top1, best_epoch = row["val_top1"], epoch + 1
        if rt.main:
            _write_metrics(metrics_path, rows)
            weights = eval_model.state_dict()
            meta = {**extra_meta, "epoch": epoch + 1, "val_top1": row["val_top1"], "val_top5": row["val_top5"],
                    "weights": row["weights"]}
            if improved:
                save_checkpoint(raw, out / "best.safetensors", extra=meta, state_dict=weights)
            state = {"epochs_done": epoch + 1, "model": raw.state_dict(), "optimizer": opt.state_dict(),
                     "ema": ema.state() if ema is not None else None, "best_top1": best_top1,
                     "best_epoch": best_epoch, "rng": _gather_rng(rt), "config": cfg.to_dict(),
                     "classes": classes}
            atomic_write(out / "last.state.pt", lambda tmp: torch.save(state, tmp))
            save_checkpoint(raw, out / "last.safetensors", extra=meta, state_dict=weights)
        else:
            _gather_rng(rt)
        log(f"epoch {epoch + 1}/{cfg.epochs}  loss {row['train_loss']:.4f}  val top-1 {row['val_top1']:.4f}  "
            f"top-5 {row['val_top5']:.4f}  lr {lr:.2e}  {row['img_per_s']:.1f} img/s"
            + (f"  ({row['skipped_train_images']} unreadable images skipped)" if row["skipped_train_images"] else "")
            + ("  *best*" if improved else ""))
    result.metrics, result.best_top1, result.best_epoch = rows, best_top1, best_epoch
    result.finished = last_epoch == cfg.epochs
    if not result.finished:
        log(f"stopped after epoch {last_epoch} (--stop-after); continue with --resume {out / 'last.state.pt'}")
    return result


def _gather_rng(rt: Runtime) -> list[dict]:
    """Every process's RNG state (collective: all processes call it); rank 0 gets the list."""
    mine = _rng_state(rt.device)
    if rt.world_size == 1:
        return [mine]
    states = [None] * rt.world_size
    dist.all_gather_object(states, mine)
    return states


def _progress(iterable, show: bool, desc: str):
    if not show:
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)
