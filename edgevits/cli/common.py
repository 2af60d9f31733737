"""Pieces every command shares."""
from __future__ import annotations

import contextlib


def csv_of(kind):
    """An argparse type for comma-separated values of ``kind``: ``"1,16"`` -> ``(1, 16)``."""
    def parse(text: str):
        return tuple(kind(v) for v in text.split(",") if v.strip())
    parse.__name__ = f"comma-separated {kind.__name__}"  # argparse names it in its error: "invalid ... value"
    return parse


@contextlib.contextmanager
def progress_steps(console, description: str):
    """A transient progress bar on ``console``; yields ``on_step(done, total, label)`` for the library to call."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task(description, total=1)

        def on_step(done: int, total: int, label: str) -> None:
            progress.update(task, total=total, completed=done, description=label)
        yield on_step


def wide_console(width: int = 120):
    """A rich console at least ``width`` columns wide (tables stay readable when piped)."""
    from rich.console import Console
    return Console(width=max(Console().width, width))
