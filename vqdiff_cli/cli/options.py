"""Option types shared by several commands, defined once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

DEFAULT_MODEL = "microsoft/vq-diffusion-ithq"

ModelOpt = Annotated[
    str,
    typer.Option("--model", "-m", help="Local diffusers-format folder or Hub repo id.", envvar="VQDIFF_MODEL"),
]
DeviceOpt = Annotated[
    str,
    typer.Option("--device", help="auto, cpu, cuda (or cuda:N) or mps.", envvar="VQDIFF_DEVICE"),
]
DtypeOpt = Annotated[
    str, typer.Option("--dtype", help="auto (float32 on CPU, float16 on GPU), float32, float16, bfloat16.")
]
VariantOpt = Annotated[
    str,
    typer.Option("--variant", help="Weight files to read: auto (fp16 files for half precision), fp16 or fp32."),
]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace existing output files.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or messages on stderr.")]
OutputOpt = Annotated[Path, typer.Option("--output", "-o", help="Output file.")]
SamplerOpt = Annotated[
    str,
    typer.Option(
        "--sampler",
        help="auto (fast on CUDA), reference (diffusers' op order: bit-identical to diffusers on CPU float32) or "
        "fast (batched closed-form sampler: the same distribution, its own noise stream).",
    ),
]
CompileOpt = Annotated[
    bool | None,
    typer.Option(
        "--compile/--no-compile",
        help="torch.compile one transformer block and the fast sampler's step math (default: off; compiling takes "
        "up to a minute per process); falls back to plain execution.",
        show_default=False,
    ),
]
CudaGraphsOpt = Annotated[
    bool | None,
    typer.Option(
        "--cuda-graphs/--no-cuda-graphs",
        help="Replay the fast sampler's step from a CUDA graph (default: on for CUDA).",
        show_default=False,
    ),
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads", help="CPU threads (default: OMP_NUM_THREADS, else the CPUs available).", show_default=False
    ),
]
