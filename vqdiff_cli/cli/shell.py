"""`vqdiff completion SHELL`: print a shell completion script (the same as the files in completions/)."""

from __future__ import annotations

from typing import Annotated

import typer

from ..console import Output
from ..errors import UsageError, excerpt
from .app import app, report_errors


@app.command()
@report_errors
def completion(
    shell: Annotated[str, typer.Argument(help="bash, zsh or fish.", show_default=False)],
) -> None:
    """Print the completion script for a shell (see the README for where to put it)."""
    from ..completion import SHELLS, script

    if shell not in SHELLS:
        raise UsageError(f"unknown shell '{excerpt(shell)}'", hint=f"use one of: {', '.join(SHELLS)}")
    Output().result(script(shell).rstrip("\n"))
