"""Command line: ``edgevits <command>``. Thin: parses arguments, calls the library, prints.

Each command is a pair of functions: ``add_<command>(subparsers)`` declares its arguments and sets ``func``.
"""
from __future__ import annotations

import argparse
import sys


def _cmd_models(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from . import count_macs, count_params, create_model, get_entry, list_models
    table = Table(title="edgevits models (params with the distillation head; GMACs at 224x224)")
    console = Console(width=max(Console().width, 120))
    for col in ("model", "family", "params (M)", "GMACs", "top-1 (paper)", "latency (paper)"):
        table.add_column(col, justify="left" if col in ("model", "family", "latency (paper)") else "right")
    names = list_models(args.pattern)
    if not names:
        print(f"no model matches {args.pattern!r}", file=sys.stderr)
        return 1
    for name in names:
        entry = get_entry(name)
        model = create_model(name)
        pub = entry.published
        if "latency_ms" in pub:
            lat = f"{pub['latency_ms']} ms ({pub['latency_device']})"
        elif "throughput" in pub:
            lat = f"{pub['throughput']} img/s ({pub['latency_device'].split(' (')[0]} throughput)"
        else:
            lat = "-"
        table.add_row(name, entry.family, f"{count_params(model) / 1e6:.3f}", f"{count_macs(model) / 1e9:.3f}",
                      f"{pub.get('top1', '-')}", lat)
    console.print(table)
    return 0


def add_models(sub) -> None:
    p = sub.add_parser("models", help="list registered models with params, GMACs and published figures")
    p.add_argument("pattern", nargs="?", default=None, help="shell-style filter, e.g. 'swiftformer_*'")
    p.set_defaults(func=_cmd_models)


def _csv(kind):
    def parse(text: str):
        return tuple(kind(v) for v in text.split(",") if v.strip())
    return parse


def _cmd_bench(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from .bench import BenchSpec, check_spec, run_bench, summary, write_outputs
    from .registry import list_models
    spec = BenchSpec(models=list(args.models), img_size=args.img_size, batch_sizes=args.batch_sizes,
                     backends=args.backends, threads=args.threads, device=args.device, dtype=args.dtype,
                     warmup=args.warmup, repeats=args.repeats, budget_s=args.budget, compare=args.compare,
                     tune_malloc=args.tune_malloc)
    try:
        check_spec(spec)
    except (KeyError, ValueError, ImportError) as e:
        print(f"edgevits bench: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    console = Console(width=max(Console().width, 140))
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
            parts.append(f"our best path vs timm's best (eager/compile/onnxruntime) "
                         f"{s['best_timm_over_best_ours_geomean']:.2f}x;")
            parts.append(f"vs timm's best on any backend measured {s['best_any_timm_over_best_ours_geomean']:.2f}x")
            console.print(" ".join(parts))
    paths = write_outputs(result, args.out)
    console.print(f"table: {paths['csv']}  json: {paths['json']}  plot: {paths['png']}")
    return 0


def add_bench(sub) -> None:
    from .backends import BACKENDS
    p = sub.add_parser("bench", help="measure params, GMACs, latency and throughput on this machine")
    p.add_argument("models", nargs="*", help="model names (default: every registered model)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-sizes", type=_csv(int), default=(1, 16), help="comma-separated, e.g. 1,16")
    p.add_argument("--backends", type=_csv(str), default=("eager", "onnxruntime"),
                   help=f"comma-separated from {','.join(BACKENDS)} (eager_cl: channels-last eager)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's default)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20, help="timed rounds at most (at least 5)")
    p.add_argument("--budget", type=float, default=3.0, help="seconds of timed rounds per model and batch size")
    p.add_argument("--compare", choices=["timm"], default=None,
                   help="also time timm's implementation with the same weights, interleaved")
    p.add_argument("--tune-malloc", action=argparse.BooleanOptionalAction, default=True,
                   help="keep freed activation memory in the process (glibc), for every model measured alike: "
                        "removes thousands of page faults per forward pass (edgevits.allocator)")
    p.add_argument("--out", default="bench_out", help="output folder for bench.json, bench.csv, the PNG plot")
    p.set_defaults(func=_cmd_bench)


def _cmd_export(args) -> int:
    from .export import GRAPH_FORMS, ExportError, export
    from .registry import create_model
    overrides = {"img_size": args.img_size} if args.img_size else {}
    model = create_model(args.model, checkpoint=args.checkpoint, **overrides)
    out = args.output or f"{args.model}.{'onnx' if args.format == 'onnx' else 'xml'}"
    try:
        path = export(model, out, format=args.format, form=args.form, img_size=args.img_size)
    except ExportError as e:
        print(f"export failed: {e}", file=sys.stderr)
        return 1
    form = args.form or GRAPH_FORMS[args.format]
    print(f"wrote {path} ({form} form, dynamic batch, checked against PyTorch at batch 1 and 3)")
    return 0


def add_export(sub) -> None:
    p = sub.add_parser("export", help="export to ONNX or OpenVINO, checked against PyTorch")
    p.add_argument("model")
    p.add_argument("--format", choices=["onnx", "openvino"], default="onnx")
    p.add_argument("--form", choices=["deploy", "eval"], default=None,
                   help="graph to export: the deploy form (fuse_model) or the eval-mode model; default: the one "
                        "the runtime runs fastest (ONNX: deploy, OpenVINO: eval, which it optimises itself)")
    p.add_argument("--checkpoint", default=None, help="weights to load (any supported format)")
    p.add_argument("--img-size", type=int, default=None, help="input size baked into the graph (default 224)")
    p.add_argument("--output", "-o", default=None, help="output file (default: MODEL.onnx / MODEL.xml)")
    p.set_defaults(func=_cmd_export)


from .analyze import add_analyze  # noqa: E402

from .train.cli import add_data, add_eval, add_train  # noqa: E402

COMMANDS = [add_models, add_bench, add_export, add_analyze, add_train, add_eval, add_data]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgevits", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    raise SystemExit(main())
