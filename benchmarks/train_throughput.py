"""Training throughput (img/s) of edgevits' swiftformer_xs against timm's swiftformer_xs in the same loop.

The loop is edgevits' training step: soft-target loss over both heads (mixup-style targets), backward, the
recipe's gradient clipping (adaptive by default), AdamW with its parameter groups, EMA update. Both models return
(cls, dist) in training (timm's with ``set_distilled_training(True)``). Steps are interleaved (ours, timm, ours,
timm, ...) and the medians of per-step times are compared (the order alternates between rounds), so a noisy
shared machine affects both alike.

    python benchmarks/train_throughput.py --img-size 224 --batch-size 32 --rounds 12 --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import edgevits
from edgevits.testing import import_timm
from edgevits.train.data import Mixer
from edgevits.train.ema import ModelEma
from edgevits.train.config import TrainConfig
from edgevits.train.optim import clip_gradients, param_groups
from edgevits.train.losses import DistillationLoss


RECIPE = TrainConfig(data=".", model="swiftformer_xs")  # the defaults of edgevits train


def make_step(model, batch: int, size: int, seed: int = 0):
    opt = torch.optim.AdamW(param_groups(model, 0.025), lr=1e-3)
    ema = ModelEma(model, 0.9999)
    loss_fn = DistillationLoss()
    mixer = Mixer(1000, mixup=0.8, cutmix=1.0, smoothing=0.1)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 1000, (batch,), generator=g)
    model.train()

    def step(i: int) -> float:
        t = time.perf_counter()
        xm, target = mixer(x, y, np.random.default_rng(i))
        loss = loss_fn(xm, model(xm), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(model.parameters(), RECIPE.clip_grad, RECIPE.clip_mode)  # as edgevits train does
        opt.step()
        ema.update(model)
        return time.perf_counter() - t

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=6, help="interleaved rounds (one step of each model per round)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    timm = import_timm()
    torch.manual_seed(0)
    ours = edgevits.create_model("swiftformer_xs", img_size=args.img_size)
    theirs = timm.create_model("swiftformer_xs")
    theirs.set_distilled_training(True)
    steps = {"edgevits": make_step(ours, args.batch_size, args.img_size),
             "timm": make_step(theirs, args.batch_size, args.img_size)}
    for name, step in steps.items():
        for i in range(args.warmup):
            step(i)
    times = {name: [] for name in steps}
    for r in range(args.rounds):  # alternate the order each round, so neither model always runs second
        for name in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            times[name].append(steps[name](args.warmup + r))
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"swiftformer_xs training step, batch {args.batch_size} at {args.img_size}x{args.img_size}, "
          f"{torch.get_num_threads()} thread(s), median of {args.rounds} interleaved steps")
    for name in steps:
        print(f"  {name:9s} {args.batch_size / med[name]:8.1f} img/s  ({med[name] * 1e3:.0f} ms/step)")
    print(f"  edgevits / timm throughput: {med['timm'] / med['edgevits']:.3f}x")


if __name__ == "__main__":
    main()
