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
RevisionOpt = Annotated[
    str | None,
    typer.Option("--revision", help="Hub branch, tag or commit hash (default: main).", show_default=False),
]
OfflineOpt = Annotated[
    bool,
    typer.Option("--offline", help="Use cached files only, never the network (as HF_HUB_OFFLINE=1 does)."),
]
CacheDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir",
        help="vqdiff's cache of converted models (default: the user cache folder).",
        envvar="VQDIFF_CACHE_DIR",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]
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
