"""``edgevits bench``: measure the models on this machine and print the table."""
from __future__ import annotations

import argparse

from ..checkpoint.io import writable_folder
from .common import add_pretrained_argument, count, csv_of, positive_float, positive_int, wide_console


def _cmd_bench(args) -> int:
    from ..measure.bench import BenchSpec, check_spec, write_outputs
    spec = BenchSpec(models=list(args.models), img_size=args.img_size, batch_sizes=args.batch_sizes,
                     backends=args.backends, threads=args.threads, device=args.device, dtype=args.dtype,
                     warmup=args.warmup, repeats=args.repeats, budget_s=args.budget, compare=args.compare,
                     tune_malloc=args.tune_malloc, pretrained=args.pretrained or False)
    check_spec(spec)  # before any work: unknown names, missing timm...
    writable_folder(args.out, "--out")
    console = wide_console(140)
    result = _run_with_progress(spec, console)
    _print_result(result, spec, console)
    paths = write_outputs(result, args.out)
    console.print(f"table: {paths['csv']}  json: {paths['json']}  plot: {paths['png']}")
    return 0


def _run_with_progress(spec, console) -> dict:
    """``run_bench`` under a progress bar that advances once per model."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from ..measure.bench import run_bench
    from ..registry import list_models
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} models"),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("benchmark", total=len(spec.models or list_models()))
        seen: set[str] = set()

        def progress(msg: str) -> None:
            model = msg.split(":")[0]
            if model not in seen:
                if seen:
                    bar.advance(task)
                seen.add(model)
            bar.update(task, description=msg)
        result = run_bench(spec, progress)
        bar.advance(task)
    return result


def _print_result(result: dict, spec, console) -> None:
    """The table, the runners that were skipped or failed, and the geometric means against timm."""
    from rich.table import Table

    from ..measure.bench import TIMM_PATHS, summary
    m = result["machine"]
    peak = m["peak_gflops_measured"]
    title = (f"edgevits bench: {m['device']} {m['dtype']}, {m['threads']} threads, {spec.img_size}x{spec.img_size}"
             + (f", measured {m['dtype']} matmul peak {peak:.0f} GFLOP/s" if peak else ", matmul peak n/a")
             + (", malloc tuned" if m.get("malloc_tuned") else ""))
    table = Table(title=title)
    for col in ("model", "source", "backend", "batch", "median ms", "p10-p90 ms", "img/s", "GFLOP/s", "% peak",
                "timm/ours"):
        table.add_column(col, justify="left" if col in ("model", "source", "backend") else "right", no_wrap=True)
    for r in result["records"]:
        if "median_ms" not in r:
            table.add_row(r["model"], r["source"], r["backend"], str(r["batch"]), "-", r["status"], "", "", "", "")
            continue
        ratio = r.get("timm_over_ours")
        table.add_row(r["model"], r["source"], r["backend"], str(r["batch"]), f"{r['median_ms']:.2f}",
                      f"{r['p10_ms']:.2f}-{r['p90_ms']:.2f}", f"{r['img_per_s']:.1f}", f"{r['gflops_per_s']:.1f}",
                      f"{100 * r['peak_fraction']:.0f}%" if r.get("peak_fraction") else "n/a",
                      f"{ratio:.2f}x" if ratio else "")
    console.print(table)
    notes = {(r["status"], r["model"], r["source"], r["backend"], r["note"]) for r in result["records"]
             if r["status"] != "ok"}  # once per runner, not per batch size
    for status, model, source, backend, note in sorted(notes):
        console.print(f"{status}: {model} {source}/{backend}: {note}", markup=False, highlight=False)
    for batch, s in summary(result).items():
        if s["models"]:
            parts = [f"{batch}, timm/ours, geometric mean over {s['models']} models:"]
            if s["eager_timm_over_ours_geomean"]:
                parts.append(f"eager vs eager {s['eager_timm_over_ours_geomean']:.2f}x;")
            parts.append(f"our best path vs timm's best ({'/'.join(TIMM_PATHS)}) "
                         f"{s['best_timm_over_best_ours_geomean']:.2f}x;")
            parts.append(f"vs timm's best on any backend measured {s['best_any_timm_over_best_ours_geomean']:.2f}x")
            console.print(" ".join(parts))


def add_bench(sub) -> None:
    """``edgevits bench ...``."""
    from ..runtime.backends import BACKENDS
    p = sub.add_parser("bench", help="measure params, GMACs, latency and throughput on this machine")
    p.add_argument("models", nargs="*", help="model names (default: every registered model)")
    p.add_argument("--img-size", type=positive_int, default=224, help="input side in pixels (square images)")
    p.add_argument("--batch-sizes", type=csv_of(positive_int), default=(1, 16), help="comma-separated, e.g. 1,16")
    p.add_argument("--backends", type=csv_of(str), default=("eager", "onnxruntime"),
                   help=f"comma-separated from {','.join(BACKENDS)} (eager_cl: channels-last eager)")
    p.add_argument("--threads", type=positive_int, default=None, help="intra-op threads (default: torch's default)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the weights and inputs")
    p.add_argument("--warmup", type=count, default=3, help="untimed calls of each runner before timing")
    p.add_argument("--repeats", type=positive_int, default=20, help="timed rounds at most (at least 5)")
    p.add_argument("--budget", type=positive_float, default=3.0,
                   help="seconds of timed rounds per model and batch size")
    p.add_argument("--compare", choices=["timm"], default=None,
                   help="also time timm's implementation with the same weights, interleaved (default: ours only)")
    p.add_argument("--tune-malloc", action=argparse.BooleanOptionalAction, default=True,
                   help="keep freed activation memory in the process (glibc), for every model measured alike: "
                        "removes thousands of page faults per forward pass (edgevits.runtime.allocator)")
    p.add_argument("--out", default="bench_out", help="output folder for bench.json, bench.csv, the PNG plot")
    add_pretrained_argument(p)
    p.set_defaults(func=_cmd_bench)
