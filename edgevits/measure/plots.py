"""Plots of what the measurements return (PNG files). Drawn with matplotlib's object-oriented API (``Figure``,
``savefig``), which renders PNGs without pyplot and leaves the process-wide backend alone; no display needed."""
from __future__ import annotations

import os
from pathlib import Path


def plot_latency_vs_top1(records: list[dict], path: str | Path) -> None:
    """Published ImageNet top-1 against measured batch-1 latency of our fastest backend, one line per family
    (the papers' Figure 1, on this machine)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter
    batch = min(r["batch"] for r in records)
    best: dict[str, dict] = {}
    for r in records:
        if r["source"] != "edgevits" or r["batch"] != batch or "median_ms" not in r or r.get("top1") is None:
            continue
        if r["model"] not in best or r["median_ms"] < best[r["model"]]["median_ms"]:
            best[r["model"]] = r
    fig = Figure(figsize=(7.5, 5))
    ax = fig.subplots()
    for family in sorted({r["family"] for r in best.values()}):
        pts = sorted((r["median_ms"], r["top1"], r["model"]) for r in best.values() if r["family"] == family)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=family)
        for ms, top1, name in pts:
            ax.annotate(name.split("_", 1)[-1], (ms, top1), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 7, 8, 10 rather than 7x10^0
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.set_xlabel(f"latency, batch {batch}, fastest backend (ms, log scale)")
    ax.set_ylabel("ImageNet-1K top-1 (%, published)")
    ax.set_title("Accuracy vs latency measured on this machine")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_attention(result, path: str) -> str:
    """Write a log-log PNG: FLOPs, latency and peak memory against N, one line per attention (the legend gives
    the fitted exponent). Returns ``path``."""
    from matplotlib.figure import Figure

    titles = {"flops": "FLOPs (matrix products)", "latency_ms": "latency, batch 1, CPU (ms)",
              "peak_mib": "peak tensor memory (MiB)"}
    fig = Figure(figsize=(16, 4.8))
    axes = fig.subplots(1, 3)
    for ax, metric in zip(axes, ("flops", "latency_ms", "peak_mib")):
        for name, series in result.values(metric).items():
            pts = [(n, v) for n, v in sorted(series.items()) if v]
            if not pts:
                continue
            k = result.exponents.get(name, {}).get(metric)
            label = f"{name} (N^{k:.2f})" if k is not None else name
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=label)
        ax.axvline(result.fit_from, color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens N")
        ax.set_title(titles[metric])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    env = result.environment
    fig.suptitle(f"attention cost against tokens, C={result.dim} (exponents fitted for N >= {result.fit_from}; "
                 f"torch {env.get('torch')}, {env.get('threads')} thread(s))", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
