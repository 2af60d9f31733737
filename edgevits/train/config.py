"""``TrainConfig``: every training setting in one dataclass; the ``edgevits train`` flags are generated from it."""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field


def _help(text: str) -> dict:
    return {"help": text}


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Training settings. Defaults follow the SwiftFormer / EfficientFormer / EfficientViT recipe (DeiT-based, see
    docs/training.md); a few scale down with the run length so that short runs on small data stay sensible."""

    # what to train on
    data: str = field(metadata=_help("folder holding train/ and val/ in ImageFolder layout (a folder per class)"))
    model: str = field(metadata=_help("registered model name (see `edgevits models`)"))
    img_size: int = field(default=224, metadata=_help("training and evaluation resolution (a multiple of 32)"))
    checkpoint: str | None = field(default=None, metadata=_help(
        "pretrained weights to start from (any format create_model reads); a head of another class count is reset"))
    output: str = field(default="runs/train", metadata=_help(
        "output folder: metrics.jsonl, config.json, last.* and best.* checkpoints"))
    resume: str | None = field(default=None, metadata=_help(
        "continue a run from OUT/last.state.pt (or OUT/last.safetensors, or OUT); --output defaults to its folder"))
    stop_after: int | None = field(default=None, metadata=_help(
        "end the run once this many epochs are done (a resumed run counts the earlier ones), as an "
        "interruption would: last.* is written, the schedule still runs to --epochs"))
    seed: int = field(default=0, metadata=_help("seed of every random stream (data order, augmentation, dropout)"))

    # optimisation
    epochs: int = field(default=300, metadata=_help("training epochs"))
    batch_size: int = field(default=128, metadata=_help("images per step per process"))
    lr: float | None = field(default=None, metadata=_help(
        "peak learning rate; default 1e-3 x global batch / 1024 (the papers' scaling rule)"))
    min_lr: float = field(default=1e-5, metadata=_help(
        "learning rate at the end of the cosine schedule; when it is not below the peak (e.g. the default peak at "
        "a global batch of 10 or less) the cosine ends at a hundredth of the peak instead, so it never rises"))
    warmup_epochs: int = field(default=5, metadata=_help(
        "linear warm-up epochs (capped at a fifth of the run)"))
    warmup_lr: float = field(default=1e-6, metadata=_help(
        "learning rate at the start of the warm-up (the peak when that is lower)"))
    weight_decay: float = field(default=0.025, metadata=_help("AdamW weight decay (not applied to norms and biases)"))
    opt_eps: float = field(default=1e-8, metadata=_help("AdamW epsilon"))
    clip_grad: float | None = field(default=0.01, metadata=_help("gradient clipping threshold; 0 disables"))
    clip_mode: str = field(default="agc", metadata=_help(
        "agc (adaptive: per-unit gradient norm <= clip_grad x weight norm, as the official SwiftFormer recipe), "
        "norm (global gradient norm) or value"))
    smoothing: float = field(default=0.1, metadata=_help("label smoothing"))
    drop_path: float = field(default=0.0, metadata=_help("stochastic depth rate of the model"))
    ema_decay: float = field(default=0.99996, metadata=_help(
        "EMA decay of the weights; capped at max(1 - 5/total_steps, 0.9) so that a short run averages over "
        "about its last fifth at most; 0 disables EMA"))

    # augmentation
    hflip: float = field(default=0.5, metadata=_help("horizontal flip probability (0 for digits or text)"))
    scale_min: float = field(default=0.08, metadata=_help("smallest area fraction of the random resized crop"))
    randaugment: str = field(default="rand-m9-mstd0.5-inc1", metadata=_help(
        "RandAugment policy (timm syntax: rand-m<magnitude>-n<ops>-mstd<std>-inc<0|1>); 'none' disables"))
    color_jitter: float = field(default=0.4, metadata=_help(
        "colour jitter strength (used only when RandAugment is off, as in DeiT)"))
    reprob: float = field(default=0.25, metadata=_help("random erasing probability (per-pixel normal noise)"))
    mixup: float = field(default=0.8, metadata=_help("mixup alpha; 0 disables"))
    cutmix: float = field(default=1.0, metadata=_help("cutmix alpha; 0 disables"))
    mixup_prob: float = field(default=1.0, metadata=_help("probability of mixing a batch"))
    mixup_switch_prob: float = field(default=0.5, metadata=_help("probability of cutmix when both are enabled"))
    crop_pct: float = field(default=0.875, metadata=_help(
        "evaluation: resize to img_size / crop_pct (bicubic), then centre-crop img_size"))
    repeated_aug: int = field(default=1, metadata=_help(
        "repeated augmentation: each image appears this many times per epoch (the papers used 3 on many GPUs)"))

    # distillation (DeiT)
    teacher: str | None = field(default=None, metadata=_help(
        "teacher: a registered model name (with --teacher-checkpoint for its weights) or an edgevits checkpoint"))
    teacher_checkpoint: str | None = field(default=None, metadata=_help("weights of the teacher named by --teacher"))
    teacher_img_size: int | None = field(default=None, metadata=_help(
        "resolution the teacher sees (default: the student's); the batch is resized for it"))
    distillation: str = field(default="none", metadata=_help(
        "DeiT distillation through the student's distillation head: hard, soft or none"))
    distillation_alpha: float = field(default=0.5, metadata=_help("weight of the distillation loss"))
    distillation_tau: float = field(default=1.0, metadata=_help("temperature of soft distillation"))

    # machinery
    workers: int = field(default=-1, metadata=_help(
        "data-loading processes per training process; -1: one less than the cores available to it"))
    device: str = field(default="auto", metadata=_help("auto (cuda when present), cpu or cuda[:N]"))
    amp: bool = field(default=True, metadata=_help("bfloat16 autocast and channels_last on GPU"))
    threads: int = field(default=0, metadata=_help("CPU threads of the training process; 0 keeps torch's choice"))
    progress: bool = field(default=True, metadata=_help("a progress bar per epoch (rank 0)"))

    def __post_init__(self):
        if self.img_size % 32:
            raise ValueError(f"img_size must be a multiple of 32, got {self.img_size}")
        if self.distillation not in ("hard", "soft", "none"):
            raise ValueError(f"distillation must be hard, soft or none, got {self.distillation!r}")
        if self.distillation != "none" and not self.teacher:
            raise ValueError(f"--distillation {self.distillation} needs a --teacher")
        if self.teacher and self.distillation == "none":
            raise ValueError("--teacher given but --distillation is none: pass --distillation hard or soft")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if self.clip_mode not in ("agc", "norm", "value"):
            raise ValueError(f"clip_mode must be agc, norm or value, got {self.clip_mode!r}")
        if self.repeated_aug < 1:
            raise ValueError("repeated_aug must be >= 1")
        if not 0 < self.scale_min <= 1:
            raise ValueError("scale_min must be in (0, 1]")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- flags generated from the dataclass ---------------------------------------------------------------------------

def _base_type(tp) -> tuple[type, bool]:
    """``(type, optional)`` of a field annotation such as ``int | None``."""
    args = typing.get_args(tp)
    if args:
        non_none = [a for a in args if a is not type(None)]
        return non_none[0], len(non_none) < len(args)
    return tp, False


def add_config_arguments(parser: argparse.ArgumentParser, cls=TrainConfig) -> None:
    """One flag per field of ``cls``: ``--img-size``; booleans get ``--amp/--no-amp``. ``data`` and ``model``
    are required unless resuming (then they come from the saved config)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, optional = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        text = f.metadata.get("help", "")
        required = f.default is dataclasses.MISSING
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{text} (default: {f.default})")
            continue
        default_txt = "required" if required else f"default: {f.default}"
        parser.add_argument(flag, dest=f.name, type=tp, default=None, metavar=f.name.upper(),
                            help=f"{text} ({default_txt})")


def config_from_args(args: argparse.Namespace, base: dict | None = None) -> TrainConfig:
    """A ``TrainConfig`` from parsed flags; fields not given come from ``base`` (a saved config) or the defaults."""
    values = dict(base or {})
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in values.items() if k in names}
    for name in names:
        v = getattr(args, name, None)
        if v is not None:
            values[name] = v
    for required in ("data", "model"):
        if values.get(required) is None:
            raise ValueError(f"--{required} is required (unless --resume points at a run that recorded it)")
    if values.get("clip_grad") == 0:
        values["clip_grad"] = None
    return TrainConfig(**values)
