"""The one timer: runners called round-robin, so that machine noise hits all of them alike."""
from __future__ import annotations

import time
from typing import Callable

import torch


def describe_error(e: BaseException) -> str:
    """One line naming an exception for a report: ``"TypeError: <first line of its message, 200 chars at most>"``."""
    lines = str(e).splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines and lines[0] else type(e).__name__


def sync(device: str) -> None:
    """Wait for the queued work on ``device`` to finish (CUDA); nothing to wait for on the CPU."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def time_interleaved(runners: dict[str, Callable], x: torch.Tensor, warmup: int, repeats: int,
                     min_repeats: int, budget_s: float, device: str = "cpu", settle: bool = True,
                     counts: dict[str, int] | None = None) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Seconds per call for each runner, measured round-robin (the order rotates every round): up to ``repeats``
    rounds, fewer once ``budget_s`` seconds of rounds are spent (never fewer than ``min_repeats``); with ``counts``,
    a runner leaves the rotation once it has ``counts[name]`` timings.

    With ``settle`` each timed call is preceded by one untimed call of the same runner: backends keep their own
    thread pools (PyTorch's OpenMP, ONNX Runtime's, OpenVINO's, the compiled kernels' OpenMP), and the first call
    after another pool has run pays for waking its threads while the other pool's threads still spin.

    A runner that raises (in warm-up or timing) is dropped from the rotation and the others carry on. Returns
    ``(times, errors)``: ``times[name]`` for the runners that never failed, ``errors[name]`` (``describe_error``)
    for those that did."""
    names = list(runners)
    errors: dict[str, str] = {}

    def call(name: str) -> float | None:
        """Seconds for one call of ``name``; None (and ``name`` dropped) if it raised."""
        try:
            t0 = time.perf_counter()
            runners[name](x)
            sync(device)
            return time.perf_counter() - t0
        except Exception as e:  # one runner failing must not end the measurement of the others
            errors[name] = describe_error(e)
            names.remove(name)
            return None

    for name in list(names):
        for _ in range(warmup):
            if call(name) is None:
                break
    times: dict[str, list[float]] = {n: [] for n in names}
    start = time.perf_counter()
    for r in range(repeats):
        live = [n for n in names if counts is None or len(times[n]) < counts[n]]
        if not live or r >= min_repeats and time.perf_counter() - start > budget_s:
            break
        for name in live[r % len(live):] + live[:r % len(live)]:
            if not settle or call(name) is not None:
                dt = call(name)
                if dt is not None:
                    times[name].append(dt)
    return {n: t for n, t in times.items() if n not in errors}, errors
