"""`vqdiff inpaint` (regenerate a masked region) and `vqdiff vary` (variations of an image)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..options import DEFAULT_STRENGTH, GenerateOptions, InpaintOptions, Job
from . import naming
from .calls import Start
from .console import Output
from .options import (
    BatchSizeOpt,
    CacheDirOpt,
    CompileOpt,
    CudaGraphsOpt,
    DeviceOpt,
    DryRunOpt,
    DtypeOpt,
    GuidanceOpt,
    JsonOpt,
    ModelOpt,
    NoMetadataOpt,
    OfflineOpt,
    OverwriteOpt,
    QuietOpt,
    RevealOpts,
    RevisionOpt,
    SamplerOpt,
    SeedOpt,
    StepsOpt,
    StrideOpt,
    ThreadsOpt,
    TruncationOpt,
    VariantOpt,
    VisualsOpts,
    reveal_flag,
)
from .rounds import execute
from .run import RunPlan, RunRequest
from .settings import SettingFlags

if TYPE_CHECKING:
    from ..config import PipelineConfig
    from ..diffusion.schedule import MaskAndReplaceSchedule
    from ..pipeline.pipeline import GeneratedImage, VQDiffusion

ImageArg = Annotated[
    Path, typer.Argument(help="The image to edit (any size; worked on at the model's size).", show_default=False)
]
PromptOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--prompt", "-p", help="Prompt (repeat for several); default: none (unconditional).", show_default=False
    ),
]
NumImagesOpt = Annotated[int, typer.Option("--num-images", "-n", help="Images per prompt.")]
OutputOpt = Annotated[
    str | None,
    typer.Option(
        "--output",
        "-o",
        help="File name template with {prompt}, {seed}, {index}, {step}; a plain name gets "
        "-0, -1, ... for several images. [default: <image>-<command>-{seed}.png]",
        show_default=False,
    ),
]


def inpaint(
    image: ImageArg,
    mask: Annotated[
        Path, typer.Option("--mask", "-M", help="Mask image: white (or opaque) = regenerate.", show_default=False)
    ],
    prompt: PromptOpt = None,
    mask_mode: Annotated[
        str,
        typer.Option(
            "--mask-mode",
            help="Regenerate a token when any / at least half / all of its pixel patch is painted: any, half or all.",
        ),
    ] = InpaintOptions.mask_mode,
    grow: Annotated[
        int, typer.Option("--grow", help="Dilate the token mask by this many tokens.")
    ] = InpaintOptions.grow,
    start_step: Annotated[
        int | None,
        typer.Option(
            "--start-step",
            help="Timestep to start from. [default: the t whose cumulative mask rate matches the masked fraction]",
            show_default=False,
        ),
    ] = None,
    known: Annotated[
        str,
        typer.Option(
            "--known",
            help="Known tokens after every step: restore (put back) or "
            "renoise (re-noised to the current level, RePaint-style).",
        ),
    ] = InpaintOptions.known,
    feather: Annotated[
        int, typer.Option("--feather", help="Pixels over which the composite fades out beyond the mask.")
    ] = InpaintOptions.feather,
    no_composite: Annotated[
        bool,
        typer.Option(
            "--no-composite",
            help="Return the plain decode instead of pasting the result into the original through the mask.",
        ),
    ] = False,
    save_token_mask: Annotated[
        Path | None,
        typer.Option(
            "--save-token-mask", help="Write the token mask as a PNG (white = regenerated).", show_default=False
        ),
    ] = None,
    num_images: NumImagesOpt = GenerateOptions.num_images,
    seed: SeedOpt = None,
    steps: StepsOpt = None,
    stride: StrideOpt = None,
    guidance: GuidanceOpt = None,
    truncation: TruncationOpt = None,
    batch_size: BatchSizeOpt = None,
    sampler: SamplerOpt = None,
    reveal: RevealOpts.Reveal = None,
    purity: RevealOpts.Purity = False,
    purity_weight: RevealOpts.PurityWeight = None,
    tokens_per_call: RevealOpts.TokensPerCall = None,
    stride_mode: RevealOpts.StrideMode = None,
    output: OutputOpt = None,
    model: ModelOpt = None,
    revision: RevisionOpt = None,
    offline: OfflineOpt = False,
    cache_dir: CacheDirOpt = None,
    variant: VariantOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    compile: CompileOpt = None,
    cuda_graphs: CudaGraphsOpt = None,
    threads: ThreadsOpt = None,
    save_tokens: VisualsOpts.SaveTokens = None,
    trajectory: VisualsOpts.Trajectory = None,
    animate: VisualsOpts.Animate = None,
    save_steps: VisualsOpts.SaveSteps = None,
    no_metadata: NoMetadataOpt = False,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    dry_run: DryRunOpt = False,
) -> None:
    """Regenerate the masked part of an image and keep the rest."""
    from ..images import load_rgb, save_png
    from ..masks import fit_mask, load_mask, mask_image, regenerate_mask

    out = Output(quiet=quiet, json_mode=json_out)
    inpaint_options = InpaintOptions(
        mask_mode=mask_mode, grow=grow, start_step=start_step, known=known, feather=feather, composite=not no_composite
    )
    # 1. inputs, read and checked before anything loads
    picture = load_rgb(image)
    fitted = fit_mask(load_mask(mask), picture.size, f"the mask {mask}")  # checked once, before the model loads
    # 2. settings and outputs
    plan = RunPlan.build(
        out,
        mode="inpaint",
        prompts=list(prompt or [""]),
        flags=SettingFlags(
            model=model,
            revision=revision,
            variant=variant,
            device=device,
            dtype=dtype,
            cache_dir=cache_dir,
            output=output,
            steps=steps,
            stride=stride,
            guidance=guidance,
            truncation=truncation,
            batch_size=batch_size,
            sampler=sampler,
            reveal=reveal_flag(reveal, purity),
            purity_weight=purity_weight,
            tokens_per_call=tokens_per_call,
            stride_mode=stride_mode,
        ),
        request=RunRequest(
            num_images=num_images,
            seed=seed,
            overwrite=overwrite,
            metadata=not no_metadata,
            offline=offline,
            save_tokens=save_tokens,
            trajectory=trajectory,
            animate=animate,
            save_steps=save_steps,
            compile=compile,
            cuda_graphs=cuda_graphs,
            threads=threads,
        ),
        default_output=f"{naming.literal(image.stem)}-inpaint-{{seed}}.png",
        extra_files=(save_token_mask,) if save_token_mask else (),
    )

    plan.extra_metadata = {
        "source_image": str(image),
        "mask": str(mask),
        "mask_mode": mask_mode,
        "grow": grow,
        "known": known,
        "feather": feather,
        "composite": not no_composite,
    }

    def call_basis(config: PipelineConfig, schedule: MaskAndReplaceSchedule) -> Start:
        import torch

        from ..pipeline.editing import inpaint_start_step

        grid = (config.transformer.sample_size, config.transformer.sample_size)
        regenerate = torch.from_numpy(regenerate_mask(fitted, grid, inpaint_options))
        return Start(inpaint_start_step(regenerate, inpaint_options, schedule), int(regenerate.sum()))

    plan.call_basis = call_basis
    if dry_run:
        plan.print_dry_run(out)
        return

    # 3. load, reduce the mask to tokens, pick the start step, sample
    def sample(pipe: VQDiffusion, jobs: list[Job], options: GenerateOptions, **kw: Any) -> Iterator[GeneratedImage]:
        setup = pipe.prepare_inpaint(picture, fitted, inpaint_options)
        for warning in setup.warnings:
            out.warn(warning)
        out.info(
            f"regenerating {int(setup.regenerate.sum())} of {setup.regenerate.numel()} tokens "
            f"({setup.masked_fraction:.0%}) from timestep {setup.start_step}"
        )
        plan.extra_metadata["start_step"] = setup.start_step
        if save_token_mask is not None:
            grid = setup.regenerate.numpy()
            save_png(mask_image(grid, pipe.config.vqvae.downsample_factor), save_token_mask, overwrite=overwrite)
        return pipe.inpaint_iter(setup, jobs, options, inpaint_options, **kw)

    execute(out, plan, sample)


def vary(
    image: ImageArg,
    strength: Annotated[
        float,
        typer.Option("--strength", help="How far to noise the image's tokens: 0 keeps them, 1 is plain generation."),
    ] = DEFAULT_STRENGTH,
    prompt: PromptOpt = None,
    num_images: NumImagesOpt = GenerateOptions.num_images,
    seed: SeedOpt = None,
    steps: StepsOpt = None,
    stride: StrideOpt = None,
    guidance: GuidanceOpt = None,
    truncation: TruncationOpt = None,
    batch_size: BatchSizeOpt = None,
    sampler: SamplerOpt = None,
    reveal: RevealOpts.Reveal = None,
    purity: RevealOpts.Purity = False,
    purity_weight: RevealOpts.PurityWeight = None,
    tokens_per_call: RevealOpts.TokensPerCall = None,
    stride_mode: RevealOpts.StrideMode = None,
    output: OutputOpt = None,
    model: ModelOpt = None,
    revision: RevisionOpt = None,
    offline: OfflineOpt = False,
    cache_dir: CacheDirOpt = None,
    variant: VariantOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    compile: CompileOpt = None,
    cuda_graphs: CudaGraphsOpt = None,
    threads: ThreadsOpt = None,
    save_tokens: VisualsOpts.SaveTokens = None,
    trajectory: VisualsOpts.Trajectory = None,
    animate: VisualsOpts.Animate = None,
    save_steps: VisualsOpts.SaveSteps = None,
    no_metadata: NoMetadataOpt = False,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    dry_run: DryRunOpt = False,
) -> None:
    """Make variations of an image (noise its tokens, then denoise)."""
    from ..images import load_rgb
    from ..options import check_strength

    out = Output(quiet=quiet, json_mode=json_out)
    check_strength(strength)  # before the model loads
    picture = load_rgb(image)
    plan = RunPlan.build(
        out,
        mode="vary",
        prompts=list(prompt or [""]),
        flags=SettingFlags(
            model=model,
            revision=revision,
            variant=variant,
            device=device,
            dtype=dtype,
            cache_dir=cache_dir,
            output=output,
            steps=steps,
            stride=stride,
            guidance=guidance,
            truncation=truncation,
            batch_size=batch_size,
            sampler=sampler,
            reveal=reveal_flag(reveal, purity),
            purity_weight=purity_weight,
            tokens_per_call=tokens_per_call,
            stride_mode=stride_mode,
        ),
        request=RunRequest(
            num_images=num_images,
            seed=seed,
            overwrite=overwrite,
            metadata=not no_metadata,
            offline=offline,
            save_tokens=save_tokens,
            trajectory=trajectory,
            animate=animate,
            save_steps=save_steps,
            compile=compile,
            cuda_graphs=cuda_graphs,
            threads=threads,
        ),
        default_output=f"{naming.literal(image.stem)}-vary-{{seed}}.png",
    )

    plan.extra_metadata = {"source_image": str(image), "strength": strength}

    def call_basis(config: PipelineConfig, schedule: MaskAndReplaceSchedule) -> Start | None:
        from ..pipeline.editing import variation_start

        t0 = variation_start(strength, config.num_train_timesteps)
        if t0 is None:
            return None
        tokens = config.transformer.num_latent_pixels
        return Start(t0, round(tokens * float(schedule.cumprod_ct[t0])), expected=t0 < config.num_train_timesteps - 1)

    plan.call_basis = call_basis
    if dry_run:
        plan.print_dry_run(out)
        return

    def sample(pipe: VQDiffusion, jobs: list[Job], options: GenerateOptions, **kw: Any) -> Iterator[GeneratedImage]:
        source = pipe.prepare_edit(picture)
        for warning in source.warnings:
            out.warn(warning)
        plan.extra_metadata["start_step"] = pipe.variation_start(strength)
        return pipe.vary_iter(source, jobs, strength, options, **kw)

    execute(out, plan, sample)
