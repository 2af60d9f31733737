"""The training augmentation in albumentations (what edgevits uses) and in kornia, images/s on this CPU.

The same pipeline in both: random resized crop, horizontal flip, RandAugment (n=2, m=9; kornia's own, and
edgevits' albumentations version), colour jitter, normalisation, random erasing 0.25. albumentations works per
image on numpy arrays (in the data loader's processes); kornia on a batch tensor after a per-image crop. One thread,
batches of 64 random images, median of the rounds. Needs kornia (pip install kornia), not an edgevits dependency.

    python benchmarks/augment_speed.py
"""
from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from PIL import Image

from edgevits.measure.bench import cpu_name
from edgevits.train.augment import RandAugment, TrainTransform, item_seed

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def kornia_pipeline():
    import kornia.augmentation as K
    from kornia.augmentation.auto import RandAugment as KRandAugment
    return torch.nn.Sequential(K.RandomHorizontalFlip(), KRandAugment(n=2, m=9), K.ColorJiggle(0.4, 0.4, 0.4, p=1.0),
                               K.Normalize(torch.tensor(MEAN), torch.tensor(STD)), K.RandomErasing(p=0.25))


def measure(size: int, source: int, rounds: int = 5, batch: int = 64) -> tuple[float, float]:
    import kornia.augmentation as K
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((source, source, 3)) * 255).astype(np.uint8)) for _ in range(batch)]
    ours = TrainTransform(size, randaugment=RandAugment.parse("rand-m9-mstd0.5-inc1"), color_jitter=0.4, reprob=0.25)
    crop, kornia = K.RandomResizedCrop((size, size), scale=(0.08, 1.0)), kornia_pipeline()
    t_alb, t_kor = [], []
    for r in range(rounds):
        t0 = time.perf_counter()
        torch.stack([ours(img, item_seed(0, r, i)) for i, img in enumerate(images)])
        t_alb.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with torch.no_grad():
            x = torch.cat([crop(torch.from_numpy(np.asarray(img)).permute(2, 0, 1).float().div(255)[None])
                           for img in images])
            kornia(x)
        t_kor.append(time.perf_counter() - t0)
    return batch / statistics.median(t_alb), batch / statistics.median(t_kor)


def main() -> None:
    torch.set_num_threads(1)
    print(f"{cpu_name()}, one thread, torch {torch.__version__}")
    for size, source in ((32, 28), (224, 256)):
        alb, kor = measure(size, source)
        print(f"{size} px (from {source} px): albumentations {alb:.0f} img/s, kornia {kor:.0f} img/s "
              f"({alb / kor:.1f}x)")


if __name__ == "__main__":
    main()
