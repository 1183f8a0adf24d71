"""`vqdiff train vqvae` and `vqdiff train transformer`: train a VQ-VAE, then a VQ-Diffusion transformer on its token
grids, or fine-tune a pipeline; one CPU, one GPU, or many under `accelerate launch` / `torchrun`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from .console import Output
from .options import CacheDirOpt, OfflineOpt, OverwriteOpt, QuietOpt

if TYPE_CHECKING:
    from ..train.task import LoopOptions, TrainResult

HELP = "Train a VQ-VAE or a VQ-Diffusion transformer on a folder of captioned images (needs vqdiff[train])."

DataArg = Annotated[
    Path,
    typer.Argument(
        help="Folder of images (subfolders too) with captions in metadata.jsonl or NAME.txt beside NAME.png.",
        show_default=False,
    ),
]
OutputDirOpt = Annotated[
    Path, typer.Option("--output", "-o", help="Run folder: checkpoints, logs, and the result.", show_default=False)
]
ResolutionOpt = Annotated[
    int | None,
    typer.Option("--resolution", help="Image side in pixels (resize + centre crop).", show_default=False),
]
CaptionColumnOpt = Annotated[str, typer.Option("--caption-column", help="The caption field of metadata.jsonl.")]
StrictOpt = Annotated[bool, typer.Option("--strict", help="Unreadable, truncated or tiny images are an error.")]
StepsOpt = Annotated[int, typer.Option("--steps", help="Optimizer steps in all (a resumed run counts on).")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Images per process per micro-batch.")]
GradAccumOpt = Annotated[int, typer.Option("--grad-accum", help="Micro-batches per optimizer step.")]
WarmupOpt = Annotated[int, typer.Option("--warmup", help="Linear learning-rate warm-up steps.")]
WeightDecayOpt = Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay.")]
ClipOpt = Annotated[float, typer.Option("--clip-grad", help="Gradient-norm clipping (0: off).")]
EmaOpt = Annotated[
    float | None,
    typer.Option("--ema", help="EMA decay of the weights (e.g. 0.999); the EMA is exported. [default: off]"),
]
PrecisionOpt = Annotated[str, typer.Option("--mixed-precision", help="no, fp16 or bf16.")]
CheckpointOpt = Annotated[int, typer.Option("--checkpoint-every", help="Steps between checkpoints.")]
KeepOpt = Annotated[int, typer.Option("--keep", help="Checkpoints kept (the newest).")]
LogOpt = Annotated[int, typer.Option("--log-every", help="Steps between lines of train_log.jsonl.")]
ValidateOpt = Annotated[
    int | None, typer.Option("--validate-every", help="Steps between validations. [default: only at the end]")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the data order, noise and initial weights.")]
TrainDeviceOpt = Annotated[str, typer.Option("--device", help="auto (a GPU when there is one), cpu or cuda.")]
ReportOpt = Annotated[
    str | None, typer.Option("--report-to", help="tensorboard: also log there (when installed).", show_default=False)
]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint in the run folder.")]


def _output(quiet: bool) -> Output:
    """Messages from the main process only: under torchrun or accelerate launch every rank runs this command."""
    import os

    return Output(quiet=quiet or int(os.environ.get("RANK", "0")) != 0)


def _loop_options(**kw: object) -> LoopOptions:
    from ..train.task import LoopOptions

    clip = kw.pop("clip_grad")
    return LoopOptions(clip_grad=float(clip) if clip else None, **kw)  # type: ignore[arg-type]


def _report(out: Output, result: TrainResult, output: Path, what: str) -> None:
    if result.resumed_from is not None:
        out.info(f"resumed at step {result.resumed_from}")
    latest: dict[str, float] = {}
    for row in result.log:
        latest.update({k: v for k, v in row.items() if k in ("loss", "rec", "psnr")})
    parts = [f"{k} {v:.4g}" + (" dB on held-out images" if k == "psnr" else "") for k, v in latest.items()]
    out.info(f"{result.steps} steps" + (f"; last {', '.join(parts)}" if parts else ""))
    if not out.quiet:  # the main process (on the others, _output made it quiet)
        out.result(str(output))
    out.info(what)


def vqvae(
    data: DataArg,
    output: OutputDirOpt,
    resolution: Annotated[int, typer.Option("--resolution", help="Image side in pixels (resize + centre crop).")] = 256,
    downsample: Annotated[
        int, typer.Option("--downsample", help="Downsampling factor F: token grid = resolution / F.")
    ] = 8,
    codebook_size: Annotated[int, typer.Option("--codebook-size", help="Codebook entries K.")] = 1024,
    embed_dim: Annotated[int, typer.Option("--embed-dim", help="Width of a codebook entry.")] = 64,
    channels: Annotated[int, typer.Option("--channels", help="Base width (doubled per level, at most 4x).")] = 64,
    layers_per_block: Annotated[int, typer.Option("--layers-per-block", help="Resnet blocks per level.")] = 2,
    norm_groups: Annotated[
        int,
        typer.Option("--norm-groups", help="Groups of every GroupNorm (divides --channels; few keep flat colours)."),
    ] = 32,
    disc_start: Annotated[int, typer.Option("--disc-start", help="Step from which the discriminator trains.")] = 2000,
    no_disc: Annotated[bool, typer.Option("--no-disc", help="No discriminator: L1 and codebook losses only.")] = False,
    disc_weight: Annotated[float, typer.Option("--disc-weight", help="Factor on VQGAN's adaptive weight.")] = 0.8,
    revive_every: Annotated[
        int, typer.Option("--revive-every", help="Steps between re-initialising unused codes (0: never).")
    ] = 100,
    strict: StrictOpt = False,
    steps: StepsOpt = 10000,
    batch_size: BatchOpt = 8,
    grad_accum: GradAccumOpt = 1,
    lr: Annotated[float, typer.Option("--lr", help="Learning rate (Adam, betas 0.5 and 0.9).")] = 2e-4,
    warmup: WarmupOpt = 0,
    weight_decay: WeightDecayOpt = 0.0,
    clip_grad: ClipOpt = 1.0,
    ema: EmaOpt = None,
    mixed_precision: PrecisionOpt = "no",
    checkpoint_every: CheckpointOpt = 1000,
    keep: KeepOpt = 3,
    log_every: LogOpt = 10,
    validate_every: ValidateOpt = None,
    seed: SeedOpt = 0,
    device: TrainDeviceOpt = "auto",
    report_to: ReportOpt = None,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a VQ-VAE (diffusers' VQModel) from scratch: the token grids the transformer stage learns."""
    from ..train import require_train_extra

    require_train_extra()
    from ..train.vqvae import VQVAEStageOptions, train_vqvae

    out = _output(quiet)
    stage = VQVAEStageOptions(
        data=data,
        resolution=resolution,
        downsample=downsample,
        codebook_size=codebook_size,
        embed_dim=embed_dim,
        channels=channels,
        layers_per_block=layers_per_block,
        norm_groups=norm_groups,
        disc=not no_disc,
        disc_start=disc_start,
        disc_weight=disc_weight,
        revive_every=revive_every,
        strict=strict,
    )
    loop = _loop_options(
        steps=steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        warmup=warmup,
        weight_decay=weight_decay,
        beta1=0.5,
        beta2=0.9,
        clip_grad=clip_grad,
        ema=ema,
        mixed_precision=mixed_precision,
        checkpoint_every=checkpoint_every,
        keep=keep,
        log_every=log_every,
        validate_every=validate_every,
        seed=seed,
        device=device,
        report_to=report_to,
    )
    result = _run(
        out, loop, lambda hooks: train_vqvae(stage, loop, output, resume=resume, overwrite=overwrite, **hooks)
    )
    _report(out, result, output, f"VQ-VAE: vqdiff train transformer DATA --vqvae {output} ...")


def transformer(
    data: DataArg,
    output: OutputDirOpt,
    vqvae: Annotated[
        str | None,
        typer.Option("--vqvae", help="The frozen VQ-VAE: a VQModel folder (vqdiff train vqvae) or a pipeline."),
    ] = None,
    text_encoder: Annotated[
        str | None,
        typer.Option("--text-encoder", help="Frozen CLIP text encoder + tokenizer of a pipeline folder or Hub id."),
    ] = None,
    train_text_encoder: Annotated[
        bool,
        typer.Option("--train-text-encoder", help="Train a small CLIP text model, tokenizer built from the captions."),
    ] = False,
    from_model: Annotated[
        str | None,
        typer.Option("--from", help="Fine-tune this pipeline (folder or Hub id): its transformer, VQ-VAE and text."),
    ] = None,
    lora: Annotated[
        int | None, typer.Option("--lora", help="Fine-tune through a LoRA adapter of this rank (with --from).")
    ] = None,
    lora_alpha: Annotated[int | None, typer.Option("--lora-alpha", help="LoRA alpha. [default: the rank]")] = None,
    resolution: ResolutionOpt = None,
    layers: Annotated[int | None, typer.Option("--layers", help="Transformer blocks. [default: 8]")] = None,
    width: Annotated[int | None, typer.Option("--width", help="Transformer width. [default: 512]")] = None,
    heads: Annotated[int | None, typer.Option("--heads", help="Attention heads. [default: 8]")] = None,
    timesteps: Annotated[int | None, typer.Option("--timesteps", help="Diffusion steps T. [default: 100]")] = None,
    text_layers: Annotated[int, typer.Option("--text-layers", help="Layers of a text encoder from scratch.")] = 4,
    text_width: Annotated[int, typer.Option("--text-width", help="Width of a text encoder from scratch.")] = 256,
    caption_dropout: Annotated[
        float, typer.Option("--caption-dropout", help="Share of captions replaced by the learned null embedding.")
    ] = 0.1,
    aux_weight: Annotated[float, typer.Option("--aux-weight", help="Weight of the auxiliary x_0 loss.")] = 5e-4,
    caption_column: CaptionColumnOpt = "text",
    strict: StrictOpt = False,
    validation_prompt: Annotated[
        list[str] | None,
        typer.Option("--validation-prompt", help="Prompt sampled at each validation (repeatable).", show_default=False),
    ] = None,
    validation_images: Annotated[int, typer.Option("--validation-images", help="Images per prompt.")] = 2,
    steps: StepsOpt = 1000,
    batch_size: BatchOpt = 8,
    grad_accum: GradAccumOpt = 1,
    lr: Annotated[
        float | None,
        typer.Option("--lr", help="Learning rate. [default: 4.5e-4 from scratch, 1e-5 with --from, 1e-4 with --lora]"),
    ] = None,
    warmup: WarmupOpt = 0,
    weight_decay: WeightDecayOpt = 0.0,
    clip_grad: ClipOpt = 1.0,
    ema: EmaOpt = None,
    mixed_precision: PrecisionOpt = "no",
    checkpoint_every: CheckpointOpt = 500,
    keep: KeepOpt = 3,
    log_every: LogOpt = 10,
    validate_every: ValidateOpt = None,
    seed: SeedOpt = 0,
    device: TrainDeviceOpt = "auto",
    report_to: ReportOpt = None,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    offline: OfflineOpt = False,
    cache_dir: CacheDirOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Train the VQ-Diffusion transformer on a frozen VQ-VAE's token grids (or fine-tune a pipeline with --from)."""
    from ..train import require_train_extra

    require_train_extra(lora=lora is not None)
    from ..train.transformer import TransformerStageOptions, train_transformer

    out = _output(quiet)
    stage = TransformerStageOptions(
        data=data,
        vqvae=vqvae,
        text_encoder=text_encoder,
        train_text_encoder=train_text_encoder,
        from_model=from_model,
        resolution=resolution,
        layers=layers,
        width=width,
        heads=heads,
        timesteps=timesteps,
        text_layers=text_layers,
        text_width=text_width,
        caption_dropout=caption_dropout,
        caption_column=caption_column,
        strict=strict,
        aux_weight=aux_weight,
        lora=lora,
        lora_alpha=lora_alpha,
        validation_prompts=tuple(validation_prompt or ()),
        validation_images=validation_images,
        offline=offline,
        cache_dir=cache_dir,
    )
    default_lr = 1e-4 if lora is not None else 1e-5 if from_model is not None else 4.5e-4
    loop = _loop_options(
        steps=steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr if lr is not None else default_lr,
        warmup=warmup,
        weight_decay=weight_decay,
        clip_grad=clip_grad,
        ema=ema,
        mixed_precision=mixed_precision,
        checkpoint_every=checkpoint_every,
        keep=keep,
        log_every=log_every,
        validate_every=validate_every,
        seed=seed,
        device=device,
        report_to=report_to,
    )
    result = _run(
        out, loop, lambda hooks: train_transformer(stage, loop, output, resume=resume, overwrite=overwrite, **hooks)
    )
    what = (
        f"LoRA adapter: vqdiff generate --model {from_model} --lora {output}"
        if lora
        else (f"pipeline: vqdiff generate --model {output} PROMPT")
    )
    _report(out, result, output, what)


def _run(out: Output, loop: LoopOptions, start: Callable[[dict[str, Any]], TrainResult]) -> TrainResult:
    """Run a stage with its messages on stderr and a bar of steps (loss, images/s, elapsed, ETA)."""
    from ..train.task import Progress

    def on_event(message: str) -> None:
        if message.startswith("warning: "):
            out.warn(message.removeprefix("warning: "))
        else:
            out.info(message)

    with out.progress(loop.steps, "train") as bar:
        last: list[int] = []

        def on_progress(p: Progress) -> None:
            if not last:  # a resumed run starts part-way
                last.append(p.step - 1)
                bar.update(p.step - 1)
            bar.update(p.step - last[0], f"loss {p.loss:.4g}, {p.images_per_s:.1f} img/s")
            last[0] = p.step

        return start({"on_event": on_event, "on_progress": on_progress})


def bench(
    arch: Annotated[
        str, typer.Option("--arch", help="A shipped architecture (ithq) or a folder of its JSON configs.")
    ] = "ithq",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per step.")] = 1,
    steps: Annotated[int, typer.Option("--steps", help="Timed steps.")] = 2,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed steps first (after the FLOP-counted one).")] = 1,
    lora: Annotated[int | None, typer.Option("--lora", help="Train a LoRA adapter of this rank instead.")] = None,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    mixed_precision: PrecisionOpt = "no",
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
) -> None:
    """Time a training step of the transformer stage with random weights: images/s, TFLOP/s, memory."""
    import json

    from ..train import require_train_extra

    require_train_extra(lora=lora is not None)
    from ..train.bench import bench_training_step

    out = Output()
    out.info(f"building {arch} with random weights")
    r = bench_training_step(
        arch, batch_size=batch_size, steps=steps, warmup=warmup, lora=lora, device=device, precision=mixed_precision
    )
    if json_out:
        out.result(json.dumps(r.as_dict()))
        return
    out.result(
        f"{r.architecture} {r.mode} on {r.device} ({r.precision}), batch {r.batch_size}: "
        f"{r.seconds_per_step:.3g} s/step, "
        f"{r.images_per_s:.3g} images/s, transformer {r.transformer_tflop_per_step:.3g} TFLOP/step = "
        f"{r.transformer_tflop_per_s:.3g} TFLOP/s; {r.trainable_parameters:,} of {r.total_parameters:,} parameters "
        f"train; weights+grads+AdamW {r.state_gib:.2f} GiB (computed), {r.peak_kind} {r.peak_gib:.2f} GiB"
    )
