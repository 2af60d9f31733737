"""``edgevits models``: the registered variants with their sizes and published figures."""
from __future__ import annotations

import torch

from .common import wide_console


def _cmd_models(args) -> int:
    from rich.table import Table

    from ..measure.flops import count_macs, count_params
    from ..errors import UnknownModelError
    from ..registry import create_model, get_entry, list_models
    table = Table(title="edgevits models (params with the distillation head; GMACs at 224x224)")
    console = wide_console()
    for col in ("model", "family", "params (M)", "GMACs", "top-1 (paper)", "latency (paper)"):
        table.add_column(col, justify="left" if col in ("model", "family", "latency (paper)") else "right")
    names = list_models(args.pattern)
    if not names:
        raise UnknownModelError(f"no model matches {args.pattern!r}; known models: {', '.join(list_models())}")
    for name in names:
        entry = get_entry(name)
        with torch.device("meta"):  # shapes only: counting needs no weights
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
