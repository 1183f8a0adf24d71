"""`vqdiff dataset shapes` (draw the synthetic captioned pictures, sharded over torchrun's processes) and
`vqdiff dataset heldout` (the attribute combinations that training never sees)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ..datasets.shapes import DEFAULT_OMIT_RATE, DEFAULT_RESOLUTION, SPLITS
from .console import Output
from .options import JsonOpt, QuietOpt

if TYPE_CHECKING:
    from ..datasets.folder import Shard


@contextmanager
def _process_group(shard: Shard) -> Iterator[Callable[[], None]]:
    """A barrier across torchrun's processes (gloo: no GPU needed); a no-op for one process."""
    if shard.world == 1:
        yield lambda: None
        return
    import torch.distributed as dist

    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo")
    try:
        yield lambda: dist.barrier()
    finally:
        if owned:
            dist.destroy_process_group()


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
    from ..datasets.folder import ShapesSpec, Shard, write_shapes

    shard = Shard.from_env(dict(os.environ))
    spec = ShapesSpec(count=count, seed=seed, resolution=resolution, split=split, omit_rate=omit_rate)
    out = Output(quiet=quiet or shard.rank != 0, json_mode=json_out)
    if shard.world > 1:
        out.info(f"{shard.world} processes, each drawing every {shard.world}th picture")
    with _process_group(shard) as barrier, out.progress(len(shard.indices(count)), "drawing") as bar:
        written = write_shapes(
            out_dir,
            spec,
            overwrite=overwrite,
            shard=shard,
            barrier=barrier,
            on_picture=lambda done, total: bar.update(),
        )
    if shard.rank != 0:
        return
    record = {
        "folder": str(out_dir),
        "count": written.count,
        "resolution": spec.resolution,
        "seed": spec.seed,
        "split": spec.split,
        "processes": shard.world,
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
