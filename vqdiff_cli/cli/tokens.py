"""`vqdiff encode` and `vqdiff decode`: images <-> VQ-VAE token grids (.npy)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import load_from_flags
from .console import Output
from .options import (
    CacheDirOpt,
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    OfflineOpt,
    OverwriteOpt,
    QuietOpt,
    RevisionOpt,
    VariantOpt,
)
from .settings import SettingFlags


def refuse_stdout(output: Path) -> None:
    if str(output) == "-":
        from ..errors import UsageError

        raise UsageError("-o - (standard output) is for generate's images; encode and decode write files")


def encode(
    images: Annotated[list[Path], typer.Argument(help="Images to encode.", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Token grids: (N, H, W) int64 .npy.")] = Path(
        "tokens.npy"
    ),
    keep_size: Annotated[
        bool,
        typer.Option(
            "--keep-size",
            help="Encode at the image's own size (sides must be multiples of the VQ-VAE's downsampling factor).",
        ),
    ] = False,
    model: ModelOpt = None,
    revision: RevisionOpt = None,
    offline: OfflineOpt = False,
    cache_dir: CacheDirOpt = None,
    variant: VariantOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Encode images into token grids (resized and centre-cropped to the model's native size by default)."""
    import torch

    from ..errors import UsageError
    from ..files import check_suffix, check_writable
    from ..images import load_rgb, save_tokens

    out = Output(quiet=quiet)
    refuse_stdout(output)
    check_suffix(output, ".npy", "a token file")
    check_writable(output, overwrite)
    pictures = [load_rgb(p) for p in images]
    flags = SettingFlags(
        model=model, revision=revision, variant=variant, device=device, dtype=dtype, cache_dir=cache_dir
    )
    pipe = load_from_flags(out, flags, offline=offline)
    grids = pipe.encode(pictures, keep_size=keep_size)
    shapes = sorted({tuple(g.shape) for g in grids})
    if len(shapes) > 1:
        raise UsageError(f"the images give token grids of different sizes {shapes}; encode them separately")
    save_tokens(torch.stack(grids).numpy(), output, overwrite=overwrite)
    out.result(str(output))


def decode(
    tokens: Annotated[Path, typer.Argument(help="Token grids: (H, W) or (N, H, W) .npy.", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output PNG; several grids get -0, -1, ...")] = Path(
        "decoded.png"
    ),
    model: ModelOpt = None,
    revision: RevisionOpt = None,
    offline: OfflineOpt = False,
    cache_dir: CacheDirOpt = None,
    variant: VariantOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Decode token grids into images."""
    import torch

    from ..files import check_suffix, check_writable
    from ..images import load_tokens, save_png
    from ..options import Job
    from .naming import literal, output_paths

    out = Output(quiet=quiet)
    refuse_stdout(output)
    check_suffix(output, ".png", "an image")
    grids = torch.from_numpy(load_tokens(tokens))
    paths = output_paths(literal(str(output)), [Job("", 0, i) for i in range(grids.shape[0])], step=0)
    for path in paths:
        check_writable(path, overwrite)
    flags = SettingFlags(
        model=model, revision=revision, variant=variant, device=device, dtype=dtype, cache_dir=cache_dir
    )
    pipe = load_from_flags(out, flags, offline=offline)
    for path, picture in zip(paths, pipe.decode(grids), strict=True):
        save_png(picture, path, overwrite=overwrite)
        out.result(str(path))
