"""All terminal output of the CLI: messages and progress on stderr, results on stdout.

The rich console on stderr respects NO_COLOR and a non-terminal stderr (no escape codes in a pipe or a log file).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def _stderr_console() -> Console:
    return Console(stderr=True, highlight=False, no_color=bool(os.environ.get("NO_COLOR")) or None, soft_wrap=True)


class Output:
    """Human messages (stderr), machine results (stdout), progress; `quiet` silences everything but errors."""

    def __init__(self, quiet: bool = False, json_mode: bool = False) -> None:
        self.quiet = quiet
        self.json_mode = json_mode
        self.err = _stderr_console()

    def error(self, message: str, hint: str | None = None) -> None:
        """One line: what went wrong, and what to do about it."""
        self.err.print(f"[bold red]error:[/] {escape(message)}" + (f"; {escape(hint)}" if hint else ""))

    def warn(self, message: str) -> None:
        self.err.print(f"[yellow]warning:[/] {escape(message)}")

    def info(self, message: str) -> None:
        if not self.quiet:
            self.err.print(escape(message))

    def result(self, text: str) -> None:
        """A line of results on stdout (plain text, no markup)."""
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    def record(self, obj: dict[str, Any]) -> None:
        """One JSON object per line on stdout."""
        self.result(json.dumps(obj, ensure_ascii=False))

    @contextmanager
    def progress(self, total: int, description: str) -> Iterator[StepProgress]:
        if self.quiet:
            yield StepProgress(None, None)
            return
        bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.err,
            transient=False,
            disable=not self.err.is_terminal,
        )
        with bar:
            task = bar.add_task(description, total=total, detail="", rate="")
            yield StepProgress(bar, task)


class StepProgress:
    """Advances a progress bar; a no-op when progress is off."""

    def __init__(self, bar: Progress | None, task: TaskID | None) -> None:
        self.bar = bar
        self.task = task

    def set_total(self, total: int) -> None:
        if self.bar is not None and self.task is not None and self.bar.tasks[0].total != total:
            self.bar.update(self.task, total=total)

    def update(self, advance: int = 1, detail: str = "") -> None:
        if self.bar is None or self.task is None:
            return
        self.bar.update(self.task, advance=advance, detail=detail)
        speed = self.bar.tasks[0].speed
        self.bar.update(self.task, rate=f"{speed:.2f} it/s" if speed else "")
