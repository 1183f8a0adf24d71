"""Option types shared by several commands, defined once.

Settings that the config file and environment can provide default to None here ("not given on the command line");
`settings.resolve` fills them in, and the help texts quote the built-in defaults from `settings.SETTINGS`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import UsageError
from ..options import DEFAULT_MODEL, REVEALS, STRIDE_MODES, GenerateOptions


def _h(text: str, default: object) -> str:
    return f"{text} [default: {default}]"


ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help=_h("Local diffusers-format folder or Hub repo id (env VQDIFF_MODEL).", DEFAULT_MODEL),
        show_default=False,
    ),
]
RevisionOpt = Annotated[
    str | None,
    typer.Option("--revision", help="Hub branch, tag or commit hash (default: main).", show_default=False),
]
CachedRevisionOpt = Annotated[
    str | None,
    typer.Option(
        "--revision", help="Only copies of this branch, tag or commit (default: every one).", show_default=False
    ),
]
OfflineOpt = Annotated[
    bool,
    typer.Option("--offline", help="Use cached files only, never the network (as HF_HUB_OFFLINE=1 does)."),
]
CacheDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir",
        help="vqdiff's cache of converted models (env VQDIFF_CACHE_DIR). [default: the user cache folder]",
        show_default=False,
    ),
]
DeviceOpt = Annotated[
    str | None,
    typer.Option(
        "--device", help=_h("auto, cpu, cuda (or cuda:N) or mps (env VQDIFF_DEVICE).", "auto"), show_default=False
    ),
]
DtypeOpt = Annotated[
    str | None,
    typer.Option(
        "--dtype",
        help=_h("auto (float32 on CPU, float16 on GPU), float32, float16 or bfloat16 (env VQDIFF_DTYPE).", "auto"),
        show_default=False,
    ),
]
VariantOpt = Annotated[
    str | None,
    typer.Option(
        "--variant",
        help=_h("Weight files to read: auto (fp16 files in half precision), fp16 or fp32.", "auto"),
        show_default=False,
    ),
]
SeedOpt = Annotated[
    int | None,
    typer.Option(
        "--seed",
        "-s",
        help="Seed of the first image; image i uses seed + i. [default: random, reported]",
        show_default=False,
    ),
]
StepsOpt = Annotated[
    int | None,
    typer.Option(
        "--steps", help=_h("Timesteps to visit, spread evenly over the chain.", "all (T)"), show_default=False
    ),
]
StrideOpt = Annotated[
    int | None, typer.Option("--stride", help="Or: the gap between visited timesteps.", show_default=False)
]
GuidanceOpt = Annotated[
    float | None,
    typer.Option(
        "--guidance",
        "-g",
        help=_h("Classifier-free guidance scale; 1 turns it off.", GenerateOptions.guidance_scale),
        show_default=False,
    ),
]
TruncationOpt = Annotated[
    float | None,
    typer.Option(
        "--truncation",
        "-t",
        help=_h("Keep the most likely classes holding this much probability.", GenerateOptions.truncation_rate),
        show_default=False,
    ),
]
BatchSizeOpt = Annotated[
    int | None,
    typer.Option(
        "--batch-size",
        "-b",
        help=_h("Images per network call (lower it if memory runs out).", GenerateOptions.batch_size),
        show_default=False,
    ),
]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace existing output files.")]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress or messages on stderr; warnings and errors still print.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object per result on stdout.")]
DryRunOpt = Annotated[
    bool,
    typer.Option("--dry-run", help="Print the resolved settings and outputs, and where each came from; load nothing."),
]
NoMetadataOpt = Annotated[bool, typer.Option("--no-metadata", help="Do not embed generation settings in the PNGs.")]


class VisualsOpts:
    """Options that show the denoising process."""

    SaveTokens = Annotated[
        Path | None,
        typer.Option(
            "--save-tokens", help="Write the final token grids: int64 .npy of shape (N, H, W).", show_default=False
        ),
    ]
    Trajectory = Annotated[
        Path | None,
        typer.Option(
            "--trajectory",
            help="Write the grid before and after every step: .npy of shape "
            "(steps + 1, N, H, W); still-masked positions hold K-1.",
            show_default=False,
        ),
    ]
    Animate = Annotated[
        str | None,
        typer.Option(
            "--animate",
            help="Write an animated GIF of the denoising per image (masked tokens grey); a template like -o.",
            show_default=False,
        ),
    ]
    SaveSteps = Annotated[
        Path | None,
        typer.Option(
            "--save-steps", help="Write the decoded grid after every step as PNGs into this folder.", show_default=False
        ),
    ]


SamplerOpt = Annotated[
    str | None,
    typer.Option(
        "--sampler",
        help="auto (fast on CUDA), reference (diffusers' op order: bit-identical to diffusers on CPU float32) or "
        "fast (batched closed-form sampler: the same distribution, its own noise stream). [default: auto]",
        show_default=False,
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


class RevealOpts:
    """How masked tokens are revealed (Improved VQ-Diffusion's sampling), and how strides take their posterior."""

    Reveal = Annotated[
        str | None,
        typer.Option(
            "--reveal",
            help=f"{', '.join(REVEALS)}: sample every position from the posterior (VQ-Diffusion), or reveal a "
            "budget of masked positions per timestep, chosen uniformly or by purity, with tokens from the x_0 "
            f"prediction (Improved VQ-Diffusion). [default: {GenerateOptions.reveal}]",
            show_default=False,
        ),
    ]
    Purity = Annotated[bool, typer.Option("--purity", help="The purity prior: the same as --reveal purity.")]
    PurityWeight = Annotated[
        float | None,
        typer.Option(
            "--purity-weight",
            help=_h(
                "r of the purity prior: tokens from p ** (1 + r * purity); 0: unsharpened.",
                GenerateOptions.purity_weight,
            ),
            show_default=False,
        ),
    ]
    TokensPerCall = Annotated[
        int | None,
        typer.Option(
            "--tokens-per-call",
            help="With --reveal random or purity: reveal at most N tokens per network call, calling again at the same "
            "timestep until its budget is met (more calls, better images). [default: 0, no limit]",
            show_default=False,
        ),
    ]
    StrideMode = Annotated[
        str | None,
        typer.Option(
            "--stride-mode",
            help=f"{' or '.join(STRIDE_MODES)}: the exact multi-step posterior between visited timesteps, or the "
            "original code's one-step approximation (for comparison). [default: exact]",
            show_default=False,
        ),
    ]


def reveal_flag(reveal: str | None, purity: bool) -> str | None:
    """--reveal, with --purity as a short form of --reveal purity."""
    if purity and reveal not in (None, "purity"):
        raise UsageError(f"--purity is --reveal purity; it contradicts --reveal {reveal}")
    return "purity" if purity else reveal
