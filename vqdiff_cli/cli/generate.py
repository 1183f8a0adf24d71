"""`vqdiff generate`: text to images, many images from one model load; spread over the processes that torchrun or
accelerate start (one per GPU), or over the jobs of a scheduler (--shard); resumable (--skip-existing)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..distributed import Group, Shard, World
from ..errors import ExitStatus, UsageError, excerpt
from ..options import GenerateOptions, Job, batch_around, random_seed
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
from .run import RunPlan, RunRequest, read_prompts_file
from .settings import SettingFlags

if TYPE_CHECKING:
    from ..pipeline.outputs import GeneratedImage
    from ..pipeline.pipeline import VQDiffusion


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
    reveal: RevealOpts.Reveal = None,
    purity: RevealOpts.Purity = False,
    purity_weight: RevealOpts.PurityWeight = None,
    tokens_per_call: RevealOpts.TokensPerCall = None,
    stride_mode: RevealOpts.StrideMode = None,
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
    same_batch: Annotated[
        bool,
        typer.Option(
            "--same-batch",
            help="With --from-image: sample the image in a batch of the size it was made in, at its position "
            "(its neighbours' seeds fill the batch; only the image is written), so that a GPU reproduces its tokens.",
        ),
    ] = False,
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
    if same_batch and (world.size > 1 or share.count > 1):
        raise UsageError("--same-batch re-runs one image: run it in one process, without --shard")
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
                reveal=reveal_flag(reveal, purity),
                purity_weight=purity_weight,
                tokens_per_call=tokens_per_call,
                stride_mode=stride_mode,
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
            batch = _recorded_batch(out, record, str(from_image), same_batch, batch_size, num_images, len(prompt_list))
            if batch is not None and image_settings is not None:
                image_settings["batch_size"] = batch[0]  # a setting from the image, shown so by --dry-run
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

            # 3. load once, generate this process's batches, write each image as it is finished; with
            # --same-batch the image's whole batch is sampled, and only the image is kept
            def sample(
                pipe: VQDiffusion, jobs: list[Job], options: GenerateOptions, **kw: Any
            ) -> Iterator[GeneratedImage]:
                if batch is None:
                    return pipe.generate_iter(jobs, options, **kw)
                (kept,) = jobs
                return (r for r in pipe.generate_iter(batch_around(kept, *batch), options, **kw) if r.seed == kept.seed)

            execute(out, plan, sample, group)
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


def _recorded_batch(
    out: Output,
    record: dict[str, object] | None,
    where: str,
    same_batch: bool,
    batch_size: int | None,
    num_images: int,
    num_prompts: int,
) -> tuple[int, int] | None:
    """(batch size, position) of the image's batch when --same-batch re-runs it; without --same-batch, a note when
    the re-run may not reproduce the image's tokens (made in a batch, and not on a CPU in float32)."""
    if record is None:
        if same_batch:
            raise UsageError("--same-batch re-runs the batch of an image", hint="give --from-image IMAGE")
        return None
    size, index = record.get("batch_size"), record.get("batch_index")
    if not same_batch:
        exact_anyway = record.get("device") == "cpu" and record.get("dtype") == "float32"
        if isinstance(size, int) and size > 1 and not exact_anyway:
            out.info(
                f"{where} was made in a batch of {size} on {record.get('device')} in {record.get('dtype')}: "
                "--same-batch re-runs that batch to reproduce its tokens there"
            )
        return None
    if num_images != 1 or num_prompts != 1 or batch_size is not None:
        raise UsageError("--same-batch re-runs one image in its own batch size: leave out -n, -b and extra prompts")
    if not isinstance(size, int) or not isinstance(index, int) or isinstance(size, bool) or isinstance(index, bool):
        raise UsageError(
            f"{where} does not record the batch it was made in (an image from an older vqdiff)",
            hint="re-run it without --same-batch",
        )
    return size, index
