"""All terminal output of the CLI: messages and progress on stderr, results on stdout.

The rich console on stderr respects NO_COLOR and a non-terminal stderr (no escape codes in a pipe or a log file).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

if TYPE_CHECKING:
    from ..checkpoint.resolve import LoadEvent


def _stderr_console() -> Console:
    return Console(stderr=True, highlight=False, no_color=bool(os.environ.get("NO_COLOR")) or None, soft_wrap=True)


class Output:
    """Human messages (stderr), machine results (stdout), progress; `quiet` silences all but warnings and errors."""

    def __init__(self, quiet: bool = False, json_mode: bool = False, muted: bool = False) -> None:
        self.quiet = quiet or muted
        self.json_mode = json_mode
        self.muted = muted  # another process of the run speaks for it: nothing at all is printed here
        self.err = _stderr_console()

    def error(self, message: str, hint: str | None = None) -> None:
        """One line: what went wrong, and what to do about it."""
        if self.muted:
            return
        self.err.print(f"[bold red]error:[/] {escape(message)}" + (f"; {escape(hint)}" if hint else ""))

    def warn(self, message: str) -> None:
        if self.muted:
            return
        self.err.print(f"[yellow]warning:[/] {escape(message)}")

    def info(self, message: str) -> None:
        if not self.quiet:
            self.err.print(escape(message))

    def result(self, text: str) -> None:
        """A line of results on stdout (plain text, no markup)."""
        if self.muted:
            return
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


class LoadReporter:
    """Turns the library's model-loading events into a download bar (on a terminal) and one-line messages."""

    def __init__(self, out: Output) -> None:
        self.out = out
        self.bar: Progress | None = None
        self.task: TaskID | None = None
        self.file = ""

    def __enter__(self) -> LoadReporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._close()

    def __call__(self, event: LoadEvent) -> None:
        if event.kind != "download":
            self._close()
            self.out.info(event.message)
            return
        if self.out.quiet:
            return
        if event.message != self.file:
            self.file = event.message
            if not self.out.err.is_terminal:
                self.out.info(f"downloading {event.message}")
        if self.bar is None:
            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.out.err,
                disable=not self.out.err.is_terminal,
            )
            self.bar.start()
            self.task = self.bar.add_task("downloading", total=None)
        assert self.task is not None
        name = event.message.rsplit("/", 2)
        self.bar.update(self.task, completed=event.done, total=event.total or None, description="/".join(name[-2:]))

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
            self.task = None
