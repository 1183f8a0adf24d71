"""`vqdiff dataset shapes` (draw the synthetic captioned pictures, sharded over torchrun's processes) and
`vqdiff dataset heldout` (the attribute combinations that training never sees)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..datasets.shapes import DEFAULT_OMIT_RATE, DEFAULT_RESOLUTION, SPLITS
from .console import Output
from .options import JsonOpt, QuietOpt


def shapes(
    out_dir: Annotated[Path, typer.Argument(help="Folder to fill (new or empty).", show_default=False)],
    count: Annotated[int, typer.Option("--count", "-n", help="Pictures to draw.")] = 1000,
    seed: Annotated[int, typer.Option("--seed", "-s", help="Picture i depends on (seed, i) only.")] = 0,
    resolution: Annotated[int, typer.Option("--resolution", "-r", help="Side in pixels.")] = DEFAULT_RESOLUTION,
    split: Annotated[
        str,
        typer.Option(
            "--split", help=f"{', '.join(SPLITS)}: train never draws the held-out combinations, heldout only them."
        ),
    ] = "train",
    omit_rate: Annotated[
        float, typer.Option("--omit-rate", help="Chance that a caption leaves out each attribute (any value then).")
    ] = DEFAULT_OMIT_RATE,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace the dataset in a non-empty OUT (other files stay).")
    ] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Draw captioned pictures of one shape on a plain background (images + metadata.jsonl).

    Launched with torchrun, each process draws its share."""
    from ..datasets.folder import ShapesSpec, write_shapes
    from ..distributed import Group, World

    world = World.from_env()
    spec = ShapesSpec(count=count, seed=seed, resolution=resolution, split=split, omit_rate=omit_rate)
    out = Output(quiet=quiet or not world.speaks, json_mode=json_out)
    if world.size > 1:
        out.info(f"{world.size} processes, each drawing every {world.size}th picture")
    with Group.join(world) as group, out.progress(len(world.shard.indices(count)), "drawing") as bar:
        written = write_shapes(
            out_dir,
            spec,
            overwrite=overwrite,
            shard=world.shard,
            barrier=group.barrier,
            on_picture=lambda done, total: bar.update(),
        )
    if not world.speaks:
        return
    record = {
        "folder": str(out_dir),
        "count": written.count,
        "resolution": spec.resolution,
        "seed": spec.seed,
        "split": spec.split,
        "processes": world.size,
        "seconds": round(written.seconds, 3),
    }
    if json_out:
        out.record(record)
    else:
        out.result(
            f"wrote {written.count} pictures ({spec.resolution} px, {spec.split}) and metadata.jsonl to {out_dir} "
            f"in {written.seconds:.1f} s"
        )


def heldout(json_out: JsonOpt = False) -> None:
    """List the (shape, colour, background) combinations that the train split never draws."""
    from ..datasets.shapes import HELDOUT_SHARE, heldout_combinations

    out = Output(json_mode=json_out)
    held = heldout_combinations()
    if json_out:
        out.record({"share": HELDOUT_SHARE, "combinations": [list(t) for t in held]})
        return
    for shape, color, background in held:
        out.result(f"{color} {shape} on {background}")
