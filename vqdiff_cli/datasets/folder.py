"""A shapes dataset on disk, the one place that knows its files: the PNGs, `metadata.jsonl` (Hugging Face imagefolder:
`file_name` and `text`, then the ground truth: `shape`, `size`, `position`, `color`, `background`, and `named`, the
attributes the caption names) and `dataset.json` (how it was made). Writing, sharded over processes, and reading
captions with their attributes back (what `vqdiff eval --captions` takes).

Picture i depends only on (seed, i), so process r of W draws the pictures i with i % W == r; once all are done
(`barrier`), process 0 writes metadata.jsonl and dataset.json. Each file appears under its name in one step.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..distributed import Shard
from ..errors import OutputError, UsageError
from ..files import atomic_write, check_folder_writable
from ..images import png_bytes
from ..version import __version__
from . import shapes
from .shapes import ATTRIBUTES, DEFAULT_OMIT_RATE, DEFAULT_RESOLUTION, Attributes

METADATA_FILE = "metadata.jsonl"
INFO_FILE = "dataset.json"
FORMAT = 1
MAX_RESOLUTION = 1024
VALUES = {
    "shape": shapes.SHAPES,
    "size": shapes.SIZES,
    "position": shapes.POSITIONS,
    "color": shapes.COLORS,
    "background": shapes.COLORS,
}


@dataclass(frozen=True)
class ShapesSpec:
    """What `vqdiff dataset shapes` draws."""

    count: int
    seed: int = 0
    resolution: int = DEFAULT_RESOLUTION
    split: str = "train"
    omit_rate: float = DEFAULT_OMIT_RATE

    def __post_init__(self) -> None:
        if self.count < 1:
            raise UsageError(f"--count must be at least 1, got {self.count}")
        if self.seed < 0:
            raise UsageError(f"--seed must be >= 0, got {self.seed}")
        if not 8 <= self.resolution <= MAX_RESOLUTION:
            raise UsageError(f"--resolution must be between 8 and {MAX_RESOLUTION}, got {self.resolution}")
        if not 0 <= self.omit_rate < 1:
            raise UsageError(f"--omit-rate must be in [0, 1), got {self.omit_rate}")
        shapes.combinations(self.split)  # an unknown split is refused here

    def file_name(self, index: int) -> str:
        return f"{index:0{max(6, len(str(self.count - 1)))}d}.png"

    def example(self, index: int) -> shapes.Example:
        return shapes.example(self.seed, index, self.split, self.omit_rate)


@dataclass
class Written:
    """What a write did (this process's share, and the dataset's size once process 0 has listed it)."""

    folder: Path
    pictures: int  # drawn by this process
    count: int  # in metadata.jsonl (0 on other processes than the first)
    seconds: float
    heldout: list[tuple[str, str, str]] = field(default_factory=list)


def _previous_files(folder: Path) -> list[Path]:
    """The files an earlier shapes dataset in `folder` consists of (what --overwrite removes)."""
    found = [folder / INFO_FILE, folder / METADATA_FILE]
    try:
        lines = (folder / METADATA_FILE).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        lines = []
    for line in lines:
        try:
            name = json.loads(line).get("file_name")
        except (json.JSONDecodeError, AttributeError):
            continue
        if isinstance(name, str) and "/" not in name and not name.startswith("."):
            found.append(folder / name)
    return [p for p in found if p.is_file()]


def check_output(folder: Path, overwrite: bool) -> None:
    """OUT must be a new or empty folder, or --overwrite given."""
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder} exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise OutputError(
            f"{folder} is not empty", hint="choose a new folder, or pass --overwrite to replace the dataset in it"
        )
    check_folder_writable(folder)


def _write_picture(path: Path, data: bytes) -> None:
    """A picture under its name in one step (a temporary file, renamed). Not synced to disk one by one: a dataset can
    be drawn again, and metadata.jsonl, which is synced, is written only after every picture."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)


def write_shapes(
    folder: Path,
    spec: ShapesSpec,
    *,
    overwrite: bool = False,
    shard: Shard | None = None,
    barrier: Callable[[], None] = lambda: None,
    on_picture: Callable[[int, int], None] | None = None,
) -> Written:
    """Draw this process's share of the dataset into `folder`, then (process 0) list every picture.

    `barrier()` returns once every process has reached it (a no-op for one process); `on_picture(done, share)`
    reports progress. Ctrl-C in a single process lists the pictures finished so far before it stops."""
    shard = shard or Shard()  # alone: every picture
    started = time.perf_counter()
    check_output(folder, overwrite)
    if shard.index == 0:
        for path in _previous_files(folder) if overwrite else ():
            path.unlink(missing_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
    barrier()  # every process has checked OUT, and the old dataset is gone, before anyone writes
    share = shard.indices(spec.count)
    done = 0
    try:
        for index in share:
            item = spec.example(index)
            _write_picture(folder / spec.file_name(index), png_bytes(shapes.draw(item, spec.resolution)))
            done += 1
            if on_picture is not None:
                on_picture(done, len(share))
    except KeyboardInterrupt:
        if shard.count == 1 and done:
            _write_listing(folder, spec, done)
        raise
    barrier()  # every picture is there
    count = _write_listing(folder, spec, spec.count) if shard.index == 0 else 0
    return Written(folder, done, count, time.perf_counter() - started, list(shapes.heldout_combinations()))


def _write_listing(folder: Path, spec: ShapesSpec, count: int) -> int:
    """metadata.jsonl for pictures 0..count-1 (each must exist), and dataset.json."""
    rows = []
    for index in range(count):
        name = spec.file_name(index)
        if not (folder / name).is_file():
            raise OutputError(f"{folder / name} is missing", hint="a process of the run failed; run it again")
        rows.append(json.dumps(spec.example(index).row(name)))
    text = "\n".join(rows) + "\n"
    info = {
        "generator": "vqdiff dataset shapes",
        "vqdiff": __version__,
        "format": FORMAT,
        "count": count,
        "seed": spec.seed,
        "resolution": spec.resolution,
        "split": spec.split,
        "omit_rate": spec.omit_rate,
        "heldout_share": shapes.HELDOUT_SHARE,
        "heldout": [list(t) for t in shapes.heldout_combinations()],
        "values": {k: list(v) for k, v in VALUES.items()},
        "palette": {k: list(v) for k, v in shapes.PALETTE.items()},
    }
    atomic_write(folder / METADATA_FILE, lambda f: f.write(text.encode()), overwrite=True)
    atomic_write(folder / INFO_FILE, lambda f: f.write(json.dumps(info, indent=2).encode() + b"\n"), overwrite=True)
    return count


# -- reading captions with their ground truth back ----------------------------------------------------------------


@dataclass(frozen=True)
class LabelledCaption:
    """A caption, what it asks for (the attributes it names, with their values), the full ground truth when the row
    gives every attribute, and the picture it describes when there is one."""

    text: str
    asked: dict[str, str]
    truth: Attributes | None
    picture: Path | None


def _attribute(row: dict[str, Any], name: str, where: str) -> str | None:
    value = row.get(name)
    if value is None:
        return None
    if value not in VALUES[name]:
        raise UsageError(f"{where}: '{name}' is {value!r}", hint=f"use one of: {', '.join(VALUES[name])}")
    return str(value)


def read_captions(path: Path) -> list[LabelledCaption]:
    """The rows of a metadata.jsonl: `text`, attribute fields (those present are asked for, or those `named` lists),
    and `file_name` (a picture beside the file, optional)."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise UsageError(f"captions file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read captions file {path}: {e}") from None
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise UsageError(f"{where}: not an object with a 'text' caption")
        values = {name: v for name in ATTRIBUTES if (v := _attribute(row, name, where)) is not None}
        named = row.get("named", list(values))
        if not isinstance(named, list) or not set(named) <= set(values):
            raise UsageError(f"{where}: 'named' must list attributes the row gives")
        if not named:
            raise UsageError(f"{where}: the row gives none of {', '.join(ATTRIBUTES)}, so nothing can be scored")
        name = row.get("file_name")
        picture = path.parent / name if isinstance(name, str) and (path.parent / name).is_file() else None
        truth = Attributes(**values) if len(values) == len(ATTRIBUTES) else None
        out.append(LabelledCaption(row["text"], {k: values[k] for k in named}, truth, picture))
    if not out:
        raise UsageError(f"captions file {path} has no rows")
    return out
