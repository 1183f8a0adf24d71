"""`vqdiff generate`: text to images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..console import Output
from .app import app, report_errors
from .common import load_model
from .options import (
    DEFAULT_MODEL,
    CompileOpt,
    CudaGraphsOpt,
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    OverwriteOpt,
    QuietOpt,
    SamplerOpt,
    ThreadsOpt,
    VariantOpt,
)


def numbered_paths(output: Path, count: int) -> list[Path]:
    """`out.png` for one image; `out-0.png`, `out-1.png`, ... for several."""
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(count)]


@app.command()
@report_errors
def generate(
    prompts: Annotated[list[str], typer.Argument(help="One or more prompts.", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output PNG; several images get -0, -1, ...")] = Path(
        "out.png"
    ),
    model: ModelOpt = DEFAULT_MODEL,
    steps: Annotated[
        int | None,
        typer.Option("--steps", help="Timesteps to visit, spread over the chain (default: all T).", show_default=False),
    ] = None,
    stride: Annotated[
        int | None, typer.Option("--stride", help="Or: gap between visited timesteps.", show_default=False)
    ] = None,
    guidance: Annotated[float, typer.Option("--guidance", "-g", help="Classifier-free guidance scale; 1 = off.")] = 5.0,
    truncation: Annotated[float, typer.Option("--truncation", "-t", help="Truncation rate in (0, 1].")] = 1.0,
    seed: Annotated[
        int | None,
        typer.Option(
            "--seed", "-s", help="Seed of the first image; image i uses seed + i (default: random).", show_default=False
        ),
    ] = None,
    num_images: Annotated[int, typer.Option("--num-images", "-n", help="Images per prompt.")] = 1,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per network call.")] = 1,
    sampler: SamplerOpt = "auto",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    variant: VariantOpt = "auto",
    compile: CompileOpt = None,
    cuda_graphs: CudaGraphsOpt = None,
    threads: ThreadsOpt = None,
    save_tokens: Annotated[
        Path | None,
        typer.Option("--save-tokens", help="Write the final token grids, (N, H, W) int64 .npy.", show_default=False),
    ] = None,
    trajectory: Annotated[
        Path | None,
        typer.Option(
            "--trajectory",
            help="Write the grid before and after every step, (steps+1, N, H, W) .npy; masked = K-1.",
            show_default=False,
        ),
    ] = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Generate images from text prompts."""
    import torch

    from ..api import GenerateOptions
    from ..files import check_writable
    from ..images import save_png
    from ..images import save_tokens as write_tokens

    out = Output(quiet=quiet)
    options = GenerateOptions(
        steps=steps,
        stride=stride,
        guidance_scale=guidance,
        truncation_rate=truncation,
        seed=seed,
        num_images=num_images,
        batch_size=batch_size,
        sampler=sampler,
    )
    paths = numbered_paths(output, len(prompts) * num_images)
    for path in [*paths, *(p for p in (save_tokens, trajectory) if p is not None)]:
        check_writable(path, overwrite)

    pipe = load_model(
        out,
        model,
        device=device,
        dtype=dtype,
        variant=variant,
        compile=compile,
        cuda_graphs=cuda_graphs,
        threads=threads,
    )
    total_steps = len(options.timesteps(pipe.num_train_timesteps))
    results = []
    with out.progress(total_steps * len(paths), "generating") as bar:
        for result in pipe.generate_iter(
            prompts,
            options,
            trajectory=trajectory is not None,
            on_step=lambda e: bar.update(e.batch_size, f"image {e.images_done + 1}/{e.total_images}"),
        ):
            path = paths[result.index]
            save_png(result.image, path, overwrite=overwrite)
            out.result(str(path))
            results.append(result)
    if save_tokens is not None:
        write_tokens(torch.stack([r.tokens for r in results]).numpy(), save_tokens, overwrite=overwrite)
    if trajectory is not None:
        grids = torch.stack([r.trajectory for r in results if r.trajectory is not None], dim=1)
        write_tokens(grids.numpy(), trajectory, overwrite=overwrite)
    for note in pipe.acceleration_notes:
        out.warn(note)
    out.info(f"seed {results[0].seed}" + (f"..{results[-1].seed}" if len(results) > 1 else ""))
