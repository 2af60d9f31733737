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
        lat = f"{pub['latency_ms']} ms ({pub['latency_device']})" if "latency_ms" in pub else "-"
        table.add_row(name, entry.family, f"{count_params(model) / 1e6:.3f}", f"{count_macs(model) / 1e9:.3f}",
                      f"{pub.get('top1', '-')}", lat)
    console.print(table)
    return 0


def add_models(sub) -> None:
    p = sub.add_parser("models", help="list registered models with params, GMACs and published figures")
    p.add_argument("pattern", nargs="?", default=None, help="shell-style filter, e.g. 'swiftformer_*'")
    p.set_defaults(func=_cmd_models)


COMMANDS = [add_models]


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
