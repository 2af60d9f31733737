"""``TrainConfig``: every training setting in one dataclass; the ``edgevits train`` flags are generated from it."""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field

from ..errors import ConfigError, UnknownModelError


def _help(text: str) -> dict:
    return {"help": text}


_RECIPE = "(default: from --recipe)"  # the settings a recipe decides when the command line leaves them unset


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Training settings. Defaults follow the SwiftFormer / EfficientFormer / EfficientViT recipe (DeiT-based, see
    docs/training.md); a few scale down with the run length so that short runs on small data stay sensible."""

    # what to train on
    data: str = field(metadata=_help(
        "folder holding train/ and val/ in ImageFolder layout (a folder per class); required unless --resume "
        "names a run that recorded it"))
    model: str = field(metadata=_help(
        "registered model name (see `edgevits models`); required unless --resume names a run that recorded it"))
    img_size: int = field(default=224, metadata=_help(
        "training and evaluation resolution, at least 32: a multiple of 32 for SwiftFormer and EfficientFormer "
        "V1/V2, any size for EfficientViT"))
    checkpoint: str | None = field(default=None, metadata=_help(
        "pretrained weights to start from (any format create_model reads); a head of another class count is reset "
        "(default: none, random initialisation)"))
    pretrained: str | None = field(default=None, metadata={**_help(
        "start from the model's published weights: --pretrained alone for the default (timm's hub repo), or a tag "
        "(edgevits.list_weights(MODEL) lists them); downloaded once and cached; their preprocessing is the run's "
        "(default: none)"), "nargs": "?", "const": "default", "metavar": "TAG"})
    output: str = field(default="runs/train", metadata=_help(
        "output folder: metrics.jsonl, config.json, last.* and best.* checkpoints. A folder that already holds a "
        "run is refused, so that nothing is overwritten: continue that run with --resume OUT, or pass a new folder"))
    resume: str | None = field(default=None, metadata=_help(
        "continue a run from OUT/last.state.pt (or OUT/last.safetensors, or OUT), in OUT unless --output names "
        "another folder (one without a run) (default: none, a new run)"))
    stop_after: int | None = field(default=None, metadata=_help(
        "end the run once this many epochs are done (a resumed run counts the earlier ones), as an "
        "interruption would: last.* is written, the schedule still runs to --epochs (default: none, run to --epochs)"))
    seed: int = field(default=0, metadata=_help("seed of every random stream (data order, augmentation, dropout)"))

    # optimisation
    epochs: int = field(default=300, metadata=_help("training epochs"))
    recipe: str = field(default="auto", metadata=_help(
        "where the settings left unset come from: auto (scaled to the images the run will see and whether it "
        "starts from trained weights; see docs/training.md) or paper (the papers' ImageNet recipe)"))
    batch_size: int | None = field(default=None, metadata=_help(f"images per step per process {_RECIPE}"))
    lr: float | None = field(default=None, metadata=_help(
        f"peak learning rate {_RECIPE}: auto 2e-3 x sqrt(global batch / 64), from scratch and fine-tuning; "
        "paper 1e-3 x global batch / 1024"))
    backbone_lr_scale: float | None = field(default=None, metadata=_help(
        f"the backbone's learning rate as a fraction of the head's (below 1 for a gentler fine-tuning) {_RECIPE}: "
        "1 (a tenth lost 15-35 points fine-tuning MNIST-5k models on rotated digits)"))
    freeze_epochs: int = field(default=0, metadata=_help(
        "epochs at the start during which only the classifier learns (the backbone's learning rate is 0; its "
        "BatchNorm statistics still adapt); --epochs or more trains the classifier alone (a linear probe)"))
    min_lr: float = field(default=1e-5, metadata=_help(
        "learning rate at the end of the cosine schedule; when it is not below the peak (e.g. the scaled peak at "
        "a global batch of 10 or less) the cosine ends at a hundredth of the peak instead, so it never rises"))
    warmup_epochs: int | None = field(default=None, metadata=_help(
        f"linear warm-up epochs, capped at a fifth of the run {_RECIPE}"))
    warmup_lr: float = field(default=1e-6, metadata=_help(
        "learning rate at the start of the warm-up (the peak when that is lower)"))
    weight_decay: float = field(default=0.025, metadata=_help("AdamW weight decay (not applied to norms and biases)"))
    opt_eps: float = field(default=1e-8, metadata=_help("AdamW epsilon"))
    clip_grad: float | None = field(default=0.01, metadata=_help("gradient clipping threshold; 0 disables"))
    clip_mode: str = field(default="agc", metadata=_help(
        "agc (adaptive: per-unit gradient norm <= clip_grad x weight norm, as the official SwiftFormer recipe), "
        "norm (global gradient norm) or value"))
    smoothing: float | None = field(default=None, metadata=_help(f"label smoothing {_RECIPE}"))
    drop_path: float = field(default=0.0, metadata=_help("stochastic depth rate of the model"))
    bn_images: int | None = field(default=None, metadata=_help(
        "training images (preprocessed as for evaluation) on which the BatchNorm statistics are recomputed before "
        "each validation, so that a short run is not judged by running averages that lag its weights; 0 keeps "
        f"the running averages {_RECIPE}: auto min(training images, 512), paper 0"))
    ema_decay: float | None = field(default=None, metadata=_help(
        "EMA decay of the weights, capped at max(1 - 5/total_steps, 0.9) so that a short run averages over about "
        f"its last fifth at most; 0 disables EMA {_RECIPE}"))

    # augmentation
    hflip: float | None = field(default=None, metadata=_help(
        f"horizontal flip probability: 0 for digits, text, or anything whose mirror image is another class {_RECIPE}"))
    scale_min: float | None = field(default=None, metadata=_help(
        f"smallest area fraction of the random resized crop {_RECIPE}"))
    randaugment: str | None = field(default=None, metadata=_help(
        "RandAugment policy (timm syntax: rand-m<magnitude>-n<ops>-mstd<std>-inc1, built from albumentations' "
        f"ops); 'none' disables {_RECIPE}"))
    color_jitter: float | None = field(default=None, metadata=_help(
        f"colour jitter strength (used only when RandAugment is off, as in DeiT) {_RECIPE}"))
    reprob: float | None = field(default=None, metadata=_help(
        f"random erasing probability (per-pixel normal noise) {_RECIPE}"))
    mixup: float | None = field(default=None, metadata=_help(f"mixup alpha; 0 disables {_RECIPE}"))
    cutmix: float | None = field(default=None, metadata=_help(f"cutmix alpha; 0 disables {_RECIPE}"))
    mixup_prob: float = field(default=1.0, metadata=_help("probability of mixing a batch"))
    mixup_switch_prob: float = field(default=0.5, metadata=_help("probability of cutmix when both are enabled"))
    crop_pct: float | None = field(default=None, metadata=_help(
        "evaluation: resize to img_size / crop_pct, then centre-crop img_size; when not given, the --pretrained "
        "weights' crop, else the papers' 0.875 (the official evaluation: resize 256, crop 224)"))
    repeated_aug: int = field(default=1, metadata=_help(
        "repeated augmentation: each image appears this many times per epoch (the papers used 3 on many GPUs)"))

    # distillation (DeiT)
    teacher: str | None = field(default=None, metadata=_help(
        "teacher: a registered model name (with --teacher-checkpoint for its weights) or an edgevits checkpoint "
        "(default: none, no distillation)"))
    teacher_checkpoint: str | None = field(default=None, metadata=_help(
        "weights of the teacher named by --teacher (default: none)"))
    teacher_img_size: int | None = field(default=None, metadata=_help(
        "resolution the teacher sees (when not given, the student's); the batch is resized for it"))
    distillation: str = field(default="none", metadata=_help(
        "DeiT distillation through the student's distillation head: hard, soft or none"))
    distillation_alpha: float = field(default=0.5, metadata=_help("weight of the distillation loss"))
    distillation_tau: float = field(default=1.0, metadata=_help("temperature of soft distillation"))

    # machinery
    workers: int = field(default=-1, metadata=_help(
        "data-loading processes per training process; -1: one less than the cores available to it"))
    device: str = field(default="auto", metadata=_help("auto (cuda when present), cpu or cuda[:N]"))
    amp: bool = field(default=True, metadata=_help("bfloat16 autocast and channels_last on GPU"))
    threads: int = field(default=0, metadata=_help(
        "torch intra-op CPU threads of the training process, for this run only; 0 keeps torch's choice"))
    progress: bool = field(default=True, metadata=_help("a progress bar per epoch (rank 0)"))

    def __post_init__(self):
        """Check every field (``ConfigError`` naming the flag, what it must be and what it got) and turn paths given
        as ``os.PathLike`` into strings, so that a bad setting fails here, before any data is read."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, os.PathLike):
                object.__setattr__(self, f.name, os.fspath(value))
            _check_type(f.name, getattr(self, f.name), hints[f.name])
        check_values({name: getattr(self, name) for name in RULES})
        self._check_choices()
        check_model_size(self.model, self.img_size)
        if self.pretrained:  # an unknown tag fails here, before any download
            from ..checkpoint.weights import get_weights
            try:  # ("default" becomes the tag it stands for, so that config.json names the weights)
                object.__setattr__(self, "pretrained", get_weights(self.model, self.pretrained).tag)
            except (ConfigError, UnknownModelError) as e:
                raise type(e)(f"--pretrained: {e}") from None
        self._check_teacher()
        check_device(self.device, here=False)  # whether it is present is checked where the run starts

    def _check_choices(self) -> None:
        """The fields that take one of a few words, and the flags that go together."""
        if not self.data or not self.model or not self.output:
            empty = [flag(n) for n in ("data", "model", "output") if not getattr(self, n)]
            raise ConfigError(f"{', '.join(empty)} must not be empty: pass a path or name")
        if self.recipe not in ("auto", "paper"):
            raise ConfigError(f"--recipe must be auto or paper, got {self.recipe!r}")
        if self.distillation not in ("hard", "soft", "none"):
            raise ConfigError(f"--distillation must be hard, soft or none, got {self.distillation!r}")
        if self.clip_mode not in ("agc", "norm", "value"):
            raise ConfigError(f"--clip-mode must be agc, norm or value, got {self.clip_mode!r}")
        if self.distillation != "none" and not self.teacher:
            raise ConfigError(f"--distillation {self.distillation} needs a --teacher (a model name or checkpoint)")
        if self.teacher and self.distillation == "none":
            raise ConfigError("--teacher given but --distillation is none: pass --distillation hard or soft")
        if self.teacher_checkpoint and not self.teacher:
            raise ConfigError("--teacher-checkpoint given without --teacher: pass --teacher MODEL_NAME as well")
        if self.pretrained and self.checkpoint:
            raise ConfigError("--pretrained and --checkpoint both given: pass one (--pretrained loads published "
                              "weights, --checkpoint a file of your own)")
        from .augment import RandAugment
        try:
            RandAugment.parse(self.randaugment)
        except ValueError as e:
            raise ConfigError(f"--randaugment: {e} (or 'none')") from None

    def _check_teacher(self) -> None:
        """A ``--teacher`` that is not a file must be a registered model, and ``--teacher-img-size`` must suit it."""
        if not self.teacher or os.path.exists(self.teacher):
            return
        from ..registry import get_entry
        try:
            get_entry(self.teacher)
        except UnknownModelError as e:
            raise UnknownModelError(f"--teacher {self.teacher!r} is neither a checkpoint file nor a registered "
                                    f"model: {e}") from None
        if self.teacher_img_size is not None:
            check_model_size(self.teacher, self.teacher_img_size, "--teacher-img-size")

    def to_dict(self) -> dict:
        """The settings as a JSON-ready dict (what config.json and the training state record)."""
        return dataclasses.asdict(self)

    def data_config(self):
        """The run's preprocessing (a ``DataConfig``): the ``--pretrained`` weights' (``edgevits.data_config``),
        else the official evaluation's, at ``--img-size``, with ``--crop-pct`` when given."""
        from ..checkpoint.preprocess import DataConfig, data_config
        from ..checkpoint.weights import weights_table
        if self.pretrained or self.model in weights_table():
            base = data_config(self.model, self.pretrained or "official")
        else:  # a model registered by the user: ImageNet statistics and the papers' evaluation crop
            base = DataConfig()
        base = base.with_size(self.img_size)
        return dataclasses.replace(base, crop_pct=self.crop_pct) if self.crop_pct else base

    def initial_weights(self):
        """The weights the run starts from: ``--checkpoint``, the file of the ``--pretrained`` weights (found in
        the drop-in folder or cache, else downloaded and checked), or None."""
        if not self.pretrained:
            return self.checkpoint
        from ..checkpoint.weights import get_weights, pretrained_file
        return pretrained_file(get_weights(self.model, self.pretrained))


# ---- checks shared by train and eval --------------------------------------------------------------------------------

MIN_IMG_SIZE = 32
"""The smallest training and evaluation resolution: every family's last stage then sees at least one pixel."""


@dataclass(frozen=True)
class Range:
    """An allowed interval of a numeric setting (finite values only); ``note`` is said after the error."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    note: str = ""

    def holds(self, v: float) -> bool:
        """Whether ``v`` lies in the interval (NaN and infinities never do)."""
        if not math.isfinite(v):
            return False
        above = self.low is None or (v > self.low if self.low_open else v >= self.low)
        below = self.high is None or (v < self.high if self.high_open else v <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


def _at_least(low: float, note: str = "") -> Range:
    return Range(low, note=note)


def _above(low: float, note: str = "") -> Range:
    return Range(low, low_open=True, note=note)


_FRACTION = Range(0, 1)

RULES: dict[str, Range] = {
    "img_size": _at_least(MIN_IMG_SIZE), "stop_after": _at_least(1), "seed": _at_least(0),
    "epochs": _at_least(1), "batch_size": _at_least(1), "lr": _above(0), "min_lr": _at_least(0),
    "warmup_epochs": _at_least(0, "0: no warm-up"), "warmup_lr": _at_least(0), "weight_decay": _at_least(0),
    "opt_eps": _above(0), "clip_grad": _at_least(0, "0 disables clipping"),
    "smoothing": Range(0, 1, high_open=True), "drop_path": Range(0, 1, high_open=True),
    "bn_images": _at_least(0, "0 keeps the running averages"),
    "ema_decay": Range(0, 1, high_open=True, note="0 disables EMA"), "hflip": _FRACTION,
    "scale_min": Range(0, 1, low_open=True), "color_jitter": _at_least(0), "reprob": _FRACTION,
    "mixup": _at_least(0, "0 disables mixup"), "cutmix": _at_least(0, "0 disables cutmix"),
    "mixup_prob": _FRACTION, "mixup_switch_prob": _FRACTION, "crop_pct": Range(0, 1, low_open=True),
    "repeated_aug": _at_least(1, "1: no repeats"), "teacher_img_size": _at_least(MIN_IMG_SIZE),
    "backbone_lr_scale": _at_least(0, "0 freezes the backbone"), "freeze_epochs": _at_least(0),
    "distillation_alpha": _FRACTION, "distillation_tau": _above(0),
    "workers": _at_least(-1, "-1: one less than the cores available, 0: load in the training process"),
    "threads": _at_least(0, "0 keeps torch's choice"),
}
"""What each numeric setting of ``TrainConfig`` (and of ``edgevits eval``) must be."""


def flag(name: str) -> str:
    """The command-line flag of a setting: ``img_size`` -> ``--img-size``."""
    return "--" + name.replace("_", "-")


def check_values(values: dict) -> None:
    """Raise a ``ConfigError`` naming the flag, the allowed range and the value found for the first of ``values``
    (setting name -> value; ``None`` means not set) outside its ``RULES`` range."""
    for name, value in values.items():
        rule = RULES[name]
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{flag(name)} must be a number, got {value!r}")
        if not rule.holds(value):
            note = f" ({rule.note})" if rule.note else ""
            raise ConfigError(f"{flag(name)} must be {rule}, got {value!r}{note}")


def _check_type(name: str, value, annotation) -> None:
    """A ``ConfigError`` when ``value`` is not of the field's type (``None`` only where the field allows it)."""
    tp, optional = _base_type(annotation)
    if value is None and (optional or tp is str):
        return  # a missing str is reported by the checks that need it
    wanted = (int, float) if tp is float else tp
    if isinstance(value, wanted) and not (isinstance(value, bool) and tp is not bool):
        return
    raise ConfigError(f"{flag(name)} must be {'a number' if tp in (int, float) else f'a {tp.__name__}'}"
                      f"{' (a whole number)' if tp is int else ''}, got {value!r} ({type(value).__name__})")


def check_model_size(model: str, size: int, option: str = "--img-size") -> None:
    """Raise an ``UnknownModelError`` for a model name that is not registered, and a ``ConfigError`` when ``size``
    is not a resolution ``model`` takes: at least ``MIN_IMG_SIZE``, a multiple of the model class's ``stride`` (32
    for SwiftFormer and EfficientFormer V1/V2, 1 for EfficientViT) and accepted by its config's own checks."""
    from ..registry import get_entry, resolve_config
    entry = get_entry(model)
    stride = int(getattr(entry.model_cls, "stride", 1) or 1)
    if size % stride:
        low = size // stride * stride
        near = " or ".join(str(s) for s in (low, low + stride) if s >= MIN_IMG_SIZE)
        raise ConfigError(f"{option} must be a multiple of {stride} for {model} ({entry.family}), got {size}: "
                          f"try {near}")
    try:
        resolve_config(model, img_size=size)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{option} {size} does not suit {model}: {e}") from None


def check_device(device: str, here: bool = True) -> None:
    """A ``ConfigError`` unless ``device`` is ``auto``, ``cpu`` or ``cuda[:N]``, and, when ``here``, a CUDA device
    this machine has."""
    import torch
    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"--device must be auto, cpu or cuda[:N], got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be auto, cpu or cuda[:N], got {device!r}")
    if dev.type == "cpu" or not here:
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if (dev.index or 0) >= count:
        found = f"{count} CUDA device(s) (cuda:0 to cuda:{count - 1})" if count else "no CUDA device"
        raise ConfigError(f"--device {device}: this machine has {found}; pass --device auto or cpu")


# ---- flags generated from the dataclass ---------------------------------------------------------------------------

def _base_type(tp) -> tuple[type, bool]:
    """``(type, optional)`` of a field annotation such as ``int | None``."""
    args = typing.get_args(tp)
    if args:
        non_none = [a for a in args if a is not type(None)]
        return non_none[0], len(non_none) < len(args)
    return tp, False


GIVEN = "_config_flags_given"
"""The attribute of a parsed namespace that holds the settings given on the command line (the others keep the
values of a resumed run)."""


def _record_given(namespace: argparse.Namespace, dest: str) -> None:
    """Add ``dest`` to the namespace's given settings (a new set: the parser's default is shared)."""
    setattr(namespace, GIVEN, frozenset(getattr(namespace, GIVEN, frozenset())) | {dest})


class _Store(argparse.Action):
    """Store the value and record that the flag was given."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        _record_given(namespace, self.dest)


class _Switch(argparse.BooleanOptionalAction):
    """``--flag/--no-flag``, recording that it was given."""

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        _record_given(namespace, self.dest)


def add_config_arguments(parser: argparse.ArgumentParser, cls=TrainConfig) -> None:
    """One flag per field of ``cls``: ``--img-size``; booleans get ``--amp/--no-amp``. Each flag's default is the
    field's (so that ``--help`` shows it); ``config_from_args`` takes only the flags given from the command line,
    so a resumed run keeps its saved settings for the others. ``data`` and ``model`` are required unless
    resuming (then they come from the saved config); their help says so."""
    hints = typing.get_type_hints(cls)
    parser.set_defaults(**{GIVEN: frozenset()})
    for f in dataclasses.fields(cls):
        tp, _ = _base_type(hints[f.name])
        text = f.metadata.get("help", "")
        default = None if f.default is dataclasses.MISSING else f.default
        if tp is bool:
            parser.add_argument(flag(f.name), dest=f.name, action=_Switch, default=default, help=text)
        else:
            extra = {k: f.metadata[k] for k in ("nargs", "const") if k in f.metadata}
            parser.add_argument(flag(f.name), dest=f.name, action=_Store, type=tp, default=default,
                                metavar=f.metadata.get("metavar", f.name.upper()), help=text, **extra)


def config_from_args(args: argparse.Namespace, base: dict | None = None) -> TrainConfig:
    """A ``TrainConfig`` from parsed flags: those given on the command line, then ``base`` (a saved config), then
    the defaults. (A namespace not parsed by ``add_config_arguments``' flags counts every non-``None`` value as
    given.)"""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in (base or {}).items() if k in names}
    if base is not None and "recipe" not in base:  # saved before --recipe: it ran the papers' recipe throughout
        values.update(recipe="paper", bn_images=0, backbone_lr_scale=1.0)
    given = getattr(args, GIVEN, None)
    for name in names:
        v = getattr(args, name, None)
        if (name in given) if given is not None else v is not None:
            values[name] = v
    for required in ("data", "model"):
        if values.get(required) is None:
            raise ConfigError(f"{flag(required)} is required (unless --resume names a run that recorded it): "
                              f"pass {flag(required)} {required.upper()}")
    if values.get("clip_grad") == 0:
        values["clip_grad"] = None
    return TrainConfig(**values)
