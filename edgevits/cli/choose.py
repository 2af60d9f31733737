"""``edgevits deploy``: which backend runs a model fastest on this machine, verified and measured."""
from __future__ import annotations

from .common import add_weights_arguments, csv_of, model_weights, positive_int, progress_steps, wide_console


def _cmd_deploy(args) -> int:
    from rich.table import Table

    from ..registry import create_model
    from ..runtime.choose import AUTO_CANDIDATES, deploy
    overrides = {"img_size": args.img_size} if args.img_size else {}
    model = create_model(args.model, **model_weights(args), **overrides).eval()
    console = wide_console()
    with progress_steps(console, f"deploy {args.model}") as on_step:
        chosen = deploy(model, img_size=args.img_size, batch_size=args.batch_size, threads=args.threads,
                        candidates=tuple(args.candidates or AUTO_CANDIDATES), repeats=args.repeats,
                        workdir=args.workdir, progress=on_step)
    h, w = chosen.img_size
    table = Table(title=f"{args.model}, {h}x{w}, batch {args.batch_size}")
    for col in ("backend", "median ms (interleaved)", "verdict"):
        table.add_column(col, justify="right" if col.startswith("median") else "left")
    for name, ms in sorted(chosen.timings_ms.items(), key=lambda kv: kv[1]):
        table.add_row(name, f"{ms:.2f}", "chosen" if name == chosen.backend else "")
    for name, why in chosen.rejected.items():
        table.add_row(name, "-", why)
    console.print(table)
    where = f"; its files: {chosen.workdir}" if chosen.workdir else ""
    console.print(f"edgevits.deploy(model) picks {chosen.backend} on this machine{where}", markup=False,
                  highlight=False)
    return 0


def add_deploy(sub) -> None:
    """``edgevits deploy MODEL ...``."""
    from ..runtime.backends import BACKENDS
    from ..runtime.choose import AUTO_CANDIDATES
    p = sub.add_parser("deploy", help="build every backend for a model, check it against PyTorch, time them "
                                      "interleaved and name the fastest (what edgevits.deploy() returns)")
    p.add_argument("model", help="a registered model name (edgevits models lists them)")
    add_weights_arguments(p, "weights to load (any supported format, or a run folder: its best.safetensors; "
                             "default: none, random weights)")
    p.add_argument("--img-size", type=positive_int, default=None,
                   help="input side in pixels (default: the model's, 224)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="batch size the backends are timed at")
    p.add_argument("--candidates", type=csv_of(str), default=None,
                   help=f"comma-separated from {','.join(BACKENDS)} (default: {','.join(AUTO_CANDIDATES)})")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="intra-op threads (default: each backend's default)")
    p.add_argument("--repeats", type=positive_int, default=10, help="timed rounds at most")
    p.add_argument("--workdir", default=None, help="folder for the exported graphs (default: a temporary one, of "
                                                   "which only the chosen backend's files are kept)")
    p.set_defaults(func=_cmd_deploy)
