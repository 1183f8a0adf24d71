"""`vqdiff eval`: the quality meter. Makes pictures for captions with known attributes (by default a fixed list from
the shapes data's held-out combinations), with every sampling flag of `generate`, optionally also with diffusers'
pipeline on the same weights, and prints prompt accuracy, FID, codebook usage, network calls and time per picture."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ..datasets.shapes import EVAL_COUNT
from ..errors import UsageError
from ..files import check_folder_writable, check_writable
from .console import Output
from .options import (
    BatchSizeOpt,
    CacheDirOpt,
    CompileOpt,
    CudaGraphsOpt,
    DeviceOpt,
    DtypeOpt,
    GuidanceOpt,
    ModelOpt,
    OfflineOpt,
    OverwriteOpt,
    QuietOpt,
    RevealOpts,
    RevisionOpt,
    SamplerOpt,
    StepsOpt,
    StrideOpt,
    ThreadsOpt,
    TruncationOpt,
    VariantOpt,
    reveal_flag,
)
from .settings import SettingFlags, generate_options, load, with_origin

if TYPE_CHECKING:
    from ..datasets.evaluate import EvalReport, Made

ATTRIBUTE_COLUMNS = ("background", "color", "shape", "position", "size", "all")


def evaluate(
    captions: Annotated[
        Path | None,
        typer.Option(
            "--captions",
            help="A metadata.jsonl (as `vqdiff dataset shapes` writes) whose rows give `text` and the attributes; "
            "its pictures, if beside it, are the FID's reference. [default: the held-out list]",
            show_default=False,
        ),
    ] = None,
    count: Annotated[
        int | None,
        typer.Option(
            "--count",
            "-n",
            help=f"Pictures: the first N captions. [default: {EVAL_COUNT}; every row of --captions]",
            show_default=False,
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", "-s", help="Seed of the first picture; picture i uses seed + i.")] = 0,
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
    vs_diffusers: Annotated[
        bool,
        typer.Option(
            "--vs-diffusers",
            help="Also run diffusers' VQDiffusionPipeline on the same weights, captions and seeds, with as many "
            "network calls (its num_inference_steps).",
        ),
    ] = False,
    save_images: Annotated[
        Path | None,
        typer.Option(
            "--save-images", help="Write the pictures as ENGINE-NNNN.png into this folder.", show_default=False
        ),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Also write the JSON report to this file.", show_default=False)
    ] = None,
    overwrite: OverwriteOpt = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as one JSON document on stdout.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Measure image quality: prompt accuracy per attribute, FID and codebook usage, per network call and second."""
    out = Output(quiet=quiet, json_mode=json_out)
    # 1. settings, captions and outputs, all checked before the model loads
    settings = load(
        SettingFlags(
            model=model,
            revision=revision,
            variant=variant,
            device=device,
            dtype=dtype,
            cache_dir=cache_dir,
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
    )
    options = generate_options(settings, seed=seed)
    if count is not None and count < 1:
        raise UsageError(f"--count must be at least 1, got {count}")
    from ..datasets.folder import read_captions

    rows = read_captions(captions)[:count] if captions is not None else None
    if output is not None:
        check_writable(output, overwrite)
    if save_images is not None:
        check_folder_writable(save_images)
    if vs_diffusers:
        try:
            import diffusers  # noqa: F401
        except ImportError:
            raise UsageError("--vs-diffusers needs diffusers", hint="pip install diffusers==0.42.1") from None

    # 2. the model, the captions at its resolution, the engines
    from ..datasets.evaluate import DiffusersEngine, Engine, VqdiffEngine, caption_cases, evaluate, heldout_cases
    from .common import load_resolved

    pipe = load_resolved(out, settings, offline=offline, compile=compile, cuda_graphs=cuda_graphs, threads=threads)
    resolution = pipe.config.image_size
    if rows is None:
        cases = heldout_cases(count or EVAL_COUNT, seed, resolution)
    else:
        cases = caption_cases(rows, seed, resolution)
    try:
        ours = VqdiffEngine(pipe, options)
    except UsageError as e:
        raise with_origin(e, settings) from None
    engines: list[Engine] = [ours]
    notes: list[str] = []
    if vs_diffusers:
        from ..bench.engines import diffusers_pipeline
        from ..checkpoint.layout import read_configs

        theirs, note = diffusers_pipeline(pipe, read_configs(pipe.source.path), pipe.dtype)
        engines.append(DiffusersEngine(theirs, ours.calls_per_image, options.guidance_scale, options.truncation_rate))
        notes += [note] if note else []

    if save_images is not None and save_images.is_dir():  # every picture's name is free (or --overwrite)
        for engine in engines:
            for index in range(len(cases)):
                check_writable(save_images / f"{engine.name}-{index:04d}.png", overwrite)

    # 3. make and score, saving each picture as it is made (Ctrl-C keeps those)
    def made(engine: str, index: int, picture: Made) -> None:
        bar.update(detail=engine)
        if save_images is not None:
            from ..images import save_png

            save_images.mkdir(parents=True, exist_ok=True)
            save_png(picture.image, save_images / f"{engine}-{index:04d}.png", overwrite=overwrite)

    out.info(f"{len(cases)} pictures per engine ({', '.join(e.name for e in engines)}), {resolution} px")
    with out.progress(len(cases) * len(engines), "generating") as bar:
        report = evaluate(
            cases,
            engines,
            resolution=resolution,
            codebook_size=pipe.config.vqvae.num_vq_embeddings,
            encode=pipe.encode,
            on_made=made,
        )
    report.model = {"name": pipe.source.name, "path": str(pipe.source.path), "revision": pipe.source.revision}
    report.settings = {
        "captions": str(captions) if captions is not None else "held-out list",
        "seed": seed,
        "timesteps": list(options.timesteps(pipe.num_train_timesteps)),
        "guidance": options.guidance_scale,
        "truncation": options.truncation_rate,
        "sampler": options.sampler,
        "reveal": options.reveal,
        "purity_weight": options.purity_weight if options.reveal == "purity" else None,
        "tokens_per_call": options.tokens_per_call,
        "stride_mode": options.stride_mode,
        "steps": options.steps,
        "stride": options.stride,
        "network_calls": ours.calls_per_image,
        "batch_size": options.batch_size,
        "device": str(pipe.device),
        "dtype": pipe.dtype_name,
        "resolution": resolution,
    }
    report.notes = notes + list(pipe.acceleration_notes)

    # 4. the report
    document = json.dumps(report.to_json(), indent=2)
    if output is not None:
        from ..files import atomic_write

        atomic_write(output, lambda f: f.write(document.encode() + b"\n"), overwrite=overwrite)
    if json_out:
        out.result(document)
    else:
        render(report)
    for note in report.notes:
        out.warn(note)


def _percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.0f}%"


def render(report: EvalReport) -> None:
    """The report as a table on stdout, with the reference's figures above it."""
    import sys

    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)
    s = report.settings
    console.print(
        f"model: {report.model.get('name')}; {report.count} captions ({s.get('captions')}), seeds from "
        f"{s.get('seed')}; guidance {s.get('guidance')}, truncation {s.get('truncation')}; "
        f"{s.get('device')} {s.get('dtype')}"
    )
    ref = report.reference
    if "checker_accuracy" in ref:
        checked = ", ".join(f"{k} {_percent(ref['checker_accuracy'].get(k))}" for k in ATTRIBUTE_COLUMNS)
        floor = ref.get("fid_floor")
        codes = ref.get("codebook")
        console.print(
            f"dataset pictures: checker accuracy {checked}"
            + ("" if floor is None else f"; FID floor {floor:.3g}")
            + ("" if not codes else f"; codes used {codes['codes_used']}/{codes['codebook_size']}")
        )
    table = Table(title="prompt accuracy (share of named attributes seen), FID on the checker's features")
    for column in ("engine", "calls", *ATTRIBUTE_COLUMNS, "FID", "codes used", "s/image"):
        table.add_column(column, justify="left" if column == "engine" else "right")
    for e in report.engines:
        codes = f"{e.codebook['codes_used']:.0f}/{e.codebook['codebook_size']:.0f}" if e.codebook else ""
        table.add_row(
            e.engine,
            str(e.calls_per_image),
            *(_percent(e.accuracy.get(k)) for k in ATTRIBUTE_COLUMNS),
            "" if e.fid is None else f"{e.fid:.3g}",
            codes,
            f"{e.seconds_per_image:.3g}",
        )
    console.print(table)
