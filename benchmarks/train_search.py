"""The search behind `edgevits train`'s defaults: many short runs on real data, side by side, one JSON line each.

Each run is ``edgevits train`` on one CPU thread with the data loaded in the training process (``--threads 1
--workers 0``), so that ``--jobs`` runs share the machine evenly. A run already in the results file is not run
again (the search resumes). Data sets: ``edgevits data mnist5k`` and ``edgevits data mnist5k-rot`` under
``--data-root`` (written when missing), and ``mnist-3x30`` (digits 0-2, 30 training images each, from mnist5k).
Fine-tuning runs start from the ``best.safetensors`` of the MNIST-5k run named in their ``from`` field.

The stages ran in the order lr, aug, tiny, bn, defaults, check, finetune. lr and aug ran before ``--recipe``
existed, so what they leave unset took the papers' values of the time (colour jitter 0.4, label smoothing 0.1,
EMA 0.99996 capped to 0.992 for 620 steps, 5 warm-up epochs capped to 2); the later stages ran ``--recipe auto``.

    python benchmarks/train_search.py --stage lr --jobs 2 --runs /tmp/search --out bench_results/train_search.jsonl
    python benchmarks/train_search.py --table --out bench_results/train_search.jsonl

scikit-learn's ``load_digits`` is kept out of this search: it is the independent check (``--stage check``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

EDGEVITS = [sys.executable, "-m", "edgevits"]

# The settings of the papers' recipe that a small run switches off (the quick start's flags before the adaptive
# defaults existed): each stage varies some of them from this base.
QUICK = {"batch-size": 64, "lr": 2e-3, "hflip": 0, "scale-min": 0.5, "randaugment": "none", "mixup": 0,
         "cutmix": 0, "reprob": 0}


def _runs(stage: str) -> list[dict]:
    """The runs of one stage: name, data set, model, epochs, flags (and ``from`` for fine-tuning)."""
    xs = dict(data="mnist5k", model="swiftformer_xs", epochs=10)
    if stage == "lr":  # learning rate and batch size, everything else as the quick start
        return [dict(xs, name=f"xs-lr{lr:g}-b{b}", flags={**QUICK, "lr": lr, "batch-size": b})
                for b in (32, 64, 128) for lr in (1e-3, 2e-3, 4e-3)]
    if stage == "aug":  # one augmentation at a time on top of the quick start
        variants = {"paper-aug": {"randaugment": "rand-m9-mstd0.5-inc1", "mixup": 0.8, "cutmix": 1.0, "reprob": 0.25,
                                  "scale-min": 0.08, "hflip": 0.5},
                    "ra-m5": {"randaugment": "rand-m5-n2-mstd0.5-inc1"},
                    "ra-m9": {"randaugment": "rand-m9-mstd0.5-inc1"},
                    "mix": {"mixup": 0.8, "cutmix": 1.0}, "erase": {"reprob": 0.25}, "scale0.08": {"scale-min": 0.08},
                    "scale0.25": {"scale-min": 0.25}, "scale0.8": {"scale-min": 0.8}, "hflip": {"hflip": 0.5},
                    "no-ema": {"ema-decay": 0}, "warm0": {"warmup-epochs": 0}, "smooth0": {"smoothing": 0}}
        return [dict(xs, name=f"xs-{k}", flags={**QUICK, **v}) for k, v in variants.items()]
    if stage == "defaults":  # the adaptive defaults with no flag, three families
        return [dict(data="mnist5k", model=m, epochs=10, name=f"auto-{m}-e10", flags={})
                for m in ("swiftformer_xs", "efficientvit_m0", "efficientformerv2_s0")]
    if stage == "bn":  # recomputed BatchNorm statistics against running averages on MNIST-5k (flips off)
        return [dict(data="mnist5k", model=m, epochs=10, name=f"bn-{m}-e10{suffix}", flags=flags)
                for m in ("swiftformer_xs", "efficientvit_m0")
                for suffix, flags in (("", {"hflip": 0}), ("-bn0", {"hflip": 0, "bn-images": 0}))]
    if stage == "tiny":  # three classes of thirty images: recomputed BatchNorm statistics against running averages
        return [dict(data="mnist-3x30", model=m, epochs=e, name=f"tiny-{m}-e{e}{suffix}", flags=flags)
                for m in ("swiftformer_xs", "efficientvit_m0", "efficientformerv2_s0") for e in (2, 10)
                for suffix, flags in (("", {}), ("-bn0", {"bn-images": 0}))]
    if stage == "ftlr":  # fine-tuning's learning rates on the second set (batch 8 there: sqrt(8 / 64) x 2e-3, 5e-4)
        return [dict(data=data, model=m, epochs=10, name=f"{prefix}ftlr-{m}-lr{lr:.3g}-bb{bb:g}",
                     flags={"lr": lr, "backbone-lr-scale": bb}, **{"from": f"auto-{m}-e10"})
                for data, prefix in (("mnist5k-rot-inv", "inv-"), ("mnist5k-rot", ""))
                for m in ("swiftformer_xs", "efficientvit_m0")
                for lr, bb in ((7.07e-4, 1.0), (7.07e-4, 0.1), (1.77e-4, 1.0), (1.77e-4, 0.1))] + \
            [dict(data="mnist5k-rot", model=m, epochs=10, name=f"ftlr-scratch-{m}", flags={})
             for m in ("swiftformer_xs", "efficientvit_m0")] + \
            [dict(data="mnist5k-rot", model=m, epochs=10, name=f"ftlr-{m}-lr0.00141-bb1",
                  flags={"lr": 1.41e-3, "backbone-lr-scale": 1.0}, **{"from": f"auto-{m}-e10"})
             for m in ("swiftformer_xs", "efficientvit_m0")] + \
            [dict(data="mnist5k-rot-inv", model="efficientvit_m0", epochs=10, name="inv-ftlr-scratch-efficientvit_m0",
                  flags={})]
    if stage == "finetune":  # the second set from scratch and from the MNIST-5k run of the same family
        runs = []
        for m in ("swiftformer_xs", "efficientvit_m0", "efficientformerv2_s0"):
            for e in (10, 30):
                runs.append(dict(data="mnist5k-rot", model=m, epochs=e, name=f"rot-scratch-{m}-e{e}", flags={}))
                runs.append(dict(data="mnist5k-rot", model=m, epochs=e, name=f"rot-finetune-{m}-e{e}", flags={},
                                 **{"from": f"auto-{m}-e10"}))
        return runs
    if stage == "check":  # scikit-learn's digits, never used to choose anything
        return [dict(data="digits", model=m, epochs=10, name=f"digits-{m}", flags={})
                for m in ("swiftformer_xs", "efficientvit_m0", "efficientformerv2_s0")]
    raise SystemExit(f"unknown stage {stage!r}")


def _data(root: Path, name: str) -> Path:
    path = root / name
    if not (path / "train").is_dir():
        if name == "digits":
            _write_digits(path)
        elif name == "mnist5k-rot-inv":  # the first second set tried: rotated and inverted
            from edgevits.train.mnist import write_mnist5k_rot
            write_mnist5k_rot(path, invert=True)
        elif name == "mnist-3x30":
            _write_subset(_data(root, "mnist5k"), path, classes=("0", "1", "2"), n_train=30)
        else:
            subprocess.run([*EDGEVITS, "data", name, str(path)], check=True)
    return path


def _write_subset(source: Path, path: Path, classes: tuple[str, ...], n_train: int) -> None:
    """The first ``n_train`` training images of ``classes`` from ``source`` and all their validation images."""
    for split in ("train", "val"):
        for c in classes:
            files = sorted((source / split / c).iterdir())
            (path / split / c).mkdir(parents=True, exist_ok=True)
            for f in files[:n_train] if split == "train" else files:
                shutil.copy(f, path / split / c / f.name)


def _write_digits(path: Path) -> None:
    """scikit-learn's 1,797 8x8 digits as a 4:1 ImageFolder (PNG, upscaled x4 to 32x32, nearest)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits
    d = load_digits()
    rng = np.random.default_rng(0)
    for i in rng.permutation(len(d.target)):
        split = "val" if rng.random() < 0.2 else "train"
        folder = path / split / str(d.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8), mode="L").resize((32, 32), Image.NEAREST)
        img.save(folder / f"{i:04d}.png")


def _run(spec: dict, runs: Path, data_root: Path) -> dict:
    out = runs / spec["name"]
    if out.exists():  # what an earlier, failed or interrupted, attempt left
        shutil.rmtree(out)
    cmd = [*EDGEVITS, "train", "--data", str(_data(data_root, spec["data"])), "--model", spec["model"],
           "--img-size", "32", "--epochs", str(spec["epochs"]), "--threads", "1", "--workers", "0",
           "--no-progress", "--output", str(out)]
    if spec.get("from"):
        cmd += ["--checkpoint", str(runs / spec["from"] / "best.safetensors")]
    for key, value in spec["flags"].items():
        cmd += [f"--{key}", str(value)]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.time() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] \
        if (out / "metrics.jsonl").is_file() else []
    derived = json.loads((out / "config.json").read_text()).get("derived", {}) if (out / "config.json").is_file() \
        else {}
    return dict(spec, seconds=round(seconds, 1), returncode=proc.returncode,
                best_top1=max((r["val_top1"] for r in rows), default=None),
                final_top1=rows[-1]["val_top1"] if rows else None, derived=derived,
                log_tail=proc.stdout.splitlines()[:3] + proc.stderr.splitlines()[-3:])


def _table(results: list[dict]) -> None:
    """The results as a Markdown table (the one in docs/training.md): flags, best and final val top-1, seconds;
    "base" stands for the ``QUICK`` flags."""
    print("| run | data | model | epochs | flags | best top-1 | final top-1 | s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        on_quick = QUICK.keys() <= r["flags"].keys()  # the lr and aug stages: say what differs from the base
        changed = {k: v for k, v in r["flags"].items() if not on_quick or QUICK.get(k) != v}
        flags = ("base " if on_quick else "") + " ".join(f"--{k} {v}" for k, v in changed.items())
        flags = flags.strip() or "(none)"
        if r.get("from"):
            flags += f" --checkpoint {r['from']}"
        best = "fail" if r["best_top1"] is None else f"{100 * r['best_top1']:.1f}"
        final = "-" if r["final_top1"] is None else f"{100 * r['final_top1']:.1f}"
        print(f"| {r['name']} | {r['data']} | {r['model']} | {r['epochs']} | {flags} | {best} | {final} | "
              f"{r['seconds']:.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", action="append", default=[],
                   help="lr, aug, bn, defaults, tiny, check, ftlr, finetune (repeatable)")
    p.add_argument("--jobs", type=int, default=2, help="runs side by side (one CPU thread each)")
    p.add_argument("--runs", default="/tmp/edgevits-search", help="folder for the runs' outputs")
    p.add_argument("--data-root", default="data", help="folder holding (or receiving) the data sets")
    p.add_argument("--out", default="bench_results/train_search.jsonl", help="results, one JSON line per run")
    p.add_argument("--table", action="store_true", help="print the results table and stop")
    args = p.parse_args()
    out = Path(args.out)
    done = [json.loads(line) for line in out.read_text().splitlines()] if out.is_file() else []
    if args.table:
        return _table(done)
    names = {r["name"] for r in done if r["returncode"] == 0}
    todo = [s for stage in args.stage for s in _runs(stage) if s["name"] not in names]
    runs, data_root = Path(args.runs), Path(args.data_root)
    for spec in todo:  # data sets first, one at a time
        _data(data_root, spec["data"])
    out.parent.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        for result in pool.map(lambda s: _run(s, runs, data_root), todo):
            with open(out, "a") as f:
                f.write(json.dumps(result) + "\n")
            print(f"{result['name']}: best {result['best_top1']} in {result['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
