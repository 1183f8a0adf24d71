"""The `vqdiff` command line: a thin Typer layer over the Python API."""

from .app import app, main

__all__ = ["app", "main"]
