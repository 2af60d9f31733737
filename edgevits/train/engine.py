"""The training loop: one process or many (torchrun + DDP), atomic checkpoints, exact resume.

``train(config)`` returns a ``TrainResult`` and prints nothing: it reports through the ``log`` and ``progress``
callbacks it is given (rank 0 only).

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
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint import atomic_write, config_hints, read_checkpoint, save_checkpoint
from ..errors import DataError, EdgevitsWarning
from ..registry import create_model, get_entry
from ..runtime.settings import num_threads
from .config import TrainConfig, check_device
from .data import (EpochSampler, ImageFolderDataset, Mixer, RandAugment, TrainTransform, check_classes,
                   collate_skipping, scan_image_folder)
from .distributed import Runtime, all_reduce, any_process, gather_rng, set_rng_state, setup_runtime
from .evaluate import default_workers, eval_loader, evaluate, recalibrate_batchnorm, val_loader
from .files import check_output, load_state, read_metrics, remove_leftovers, resume_path, write_metrics
from .optim import Schedule, clip_gradients, param_groups, resolve
from .recipe import settle
from .ema import ModelEma
from .losses import DistillationLoss

Log = Callable[[str], None]
"""``log(message)``: receives the run's messages (progress notes, warnings, one line per epoch)."""
Progress = Callable[[Iterable, int, str], Iterable]
"""``progress(batches, total, description) -> batches``: wraps each epoch's batch loop (e.g. in a progress bar).
When what it returns has a ``set_postfix`` method, the loop calls ``set_postfix(loss=..., lr=...)`` (floats: the
step's loss and learning rate) every 10 steps."""


def _no_log(message: str) -> None:
    """The default ``log``: drops the message."""


def _no_progress(batches: Iterable, total: int, description: str) -> Iterable:
    """The default ``progress``: the batches unchanged."""
    return batches


@dataclass
class TrainResult:
    """What ``train`` returns: the output folder, the metrics rows, the best validation top-1 and its epoch."""

    output: Path
    metrics: list[dict] = field(default_factory=list)
    best_top1: float = -1.0
    best_epoch: int = 0
    finished: bool = False  # False when --stop-after ended the run early


# ---- model, teacher, optimiser, schedule --------------------------------------------------------------------------

def build_student(cfg: TrainConfig, num_classes: int, log: Log | None = None,
                  weights: tuple[dict, dict] | None = None) -> nn.Module:
    """The student: fresh, or from ``cfg.checkpoint`` with its head reset (said through ``log``) when the class
    count differs. A distillation head missing from the checkpoint starts as a copy of the class head.
    ``weights``: ``read_checkpoint(cfg.checkpoint)`` when the caller has read it already."""
    log = log or _no_log
    want_dist = cfg.distillation != "none"
    common = dict(img_size=cfg.img_size, drop_path_rate=cfg.drop_path)
    if not cfg.checkpoint and weights is None:
        return create_model(cfg.model, num_classes=num_classes, distillation=want_dist, **common)
    from ..checkpoint import CheckpointError, load_checkpoint
    sd, meta = weights if weights is not None else read_checkpoint(cfg.checkpoint)
    hints = config_hints(get_entry(cfg.model), sd, meta)
    hints.pop("features_only", None)
    has_dist = bool(hints.get("distillation", False))
    ckpt_classes = int(hints.pop("num_classes", num_classes) or num_classes)
    model = create_model(cfg.model, **{**hints, **common, "num_classes": ckpt_classes,
                                       "distillation": want_dist or has_dist})
    report = load_checkpoint(model, sd, strict=False)
    missing = [k for k in report["missing"] if not k.startswith(("head.", "head_dist."))]
    if missing or report["unexpected"]:
        raise CheckpointError(f"{cfg.checkpoint or cfg.pretrained} does not fit {cfg.model}: missing "
                              f"{missing[:10]}, unexpected {report['unexpected'][:10]}")
    if report["resized"]:
        log(f"{len(report['resized'])} attention-bias table(s) resized to --img-size {cfg.img_size} (the checkpoint "
            f"was trained at another resolution), e.g. {report['resized'][0]}")
    head_missing = any(k.startswith("head.") for k in report["missing"])
    if model.head_dist is not None and any(k.startswith("head_dist.") for k in report["missing"]) \
            and not head_missing:
        model.head_dist.load_state_dict(model.head.state_dict())
    if ckpt_classes != num_classes or head_missing:
        log(f"checkpoint head has {ckpt_classes} classes, the data {num_classes}: classifier reset")
        model.reset_classifier(num_classes)
    return model


def build_teacher(cfg: TrainConfig, num_classes: int, log: Log | None = None) -> nn.Module:
    """The teacher from ``--teacher`` (a model name, with ``--teacher-checkpoint``, or an edgevits checkpoint);
    a teacher without weights is warned about through ``log``. Raises ``CheckpointError`` when its checkpoint
    names no model or predicts another number of classes."""
    from ..checkpoint import CheckpointError
    log = log or _no_log
    spec = cfg.teacher
    if os.path.exists(spec):  # a checkpoint file, or a run folder (its best.safetensors)
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


# ---- the loop ------------------------------------------------------------------------------------------------------

def train(cfg: TrainConfig, log: Log | None = None, progress: Progress | None = None) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data``; see the module docstring for what is written where.

    ``log`` receives the run's messages and ``progress`` wraps each epoch's batch loop (see ``Log`` and
    ``Progress``), on rank 0 only; by default nothing is reported. ``cfg.progress`` is the command line's switch
    for passing a progress bar.

    Bad input fails before anything is written: an output folder that is a file, is not writable or holds
    another run (see ``files.check_output``), a training state, checkpoint or teacher that cannot be read or does
    not fit, data that is not an ImageFolder. Temporary files an interrupted save left in the output folder are
    removed."""
    check_device(cfg.device)
    check_output(cfg.output, cfg.resume)  # every process, before any writes (see the barrier below)
    rt = setup_runtime(cfg.device)
    if rt.world_size > 1:
        dist.barrier()  # no process writes before every one has checked the output folder
    log = log if rt.main and log is not None else _no_log
    progress = progress if rt.main and progress is not None else _no_progress
    try:
        with num_threads(cfg.threads):  # --threads applies to this run only
            run = _build_run(cfg, rt, log)
            _restore(run, log)
            return _loop(run, log, progress)
    finally:
        if rt.owns_group:
            dist.destroy_process_group()


@dataclass
class _Run:
    """Everything a training run holds: its config, data, model and optimisation state, and where it stands."""

    cfg: TrainConfig
    rt: Runtime
    out: Path
    classes: list[str]
    train_size: int
    sampler: EpochSampler
    tloader: object
    vloader: object
    derived: dict
    model: nn.Module  # the raw model (DDP wraps it in ``forward_model``)
    loss_fn: DistillationLoss
    opt: torch.optim.Optimizer
    ema: ModelEma | None
    schedule: Schedule
    mixer: Mixer
    forward_model: nn.Module | None = None
    state: dict | None = None  # the training state to resume from
    bnloader: object = None  # training images for recomputing BatchNorm statistics (--bn-images)
    start_epoch: int = 0
    epoch: int = 0  # the epoch being trained
    best_top1: float = -1.0
    best_epoch: int = 0
    rows: list[dict] = field(default_factory=list)

    @property
    def amp(self) -> bool:
        return self.cfg.amp and self.rt.device.type == "cuda"

    @property
    def steps_per_epoch(self) -> int:
        return len(self.tloader)


def _scan(cfg: TrainConfig) -> tuple[list, list[str]]:
    """The training split's ``(samples, classes)`` (``DataError`` when ``--data`` lacks train/ or val/)."""
    root = Path(cfg.data)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(f"{root / split} is missing: --data needs train/ and val/ folders, each with a "
                            "folder of images per class")
    return scan_image_folder(root / "train")


def _loaders(cfg: TrainConfig, rt: Runtime, train_samples: list, classes: list[str]):
    """``(train dataset size, sampler, train loader, val loader, BatchNorm loader)`` for ``cfg.data`` (recipe
    settled); the last is None without ``--bn-images``, else ``--bn-images`` training images drawn once with the
    run's seed, preprocessed as for evaluation."""
    root = Path(cfg.data)
    workers = default_workers(rt.world_size) if cfg.workers < 0 else cfg.workers
    preprocess = cfg.data_config()
    vloader, _ = val_loader(root / "val", classes, preprocess, cfg.batch_size, workers, rt)
    transform = TrainTransform(cfg.img_size, cfg.scale_min, cfg.hflip, RandAugment.parse(cfg.randaugment),
                               cfg.color_jitter, cfg.reprob, preprocess.mean, preprocess.std, preprocess.interpolation)
    train_ds = ImageFolderDataset(train_samples, classes, transform, seed=cfg.seed)
    sampler = EpochSampler(len(train_ds), cfg.seed, rt.rank, rt.world_size, cfg.repeated_aug)
    # (a loader draws its workers' base seed from its generator each time it starts an epoch; with the global
    # one, the dropout stream would depend on the number of loader processes and on where a run was resumed)
    tloader = torch.utils.data.DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler,
                                          num_workers=workers, collate_fn=collate_skipping,
                                          drop_last=len(sampler) > cfg.batch_size, persistent_workers=workers > 0,
                                          pin_memory=rt.device.type == "cuda", generator=torch.Generator())
    bnloader = None
    if cfg.bn_images:
        keep = sorted(np.random.default_rng(cfg.seed).permutation(len(train_samples))[:cfg.bn_images])
        bnloader = eval_loader([train_samples[i] for i in keep], classes, preprocess, cfg.batch_size, workers, rt)
    return len(train_ds), sampler, tloader, vloader, bnloader


def _build_run(cfg: TrainConfig, rt: Runtime, log: Log) -> _Run:
    """Data, model, teacher, loss, optimiser, EMA, schedule and mixer of a run (nothing restored yet). The
    training state and the pretrained weights are read first: a file that cannot be used fails before the data
    is scanned."""
    state = load_state(cfg.resume) if cfg.resume else None
    initial = cfg.initial_weights()  # --checkpoint, or the --pretrained weights' file (downloaded once)
    weights = read_checkpoint(initial) if initial else None
    train_samples, classes = _scan(cfg)
    cfg, recipe_lines = settle(cfg, len(train_samples), rt.world_size)
    for line in recipe_lines:
        log(line)
    train_size, sampler, tloader, vloader, bnloader = _loaders(cfg, rt, train_samples, classes)
    derived = resolve(cfg, rt.world_size, len(tloader))
    num_classes = len(classes)
    torch.manual_seed(cfg.seed)  # identical initialisation on every process
    model = build_student(cfg, num_classes, log, weights).to(rt.device)
    del weights
    if cfg.amp and rt.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    teacher = build_teacher(cfg, num_classes, log).to(rt.device) if cfg.teacher else None
    loss_fn = DistillationLoss(teacher, cfg.distillation, cfg.distillation_alpha, cfg.distillation_tau,
                               cfg.teacher_img_size)
    opt = _optimizer(model, cfg, derived["lr"], split_head=not _legacy_groups(state))
    ema = ModelEma(model, derived["ema_decay"]) if derived["ema_decay"] > 0 else None
    schedule = Schedule(derived["lr"], derived["total_steps"], derived["warmup_epochs"] * len(tloader),
                        derived["warmup_lr"], derived["min_lr"])
    mixer = Mixer(num_classes, cfg.mixup, cfg.cutmix, cfg.mixup_prob, cfg.mixup_switch_prob, cfg.smoothing)
    return _Run(cfg, rt, Path(cfg.output), classes, train_size, sampler, tloader, vloader, derived, model, loss_fn,
                opt, ema, schedule, mixer, state=state, bnloader=bnloader)


def _optimizer(model: nn.Module, cfg: TrainConfig, lr: float, split_head: bool = True) -> torch.optim.Optimizer:
    """AdamW over ``param_groups`` (the schedule sets each group's rate every step)."""
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.backbone_lr_scale, split_head), lr=lr,
                             eps=cfg.opt_eps, betas=(0.9, 0.999))


def _legacy_groups(state: dict | None) -> bool:
    """Whether a training state holds the two optimiser groups of edgevits before fine-tuning's head group."""
    return state is not None and len(state.get("optimizer", {}).get("param_groups", [])) == 2 \
        and not any("lr_scale" in g for g in state["optimizer"]["param_groups"])


def _restore(run: _Run, log: Log) -> None:
    """Seed the per-process random stream, load the training state to resume from (if any), write config.json
    and the metrics kept so far, and wrap the model for DDP."""
    cfg, rt = run.cfg, run.rt
    torch.manual_seed(cfg.seed + 1 + rt.rank)  # dropout / drop-path stream, per process
    metrics_path = run.out / "metrics.jsonl"
    state = run.state
    if state is not None:
        _load_state_dicts(run, state)
        run.start_epoch, run.best_top1, run.best_epoch = (int(state["epochs_done"]), float(state["best_top1"]),
                                                          int(state["best_epoch"]))
        if rt.world_size == len(state["rng"]):
            set_rng_state(state["rng"][rt.rank], rt.device)
        else:
            log(f"warning: resuming with {rt.world_size} processes, saved with {len(state['rng'])}: "
                "the random streams differ from an uninterrupted run")
            set_rng_state(state["rng"][0], rt.device)
        saved_rows = read_metrics(resume_path(cfg.resume).parent / "metrics.jsonl")  # (also into a new --output)
        run.rows = [r for r in saved_rows if r["epoch"] <= run.start_epoch]
        log(f"resumed from {cfg.resume} after epoch {run.start_epoch}")
    if rt.main:
        for leftover in remove_leftovers(run.out):
            log(f"removed {leftover.name}, left by an interrupted save")
        run.out.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"config": cfg.to_dict(), "derived": run.derived, "classes": run.classes}, indent=2)
        atomic_write(run.out / "config.json", lambda tmp: Path(tmp).write_text(text))
        write_metrics(metrics_path, run.rows)
    run.forward_model = run.model
    if rt.world_size > 1:
        run.forward_model = nn.parallel.DistributedDataParallel(
            run.model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)


def _load_state_dicts(run: _Run, state: dict) -> None:
    """Load the model, optimiser and EMA of a training state; one saved with other settings (model, classes,
    distillation head) is a ``CheckpointError``."""
    from ..checkpoint import CheckpointError
    check_classes(run.classes, state.get("classes"), f"--data {run.cfg.data!r} (train/)",
                  f"the training state {run.cfg.resume!r}")
    try:
        run.model.load_state_dict(state["model"])
        ours = [{k: g[k] for k in ("lr_scale", "backbone")} for g in run.opt.param_groups]
        run.opt.load_state_dict(state["optimizer"])
        for group, own in zip(run.opt.param_groups, ours):  # this run's settings, not the saved ones
            group.update(own)
        if run.ema is not None and state.get("ema") is not None:
            run.ema.load_state(state["ema"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        detail = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise CheckpointError(f"training state {run.cfg.resume!r} does not fit this run ({run.cfg.model}, "
                              f"{len(run.classes)} classes, distillation {run.cfg.distillation}): {detail}; resume "
                              "with the settings it was saved with (leave out --model, --distillation, ...)") \
            from None


def _loop(run: _Run, log: Log, progress: Progress) -> TrainResult:
    """The epochs from where the run stands to ``--epochs`` (or ``--stop-after``): train, evaluate, save, log."""
    cfg, derived = run.cfg, run.derived
    if derived["min_lr"] != cfg.min_lr:
        log(f"note: --min-lr {cfg.min_lr:.3g} is not below the peak lr {derived['lr']:.3g}: the cosine ends at "
            f"{derived['min_lr']:.3g} instead")
    log(f"training {cfg.model} ({sum(p.numel() for p in run.model.parameters()) / 1e6:.2f} M params) on "
        f"{run.train_size} images / {len(run.classes)} classes, {run.rt.world_size} process(es) on {run.rt.device}, "
        f"{run.steps_per_epoch} steps/epoch, lr {derived['lr']:.3g}, EMA {derived['ema_decay']:.6g}")
    last_epoch = cfg.epochs if cfg.stop_after is None else min(cfg.epochs, cfg.stop_after)
    for epoch in range(run.start_epoch, last_epoch):
        stats = _train_epoch(run, epoch, progress)
        row = _evaluate_epoch(run, epoch, stats)
        run.rows.append(row)
        improved = row["val_top1"] > run.best_top1
        if improved:
            run.best_top1, run.best_epoch = row["val_top1"], epoch + 1
        _save(run, epoch, row, improved)
        log(f"epoch {epoch + 1}/{cfg.epochs}  loss {row['train_loss']:.4f}  val top-1 {row['val_top1']:.4f}  "
            f"top-5 {row['val_top5']:.4f}  lr {row['lr']:.2e}  {row['img_per_s']:.1f} img/s"
            + (f"  ({row['skipped_train_images']} unreadable images skipped)" if row["skipped_train_images"] else "")
            + ("  *best*" if improved else ""))
    result = TrainResult(run.out, run.rows, run.best_top1, run.best_epoch, finished=last_epoch == cfg.epochs)
    if not result.finished:
        log(f"stopped after epoch {last_epoch} (--stop-after); continue with --resume {run.out / 'last.state.pt'}")
    return result


def _train_epoch(run: _Run, epoch: int, progress: Progress) -> dict:
    """One epoch of training steps (the batch loop wrapped by ``progress``); returns the summed statistics (over
    processes) and the last learning rate."""
    cfg, rt = run.cfg, run.rt
    run.epoch = epoch
    run.sampler.set_epoch(epoch)
    run.forward_model.train()
    run.loss_fn.train()
    sums = torch.zeros(4, dtype=torch.float64, device=rt.device)  # loss x images, images, skipped, bad steps
    lr = run.schedule(epoch * run.steps_per_epoch)
    t0 = time.perf_counter()
    bar = progress(run.tloader, run.steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}")
    postfix = getattr(bar, "set_postfix", None)
    for step, (x, y, skipped) in enumerate(bar):
        sums[2] += skipped
        if any_process(x is None or x.shape[0] < 2, rt):
            sums[3] += 1  # a batch of fewer than 2 readable images (BN needs 2) is skipped on every process
            continue
        lr = run.schedule(epoch * run.steps_per_epoch + step)
        loss = _step(run, x, y, lr, np.random.default_rng([cfg.seed, epoch, step, rt.rank, 17]))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch + 1} step {step}: lower --lr or "
                                     "raise --warmup-epochs")
        sums[0] += loss.detach().double() * x.shape[0]
        sums[1] += x.shape[0]
        if postfix is not None and step % 10 == 0:
            postfix(loss=loss.item(), lr=lr)
    loss_sum, images, skipped_images, skipped_steps = all_reduce(sums, rt).tolist()
    return {"train_loss": loss_sum / max(images, 1.0), "lr": lr, "train_images": int(images),
            "skipped_train_images": int(skipped_images), "skipped_steps": int(skipped_steps),
            "train_time": time.perf_counter() - t0}


def _step(run: _Run, x: torch.Tensor, y: torch.Tensor, lr: float, rng: np.random.Generator) -> torch.Tensor:
    """One optimisation step on the batch (x, y); returns the loss (the update is skipped if it is not finite)."""
    rt = run.rt
    frozen = run.epoch < run.cfg.freeze_epochs  # the backbone waits while the new head learns
    for group in run.opt.param_groups:
        group["lr"] = lr * (0.0 if frozen and group["backbone"] else group["lr_scale"])
    x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
    x, target = run.mixer(x, y, rng)
    if run.amp:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(rt.device.type, dtype=torch.bfloat16, enabled=run.amp):
        loss = run.loss_fn(x, run.forward_model(x), target)
    if not torch.isfinite(loss):
        return loss
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    if run.cfg.clip_grad:
        clip_gradients(run.model.parameters(), run.cfg.clip_grad, run.cfg.clip_mode)
    run.opt.step()
    if run.ema is not None:
        run.ema.update(run.model)
    return loss


def _evaluate_epoch(run: _Run, epoch: int, stats: dict) -> dict:
    """The epoch's metrics row: the training statistics and the validation of the weights evaluation uses (the
    EMA when there is one, and the raw weights' top-1 beside it)."""
    t1 = time.perf_counter()
    eval_model = run.ema.module if run.ema is not None else run.model
    if run.bnloader is not None:
        recalibrate_batchnorm(eval_model, run.bnloader, run.rt.device, run.rt)
    val = evaluate(eval_model, run.vloader, run.rt.device, run.rt, run.amp)
    row = {"epoch": epoch + 1, "train_loss": stats["train_loss"], "val_top1": val["top1"], "val_top5": val["top5"],
           "val_loss": val["loss"], "lr": stats["lr"], "weights": "ema" if run.ema is not None else "model"}
    if run.ema is not None:  # the raw weights, judged the same way
        if run.bnloader is not None:
            recalibrate_batchnorm(run.model, run.bnloader, run.rt.device, run.rt)
        row["val_top1_raw"] = evaluate(run.model, run.vloader, run.rt.device, run.rt, run.amp)["top1"]
    row.update({"train_images": stats["train_images"], "skipped_train_images": stats["skipped_train_images"],
                "skipped_steps": stats["skipped_steps"], "val_images": val["images"],
                "skipped_val_images": val["skipped"],
                "img_per_s": stats["train_images"] / max(stats["train_time"], 1e-9),
                "epoch_time_s": stats["train_time"], "eval_time_s": time.perf_counter() - t1})
    return row


def _save(run: _Run, epoch: int, row: dict, improved: bool) -> None:
    """Write metrics.jsonl, best.* (when ``improved``), last.* and the training state, atomically (rank 0; the
    others take part in gathering the random states)."""
    rt, cfg = run.rt, run.cfg
    rng = gather_rng(rt)
    if not rt.main:
        return
    write_metrics(run.out / "metrics.jsonl", run.rows)
    weights = (run.ema.module if run.ema is not None else run.model).state_dict()
    preprocess = cfg.data_config()
    meta = {"classes": run.classes, "img_size": cfg.img_size, "crop_pct": preprocess.crop_pct,
            "data_config": preprocess.to_dict(), "train_config": cfg.to_dict(),
            "epoch": epoch + 1, "val_top1": row["val_top1"], "val_top5": row["val_top5"], "weights": row["weights"]}
    if improved:
        save_checkpoint(run.model, run.out / "best.safetensors", extra=meta, state_dict=weights)
    state = {"epochs_done": epoch + 1, "model": run.model.state_dict(), "optimizer": run.opt.state_dict(),
             "ema": run.ema.state() if run.ema is not None else None, "best_top1": run.best_top1,
             "best_epoch": run.best_epoch, "rng": rng, "config": cfg.to_dict(), "classes": run.classes}
    atomic_write(run.out / "last.state.pt", lambda tmp: torch.save(state, tmp))
    save_checkpoint(run.model, run.out / "last.safetensors", extra=meta, state_dict=weights)
    from .plots import plot_metrics  # (matplotlib is imported by the first save, not by importing the engine)
    try:  # metrics.png, redrawn every epoch (an interrupted run has it too), after what a resume needs
        plot_metrics(run.out)
    except (OSError, ValueError, RuntimeError) as e:
        warnings.warn(EdgevitsWarning(f"metrics.png not drawn: {e}"), stacklevel=2)
