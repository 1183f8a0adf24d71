"""`vqdiff generate`: text to images, many images from one model load; spread over the processes that torchrun or
accelerate start (one per GPU), or over the jobs of a scheduler (--shard); resumable (--skip-existing)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..distributed import Group, Shard, World
from ..errors import ExitStatus, UsageError, excerpt
from ..options import GenerateOptions, random_seed
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
    RevisionOpt,
    SamplerOpt,
    SeedOpt,
    StepsOpt,
    StrideOpt,
    ThreadsOpt,
    TruncationOpt,
    VariantOpt,
    VisualsOpts,
)
from .rounds import execute
from .run import RunPlan, RunRequest, read_prompts_file
from .settings import SettingFlags


def generate(
    prompts: Annotated[
        list[str] | None, typer.Argument(help="Prompts (one image set each).", show_default=False)
    ] = None,
    prompts_file: Annotated[
        Path | None,
        typer.Option(
            "--prompts-file",
            "-f",
            help="One prompt per line ('-' reads stdin); blank lines and # comments are skipped.",
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            "-o",
            help="File name template with {prompt}, {seed}, {index}, {step}; a plain name "
            "gets -0, -1, ... for several images; '-' writes one PNG to stdout. [default: {prompt}-{seed}.png]",
            show_default=False,
        ),
    ] = None,
    num_images: Annotated[
        int, typer.Option("--num-images", "-n", help="Images per prompt.")
    ] = GenerateOptions.num_images,
    seed: SeedOpt = None,
    steps: StepsOpt = None,
    stride: StrideOpt = None,
    guidance: GuidanceOpt = None,
    truncation: TruncationOpt = None,
    batch_size: BatchSizeOpt = None,
    sampler: SamplerOpt = None,
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
    from_image: Annotated[
        Path | None,
        typer.Option(
            "--from-image",
            help="Re-run the settings stored in a PNG made by vqdiff; flags given here win.",
            show_default=False,
        ),
    ] = None,
    lora: Annotated[
        Path | None,
        typer.Option(
            "--lora",
            help="A LoRA adapter folder (vqdiff train transformer --lora) merged into the model.",
            show_default=False,
        ),
    ] = None,
    lora_scale: Annotated[
        float | None,
        typer.Option(
            "--lora-scale", help="Strength of --lora (0: none, 1: as trained). [default: 1]", show_default=False
        ),
    ] = None,
    save_tokens: VisualsOpts.SaveTokens = None,
    trajectory: VisualsOpts.Trajectory = None,
    animate: VisualsOpts.Animate = None,
    save_steps: VisualsOpts.SaveSteps = None,
    no_metadata: NoMetadataOpt = False,
    overwrite: OverwriteOpt = False,
    skip_existing: Annotated[
        bool,
        typer.Option(
            "--skip-existing",
            help="Keep the images that exist already, made by vqdiff with the same settings (a stopped run resumes); "
            "another file there is an error unless --overwrite.",
        ),
    ] = False,
    shard: Annotated[
        str | None,
        typer.Option(
            "--shard",
            help="Make only share K of N of the run (batch b when b mod N = K-1), e.g. one job of a SLURM array; "
            "the same names and seeds as the whole run. Needs --seed.",
            metavar="K/N",
            show_default=False,
        ),
    ] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    dry_run: DryRunOpt = False,
) -> None:
    """Generate images from text prompts."""
    from .. import metadata

    world = World.from_env()  # under torchrun: this process's rank; alone: rank 0 of 1
    out = Output(quiet=quiet, json_mode=json_out, muted=not world.speaks)
    share = Shard.parse(shard) if shard is not None else Shard()
    if lora_scale is not None and lora is None:
        raise UsageError("--lora-scale needs --lora ADAPTER")
    if share.count > 1 and seed is None and from_image is None:
        raise UsageError("--shard needs --seed", hint="every share must plan the same seeds: give them one --seed")
    try:
        with Group.join(world) as group:
            # 1. the run's inputs, read by rank 0 alone (stdin is read once) and the same in every process
            record, prompt_list, seed, seed_random = group.first(
                lambda: _inputs(prompts, prompts_file, from_image, seed)
            )
            # 2. settings and outputs, all checked before the model loads (each process checks its own share)
            flags = SettingFlags(
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
            )
            request = RunRequest(
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
                lora=lora,
                lora_scale=lora_scale,
                skip_existing=skip_existing,
                shard=share,
                seed_random=seed_random,
            )
            image_settings = metadata.rerun_settings(record) if record else None
            with group.stage():
                plan = RunPlan.build(
                    out,
                    mode="generate",
                    prompts=prompt_list,
                    flags=flags,
                    request=request,
                    image_settings=image_settings,
                    world=world,
                )
            if dry_run:
                plan.print_dry_run(out)
                return
            # 3. load once, generate this process's batches, write each image as it is finished
            execute(out, plan, lambda pipe, jobs, options, **kw: pipe.generate_iter(jobs, options, **kw), group)
    except KeyboardInterrupt:
        if world.speaks:
            raise
        raise typer.Exit(int(ExitStatus.INTERRUPTED)) from None  # rank 0 says it for the run


def _inputs(
    prompts: list[str] | None, prompts_file: Path | None, from_image: Path | None, seed: int | None
) -> tuple[dict[str, Any] | None, list[str], int, bool]:
    """The image to re-run (if any), the prompts (arguments, then the prompts file, else the image's), and the seed
    (given, the image's, or drawn at random: then True)."""
    from .. import metadata
    from ..images import read_png_text

    record = metadata.parse(read_png_text(from_image), str(from_image)) if from_image else None
    if record is not None and record.get("mode", "generate") != "generate":
        raise UsageError(
            f"{excerpt(from_image)} was made by `vqdiff {record['mode']}`; --from-image re-runs generated images",
            hint="see its settings with `vqdiff info`",
        )
    prompt_list = list(prompts or [])
    if prompts_file is not None:
        prompt_list += read_prompts_file(prompts_file)
    if not prompt_list and record is not None:
        prompt_list = [record["prompt"]]
    if not prompt_list:
        raise UsageError("no prompts given", hint="pass a prompt, --prompts-file FILE, or --from-image IMAGE")
    if seed is None and record is not None:
        seed = int(record["seed"])
    return record, prompt_list, random_seed() if seed is None else seed, seed is None
