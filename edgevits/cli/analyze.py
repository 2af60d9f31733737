"""``edgevits analyze attention|swap``: the attention zoo's cost against the number of tokens, and SwiftFormer with
each attention swapped in."""
from __future__ import annotations

import json
import os

from ..layers.attention import REGISTRY
from ..measure.analyze import DEFAULT_TOKENS, METRICS, analyze_attention, analyze_swaps
from ..measure.plots import plot_attention
from ..checkpoint.io import writable_file, writable_folder
from .common import count, csv_of, positive_float, positive_int, progress_steps, wide_console


def _fmt(metric: str, v) -> str:
    if v is None:
        return "-"
    if metric == "flops":
        return f"{v / 1e6:.1f}"
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def _cmd_attention(args) -> int:
    from rich.table import Table

    tokens = list(args.tokens or DEFAULT_TOKENS)
    writable_folder(args.out, "--out")  # before minutes of measuring
    if args.json:
        writable_file(args.json, "--json")
    console = wide_console()
    with progress_steps(console, "measuring") as on_step:
        result = analyze_attention(args.dim, tokens, args.attentions, fit_from=args.fit_from,
                                   threads=args.threads or None, max_call_s=args.max_call_s,
                                   max_mem_mib=args.max_mem_mib, reuse_memory=not args.no_reuse_memory,
                                   on_step=on_step)
    units = {"flops": "MFLOPs", "latency_ms": "latency (ms)", "peak_mib": "peak memory (MiB)"}
    for metric in METRICS:
        table = Table(title=f"{units[metric]} against tokens N (C={result.dim}, batch 1)")
        table.add_column("attention")
        for n in result.tokens:
            table.add_column(str(n), justify="right")
        table.add_column(f"exponent (N>={result.fit_from})", justify="right")
        if metric == "latency_ms":
            table.add_column("exp. of fastest", justify="right")
        for name, series in result.values(metric).items():
            ks = [result.exponents[name][m] for m in ((metric, "latency_min_ms") if metric == "latency_ms"
                                                      else (metric,))]
            table.add_row(name, *[_fmt(metric, series[n]) for n in result.tokens],
                          *["-" if k is None else f"{k:.2f}" for k in ks])
        console.print(table)
    for kind, c in result.crossover.items():
        where = {"crossed": f"from about N = {c['tokens']}", "below_range": f"already at N = {c['tokens']}",
                 "not_reached": "not within the measured range", "not_measured": "not measured"}[c["status"]]
        console.print(f"additive attention cheaper than MHSA in {kind}: {where}")
    for note in result.notes:
        console.print(f"note: {note}", markup=False, highlight=False)  # error messages may hold [...]
    env = result.environment
    console.print(f"{env['date_utc']}, torch {env['torch']}, {env['threads']} thread(s), load average "
                  f"{env['loadavg_start']} -> {env['loadavg_end']}")
    os.makedirs(args.out, exist_ok=True)
    json_path = result.save_json(args.json or os.path.join(args.out, "attention.json"))
    png_path = plot_attention(result, os.path.join(args.out, "attention.png"))
    console.print(f"wrote {json_path} and {png_path}")
    return 0


def _cmd_swap(args) -> int:
    from rich.table import Table

    if args.json:
        writable_file(args.json, "--json")
    console = wide_console(100)
    with progress_steps(console, "building") as on_step:
        result = analyze_swaps(args.model, args.attentions, args.img_size, threads=args.threads or None,
                               on_step=on_step)
    env = result["environment"]
    table = Table(title=f"{result['model']} with each attention, {result['img_size']}x{result['img_size']}, "
                        f"batch 1, deploy form, {env['threads']} thread(s)")
    for col in ("attention", "params (M)", "GMACs", "latency (ms)", "IQR (ms)"):
        table.add_column(col, justify="left" if col == "attention" else "right")
    for r in result["records"]:
        timed = r["latency_ms"] is not None
        table.add_row(r["attention"], f"{r['params_m']:.3f}", f"{r['gmacs']:.3f}",
                      f"{r['latency_ms']:.1f}" if timed else "failed", f"{r['latency_iqr_ms']:.1f}" if timed else "-")
    console.print(table)
    for r in result["records"]:
        if r.get("error"):
            console.print(f"failed: {result['model']} with {r['attention']}: {r['error']}", markup=False,
                          highlight=False)
    console.print(f"{env['date_utc']}, torch {env['torch']}, load average {env['loadavg_start']} -> "
                  f"{env['loadavg_end']}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        console.print(f"wrote {args.json}")
    return 0


def add_analyze(sub) -> None:
    """``edgevits analyze attention ...``."""
    p = sub.add_parser("analyze", help="analyses: `analyze attention` measures the attention zoo against N, "
                                       "`analyze swap` SwiftFormer with each attention")
    asub = p.add_subparsers(dest="analysis", required=True)
    a = asub.add_parser("attention", help="FLOPs, latency and peak memory of each attention as tokens grow")
    a.add_argument("--dim", type=positive_int, default=64, help="token width C (default 64)")
    a.add_argument("--tokens", type=csv_of(positive_int), default=None,
                   help=f"comma-separated token counts (default {','.join(map(str, DEFAULT_TOKENS))})")
    a.add_argument("--attentions", type=csv_of(str), default=None,
                   help=f"comma-separated subset of {','.join(REGISTRY)} (default: all)")
    a.add_argument("--fit-from", type=positive_int, default=None,
                   help="fit exponents over N >= this (default: geometric mean of the smallest and largest N)")
    a.add_argument("--threads", type=count, default=1,
                   help="torch threads while timing (default 1; 0 keeps torch's default)")
    a.add_argument("--max-call-s", type=positive_float, default=1.0,
                   help="skip timing where one call is predicted to take longer (default 1.0)")
    a.add_argument("--max-mem-mib", type=positive_float, default=1024.0,
                   help="skip timing where the peak memory is predicted to exceed this (default 1024)")
    a.add_argument("--no-reuse-memory", action="store_true",
                   help="let glibc return freed memory to the kernel between calls (page faults then count in "
                        "the latency)")
    a.add_argument("--json", default=None, help="JSON output path (default OUT/attention.json)")
    a.add_argument("--out", default="analysis", help="output folder for the PNG plot (and JSON) (default analysis)")
    a.set_defaults(func=_cmd_attention)
    w = asub.add_parser("swap", help="SwiftFormer with each attention swapped in: params, GMACs, latency")
    w.add_argument("--model", default="swiftformer_xs", help="a SwiftFormer variant (default swiftformer_xs)")
    w.add_argument("--img-size", type=positive_int, default=224, help="input side in pixels")
    w.add_argument("--attentions", type=csv_of(str), default=None,
                   help=f"comma-separated subset of {','.join(REGISTRY)} (default: all)")
    w.add_argument("--threads", type=count, default=1, help="torch threads while timing (default 1; 0: torch's)")
    w.add_argument("--json", default=None, help="also write the records to this JSON file (default: none)")
    w.set_defaults(func=_cmd_swap)
