"""`vqdiff bench`: speed, per phase and end to end, optionally side by side with diffusers on the same weights."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ..bench.report import BenchSettings
from ..errors import UsageError, excerpt
from ..options import DEFAULT_ARCHITECTURE
from .console import Output
from .options import CompileOpt, CudaGraphsOpt, DeviceOpt, OverwriteOpt, QuietOpt, ThreadsOpt

if TYPE_CHECKING:
    from rich.table import Table

    from ..bench.report import BenchReport, EndToEnd


GuidanceOpt = Annotated[float, typer.Option("--guidance", "-g", help="Classifier-free guidance scale.")]
TruncationOpt = Annotated[float, typer.Option("--truncation", "-t", help="Truncation rate in (0, 1].")]
RepeatsOpt = Annotated[int, typer.Option("--repeats", help="Timed runs per figure (the median is reported).")]


def _ints(flag: str, text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated integers, got '{excerpt(text)}'") from None
    if not values:
        raise UsageError(f"{flag} needs at least one value")
    return values


def _listed(values: tuple[int, ...]) -> str:
    return ",".join(str(v) for v in values)


def _words(text: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in (text or "").split(",") if v.strip())


def _command_line() -> str | None:
    """The command as typed, when this process is the vqdiff CLI (not a test runner)."""
    if Path(sys.argv[0]).name in ("vqdiff", "__main__.py"):
        return shlex.join(["vqdiff", *sys.argv[1:]])
    return None


def bench(
    model: Annotated[
        Path | None,
        typer.Option(
            "--model", "-m", help="Checkpoint folder (default: random weights, built in memory).", show_default=False
        ),
    ] = None,
    config: Annotated[
        str, typer.Option("--config", help="Architecture of the random weights: a shipped name or a config folder.")
    ] = DEFAULT_ARCHITECTURE,
    device: DeviceOpt = None,
    dtype: Annotated[
        str | None,
        typer.Option(
            "--dtype",
            help="Comma-separated dtypes (default: float32, plus bfloat16 if native, on CPU; float16,bfloat16 on GPU).",
        ),
    ] = None,
    steps: Annotated[str, typer.Option("--steps", help="Comma-separated step counts.")] = _listed(BenchSettings.steps),
    batch: Annotated[str, typer.Option("--batch", help="Comma-separated batch sizes.")] = _listed(
        BenchSettings.batches
    ),
    sampler: Annotated[
        str | None,
        typer.Option("--sampler", help="Comma-separated: reference, fast (default: fast on CUDA, both on CPU)."),
    ] = None,
    repeats: RepeatsOpt = BenchSettings.repeats,
    warmup: Annotated[
        int,
        typer.Option(
            "--warmup", help="Untimed runs before the timed ones (end to end: 2-step runs, once per batch size)."
        ),
    ] = BenchSettings.warmup,
    phases_only: Annotated[
        bool, typer.Option("--phases-only", help="Only the phases; end-to-end figures are derived from them.")
    ] = False,
    vs_diffusers: Annotated[
        bool, typer.Option("--vs-diffusers", help="Also run diffusers' VQDiffusionPipeline on the same weights.")
    ] = False,
    diffusers_dtype: Annotated[
        str | None,
        typer.Option("--diffusers-dtype", help="Comma-separated dtypes for diffusers (default: those of --dtype)."),
    ] = None,
    guidance: GuidanceOpt = BenchSettings.guidance_scale,
    truncation: TruncationOpt = BenchSettings.truncation_rate,
    max_run_seconds: Annotated[
        float,
        typer.Option("--max-run-seconds", help="Skip end-to-end runs estimated to take longer (derived instead)."),
    ] = BenchSettings.max_run_seconds,
    peak_tflops: Annotated[
        float | None,
        typer.Option("--peak-tflops", help="The device's dense peak, TFLOP/s (default: a table of GPUs)."),
    ] = None,
    compile: CompileOpt = None,
    cuda_graphs: CudaGraphsOpt = None,
    threads: ThreadsOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the results as one JSON document on stdout.")] = False,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Also write the JSON document to this file.")
    ] = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Measure speed: per phase and end to end, seconds per image and images per second."""
    from ..bench.run import run_bench
    from ..device import configure_cpu_threads
    from ..files import atomic_write, check_writable
    from ..pipeline.fastpath import Acceleration
    from .common import model_settings
    from .settings import SettingFlags

    out = Output(quiet=quiet, json_mode=json_out)
    settings = BenchSettings(
        steps=_ints("--steps", steps),
        batches=_ints("--batch", batch),
        dtypes=_words(dtype),
        diffusers_dtypes=_words(diffusers_dtype),
        samplers=_words(sampler),
        repeats=repeats,
        warmup=warmup,
        phases_only=phases_only,
        vs_diffusers=vs_diffusers,
        guidance_scale=guidance,
        truncation_rate=truncation,
        max_run_seconds=max_run_seconds,
        peak_tflops=peak_tflops,
    )
    if not 0 < truncation <= 1:
        raise UsageError(f"--truncation must be in (0, 1], got {truncation}")
    if model is not None and not model.is_dir():
        raise UsageError(f"--model {excerpt(model)} is not a checkpoint folder")
    if output is not None:
        check_writable(output, overwrite)  # before minutes of measuring, not after
    configure_cpu_threads(threads)
    command = _command_line()
    replace = overwrite

    def save(report: BenchReport) -> str:
        """The report as JSON, also written to --output (again after each batch size: a killed run keeps those)."""
        nonlocal replace
        report.command = command
        document = json.dumps(report.to_json(), indent=2)
        if output is not None:
            atomic_write(output, lambda f: f.write(document.encode() + b"\n"), overwrite=replace)
            replace = True  # our own partial results from here on
        return document

    report = run_bench(
        settings,
        model=model,
        architecture=config,
        device=model_settings(SettingFlags(device=device))["device"],  # flag > VQDIFF_DEVICE > config file > auto
        acceleration=Acceleration(compile, cuda_graphs),
        on_progress=out.info,
        on_update=save,
    )
    document = save(report)
    if json_out:
        out.result(document)
    else:
        render(report)
    for note in report.notes:
        out.warn(note)


def _seconds(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _figures(e: EndToEnd) -> list[str]:
    """s/image, images/s and peak MiB of an end-to-end row."""
    return [_seconds(e.s_per_image), f"{e.images_per_s:.3g}", _mib(e.peak_memory_bytes)]


def _kind(e: EndToEnd) -> str:
    """measured, derived (from the eager phases) or derived from the replayed steps."""
    return "derived from steps" if e.derived_from == "step" else e.kind


def _mib(value: int | None) -> str:
    return "" if value is None else f"{value / 2**20:,.0f}"


def render(report: BenchReport) -> None:
    """The report as three tables on stdout."""
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)
    dev = report.device
    peak = f", peak {dev['peak_tflops']:.0f} TFLOP/s ({dev['peak_source']})" if dev["peak_tflops"] else ""
    threads = f", {dev['threads']} threads" if dev["threads"] else ""
    rates = ", ".join(f"{k} {v:.3g}" for k, v in dev.get("matmul_tflops", {}).items())
    shape = "x".join(str(v) for v in dev.get("matmul_shape") or ())
    matmul = f"; measured TFLOP/s of its {shape} feed-forward matmul: {rates}" if rates else ""
    console.print(f"device: {dev['name']}{threads}{peak}{matmul}")
    versions = ", ".join(f"{k} {v}" for k, v in report.versions.items() if v)
    console.print(f"model: {report.model.get('source')}; {versions}")

    phase_rows = [
        [
            p.engine,
            p.dtype,
            str(p.batch),
            p.phase if p.cuda_graph is None else f"{p.phase} ({'CUDA graph' if p.cuda_graph else 'eager'})",
            "" if p.timestep is None else str(p.timestep),
            _seconds(p.median_s),
            _seconds(p.per_image_s),
            "" if p.tflops is None else f"{p.tflops:.2f}",
            "" if p.peak_fraction is None else f"{100 * p.peak_fraction:.0f}%",
            "" if p.matmul_fraction is None else f"{100 * p.matmul_fraction:.0f}%",
        ]
        for p in report.phases
    ]
    columns: tuple[str, ...] = ("engine", "dtype", "batch", "phase", "t", "seconds", "s/image", "TFLOP/s", "% peak")
    columns += ("% matmul",)
    console.print(_table("phases (median of the timed runs)", columns, phase_rows))  # peak memory is in --json

    e2e_rows = [[e.engine, e.dtype, str(e.batch), str(e.steps), _kind(e), *_figures(e)] for e in report.end_to_end]
    columns = ("engine", "dtype", "batch", "steps", "kind", "s/image", "images/s", "peak MiB")
    console.print(_table("end to end (prompts to decoded images, one batch)", columns, e2e_rows))

    default_dtype = "float32" if dev["type"] == "cpu" else "float16"  # diffusers' usual dtype there
    shown = [s for s in report.speedups if s.baseline_dtype in (s.dtype, default_dtype)]  # all pairs are in --json
    if shown:
        rows = [
            [s.engine, s.dtype, s.baseline_dtype, str(s.batch), str(s.steps), s.kind, f"{s.ratio:.2f}x"] for s in shown
        ]
        columns = ("engine", "dtype", "vs diffusers", "batch", "steps", "kind", "speed-up")
        console.print(_table("speed-up over diffusers (its seconds / ours, same batch and steps)", columns, rows))


_TEXT_COLUMNS = ("engine", "dtype", "phase", "kind", "vs diffusers")  # left-aligned; figures are right-aligned


def _table(title: str, columns: tuple[str, ...], rows: list[list[str]]) -> Table:
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="left" if col in _TEXT_COLUMNS else "right")
    for row in rows:
        table.add_row(*row)
    return table
