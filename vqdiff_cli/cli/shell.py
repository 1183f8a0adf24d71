"""`vqdiff completion SHELL`: print a shell completion script (the same as the files in completions/)."""

from __future__ import annotations

from typing import Annotated

import typer

from ..errors import UsageError
from .app import app, report_errors
from .console import Output


@app.command()
@report_errors
def completion(
    shell: Annotated[str, typer.Argument(help="bash, zsh or fish.", show_default=False)],
) -> None:
    """Print the completion script for a shell (see the README for where to put it)."""
    from .completion import SHELLS, script

    if shell not in SHELLS:
        raise UsageError(f"unknown shell '{shell}'", hint=f"use one of: {', '.join(SHELLS)}")
    Output().result(script(shell).rstrip("\n"))
