"""Command line: ``edgevits <command>``. Thin: parses arguments, calls the library, prints.

One module per command; each has ``add_<command>(subparsers)``, which declares its arguments and sets ``func``.
Errors from bad input (every ``edgevits.errors`` type, and the ``ValueError``/``OSError``/... the library or its
dependencies raise for it) end here in one line, ``edgevits <command>: error: ...``, exit code 2; ``--debug`` (or
``EDGEVITS_DEBUG=1``) shows the traceback instead.
"""
from __future__ import annotations

import argparse
import os
import sys

from ..errors import EdgevitsError
from .analyze import add_analyze
from .bench import add_bench
from .export import add_export
from .models import add_models
from .train import add_data, add_eval, add_train

COMMANDS = [add_models, add_bench, add_export, add_analyze, add_train, add_eval, add_data]

# What a user can fix: reported in one line. Anything else is a bug in edgevits and keeps its traceback.
USER_ERRORS = (EdgevitsError, ValueError, KeyError, OSError, ImportError, FloatingPointError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgevits", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    _add_debug(parser)
    return parser


def _add_debug(parser: argparse.ArgumentParser) -> None:
    """``--debug`` on every parser, so that it may stand anywhere on the command line."""
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the Python traceback of an error instead of one line")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _add_debug(child)


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line (multi-line messages joined with "; ")."""
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return "; ".join(line.strip() for line in text.splitlines() if line.strip()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except USER_ERRORS as e:
        if getattr(args, "debug", False) or os.environ.get("EDGEVITS_DEBUG"):
            raise
        hint = "" if isinstance(e, EdgevitsError) else " (--debug shows where it came from)"
        print(f"edgevits {args.command}: error: {one_line(e)}{hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
