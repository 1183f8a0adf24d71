"""The Typer app, its global options, and the one error boundary that maps failures to messages and exit codes.

Exit codes: 0 ok, 1 runtime failure, 2 usage error (bad values, unreadable inputs), 130 Ctrl-C.
Heavy modules (torch, the API) are imported inside command bodies so that `--help` and `--version` stay fast.
The commands are plain functions in their modules; this module wraps each in the error boundary and registers it.
"""

from __future__ import annotations

import functools
import gc
import importlib
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from typing import Annotated, Any, TypeVar

import typer
import typer.core

from ..errors import ExitStatus, RankError, explain
from ..version import __version__
from . import bench, completion, dataset, edit, evaluate, generate, info, models, tokens, train
from .console import Output

# Typer 0.29 carries its own copy of click; earlier versions use click itself
_click: Any = getattr(typer.core, "_click", None) or importlib.import_module("click")


class _OneLineUsageErrors(typer.core.TyperGroup):
    """Usage errors (an unknown option, a value of the wrong type, a missing argument) as one `error:` line with a
    hint, like every other error, instead of click's usage block."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        run = functools.partial(super().main, args, prog_name, complete_var, False, windows_expand_args, **extra)
        if not standalone_mode:
            return run()
        try:
            status = run()
        except _click.exceptions.UsageError as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # `vqdiff` alone: the help, as asked for
                e.show()
                sys.exit(e.exit_code)
            command = e.ctx.command_path if e.ctx is not None else "vqdiff"
            Output().error(e.format_message().rstrip("."), f"see {command} --help")
            sys.exit(e.exit_code)
        except _click.exceptions.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except _click.exceptions.Abort:
            Output().error("aborted")
            sys.exit(int(ExitStatus.FAILURE))
        sys.exit(status if isinstance(status, int) else 0)


app = typer.Typer(
    name="vqdiff",
    cls=_OneLineUsageErrors,
    help="VQ-Diffusion text-to-image generation, inpainting and token tools.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

F = TypeVar("F", bound=Callable[..., Any])
_DEBUG: ContextVar[bool] = ContextVar("vqdiff_debug", default=False)  # set by the app callback per invocation


def _debug_enabled() -> bool:
    return _DEBUG.get() or os.environ.get("VQDIFF_DEBUG", "").lower() not in ("", "0", "false", "no")


def report_errors(func: F) -> F:
    """Wrap a command body: VqdiffError -> one-line message and its exit code; Ctrl-C -> 130; OOM -> a hint."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        out = Output()
        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            out.error("interrupted; finished outputs were kept")
            raise typer.Exit(int(ExitStatus.INTERRUPTED)) from None
        except Exception as e:
            if _debug_enabled():
                traceback.print_exc()
            error = explain(e)
            if not isinstance(error, RankError) or error.reported:  # another process of the run reports it
                out.error(error.message, error.hint)
            raise typer.Exit(int(error.exit_code)) from None

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"vqdiff {__version__}\n")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", "-V", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors (or set VQDIFF_DEBUG=1).")] = False,
) -> None:
    """VQ-Diffusion text-to-image generation, inpainting and token tools."""
    _DEBUG.set(debug)


def _command(group: typer.Typer, func: Callable[..., Any], name: str | None = None) -> None:
    group.command(name)(report_errors(func))


def _register() -> None:
    """Every command, in the order `vqdiff --help` lists them (commands first, then the groups)."""
    commands: tuple[Callable[..., None], ...] = (
        generate.generate,
        edit.inpaint,
        edit.vary,
        tokens.encode,
        tokens.decode,
        models.download,
        bench.bench,
        evaluate.evaluate,
        info.info,
        completion.completion,
    )
    for func in commands:
        _command(app, func, "eval" if func is evaluate.evaluate else None)
    models_app = typer.Typer(
        name="models",
        help="List, locate and remove the models in vqdiff's cache.",
        no_args_is_help=True,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    _command(models_app, models.list_models, "list")
    _command(models_app, models.model_path, "path")
    _command(models_app, models.remove_model, "rm")
    app.add_typer(models_app)
    config_app = typer.Typer(help="Show where the configuration file is and what it sets.", no_args_is_help=True)
    _command(config_app, info.config_path_cmd, "path")
    _command(config_app, info.config_show, "show")
    app.add_typer(config_app, name="config")
    dataset_app = typer.Typer(help="Make synthetic training data.", no_args_is_help=True)
    _command(dataset_app, dataset.shapes, "shapes")
    _command(dataset_app, dataset.heldout, "heldout")
    app.add_typer(dataset_app, name="dataset")
    train_app = typer.Typer(help=train.HELP, no_args_is_help=True, rich_markup_mode=None)
    _command(train_app, train.vqvae, "vqvae")
    _command(train_app, train.transformer, "transformer")
    _command(train_app, train.bench, "bench")
    app.add_typer(train_app, name="train")


_register()


def main() -> None:
    try:
        app(prog_name="vqdiff")
    finally:
        # Everything is written by now. The interpreter's last garbage collection at exit would walk every object of
        # torch, transformers and the model (about a second) only to free what the OS frees anyway: frozen objects
        # are left out of it. Files are closed by their `with` blocks, and atexit handlers still run.
        gc.freeze()
