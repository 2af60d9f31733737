"""Command line: ``edgevits <command>``. Thin: parses arguments, calls the library, prints.

One module per command; each has ``add_<command>(subparsers)``, which declares its arguments and sets ``func``.
Errors from bad input (every ``edgevits.errors`` type, and the ``ValueError``/``OSError``/... the library or its
dependencies raise for it) end here in one line, ``edgevits <command>: error: ...``, exit code 2; ``--debug`` (or
``EDGEVITS_DEBUG=1``) shows the traceback instead.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings

from ..errors import EdgevitsError, EdgevitsWarning
from .analyze import add_analyze
from .bench import add_bench
from .choose import add_deploy
from .export import add_export
from .models import add_models
from .predict import add_predict
from .train import add_data, add_eval, add_train

COMMANDS = [add_models, add_bench, add_deploy, add_export, add_analyze, add_train, add_eval, add_data, add_predict]

# What a user can fix: reported in one line. Anything else is a bug in edgevits and keeps its traceback.
USER_ERRORS = (EdgevitsError, ValueError, KeyError, OSError, ImportError, FloatingPointError)


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default (unless it names it already, or there is none: ``None``, off
    flags) and a required option says so."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required and action.option_strings:
            text += " (required)"
        default = action.default
        unset = default is None or default is False or default is argparse.SUPPRESS
        if unset or "default" in text.lower() or not action.option_strings:
            return text
        shown = ",".join(map(str, default)) if isinstance(default, (tuple, list)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})".lstrip()


def build_parser() -> argparse.ArgumentParser:
    from ..version import __version__
    parser = argparse.ArgumentParser(prog="edgevits", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"edgevits {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    _finish(parser)
    return parser


def _finish(parser: argparse.ArgumentParser) -> None:
    """The same rules on every parser: no abbreviated long options, defaults in the help, and ``--debug``, so that
    it may stand anywhere on the command line."""
    parser.allow_abbrev = False
    parser.formatter_class = HelpFormatter
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the Python traceback of an error instead of one line")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _finish(child)


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line (multi-line messages joined with "; ")."""
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return "; ".join(line.strip() for line in text.splitlines() if line.strip()) or type(e).__name__


@contextlib.contextmanager
def _warnings_as_lines(command: str):
    """edgevits' own warnings (``EdgevitsWarning``) as ``edgevits <cmd>: warning: ...`` lines on stderr."""
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, EdgevitsWarning):
                print(f"edgevits {command}: warning: {one_line(message)}", file=sys.stderr)
            else:
                shown(message, category, filename, lineno, file, line)
        warnings.showwarning = show
        yield


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _warnings_as_lines(args.command):
            return args.func(args) or 0
    except USER_ERRORS as e:
        if getattr(args, "debug", False) or os.environ.get("EDGEVITS_DEBUG"):
            raise
        hint = "" if isinstance(e, EdgevitsError) else " (--debug shows where it came from)"
        print(f"edgevits {args.command}: error: {one_line(e)}{hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
