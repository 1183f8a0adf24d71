"""`vqdiff info` (an image's generation settings, no model needed) and `vqdiff config` (where defaults live)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .console import Output
from .options import JsonOpt

_SHOWN = (
    "prompt",
    "seed",
    "model",
    "revision",
    "model_path",
    "variant",
    "device",
    "dtype",
    "steps",
    "stride",
    "num_steps",
    "guidance",
    "truncation",
    "width",
    "height",
    "batch_size",
    "batch_index",
    "mode",
    "vqdiff_version",
)


def info(
    images: Annotated[list[Path], typer.Argument(help="PNG files made by vqdiff.", show_default=False)],
    json_out: JsonOpt = False,
) -> None:
    """Print the generation settings stored in images (no model is loaded)."""
    from .. import metadata
    from ..images import read_png_text

    out = Output(json_mode=json_out)
    for path in images:
        record = metadata.parse(read_png_text(path), str(path))
        if json_out:
            out.record({"path": str(path), **record})
            continue
        if len(images) > 1:
            out.result(f"{path}:")
        width = max(len(k) for k in _SHOWN)
        for key in (*_SHOWN, *sorted(set(record) - set(_SHOWN) - {"timesteps", "schema", "index"})):
            value = record.get(key)
            if value is not None:
                out.result(f"  {key:<{width}}  {value if not isinstance(value, dict | list) else json.dumps(value)}")


def config_path_cmd() -> None:
    """Print the configuration file's path (it need not exist)."""
    from .settings import config_path

    Output().result(str(config_path()))


def config_show(json_out: JsonOpt = False) -> None:
    """Print every setting with its value and where it comes from (environment, config file or default)."""
    from .settings import SETTINGS, SettingFlags, load

    out = Output(json_mode=json_out)
    resolved = load(SettingFlags())
    path = resolved.config_file
    assert path is not None
    if json_out:
        rows = {k: {**row, "env": SETTINGS[k].env} for k, row in resolved.rows().items()}
        out.record({"config_file": str(path), "exists": path.is_file(), "settings": rows})
        return
    out.result(f"config file: {path}" + ("" if path.is_file() else " (not present)"))
    for line in resolved.table():
        out.result(line)
