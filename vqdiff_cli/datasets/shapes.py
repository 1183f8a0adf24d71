"""The synthetic shapes data: its attributes and palette, the held-out combinations, captions, and drawing.

Each picture is a plain background and one object, drawn from (seed, index) alone, so any shard of a dataset can be
made on its own. Attributes: shape (circle, square, triangle), size (small, large), position (a cell of a 3x3 grid),
object colour and background colour (never the same), from a nine-colour palette with a jitter of a few units per
channel. A caption names some or all of them; an attribute it leaves out may take any value.

Held out: of the 3 x 9 x 8 = 216 (shape, object colour, background colour) combinations, the 22 (10 %, rounded)
whose SHA-256 of "shape|colour|background" sorts first never appear in the `train` split; `heldout` draws only them.
Every shape, colour and background still appears in training, and so does every pair of them (tests check this):
only the triples are new, which is what lets the quality meter tell memorising from composing.

Only `random.Random(...).random()` is used, seeded with a string, whose sequence Python guarantees across versions.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

from ..errors import UsageError

if TYPE_CHECKING:
    from PIL import Image

SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
COLORS = tuple(PALETTE)
ATTRIBUTES = ("shape", "size", "position", "color", "background")  # as metadata.jsonl names them
SPLITS = ("train", "heldout", "all")
HELDOUT_SHARE = 0.10
DEFAULT_RESOLUTION = 64
DEFAULT_OMIT_RATE = 0.15  # the chance that a caption leaves out any one attribute
# The quality meter's default captions: the first pictures of the held-out split drawn from this seed, every
# attribute named (a fixed list, so that results stay comparable)
EVAL_SEED = 13
EVAL_COUNT = 100
JITTER = 4  # colour jitter, units per channel either way
# Geometry, as fractions of the side: the object's extent (the larger side of its bounding box) by size, and how far
# its centre may stray from its cell's centre. The box stays MARGIN inside the picture (the border is background).
EXTENT = {"small": (0.15, 0.19), "large": (0.26, 0.30)}
CENTRE_JITTER = 0.025
MARGIN = 0.03
SUPERSAMPLE = 4  # shapes are drawn this many times larger and box-filtered down: edges carry their exact coverage


@dataclass(frozen=True)
class Attributes:
    """What one picture shows."""

    shape: str
    size: str
    position: str
    color: str  # the object's
    background: str

    def as_dict(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in ATTRIBUTES}

    @property
    def combination(self) -> tuple[str, str, str]:
        return self.shape, self.color, self.background


@dataclass(frozen=True)
class Example:
    """One picture of a dataset: its attributes, its caption and the attributes the caption names, and the drawing
    details (in fractions of the side, and jittered colours), all drawn from (seed, index)."""

    index: int
    attributes: Attributes
    caption: str
    named: tuple[str, ...]
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 of the object's bounding box, fractions of the side
    object_rgb: tuple[int, int, int]
    background_rgb: tuple[int, int, int]
    split: str  # "train" or "heldout": where its combination belongs

    def row(self, file_name: str) -> dict[str, object]:
        """Its metadata.jsonl row (Hugging Face imagefolder: `file_name` and `text`, then the ground truth)."""
        return {"file_name": file_name, "text": self.caption, **self.attributes.as_dict(), "named": list(self.named)}


# -- held-out combinations ----------------------------------------------------------------------------------------


def _rank(combination: tuple[str, str, str]) -> str:
    return hashlib.sha256("|".join(combination).encode()).hexdigest()


@cache
def heldout_combinations() -> tuple[tuple[str, str, str], ...]:
    """The (shape, object colour, background colour) triples that never appear in training, sorted."""
    every = [(s, c, b) for s in SHAPES for c in COLORS for b in COLORS if b != c]
    count = round(HELDOUT_SHARE * len(every))
    return tuple(sorted(sorted(every, key=_rank)[:count]))


@cache
def combinations(split: str) -> tuple[tuple[str, str, str], ...]:
    """The (shape, colour, background) triples a split draws from."""
    if split not in SPLITS:
        raise UsageError(f"unknown split '{split}'", hint=f"use one of: {', '.join(SPLITS)}")
    held = set(heldout_combinations())
    every = [(s, c, b) for s in SHAPES for c in COLORS for b in COLORS if b != c]
    if split == "all":
        return tuple(every)
    return tuple(t for t in every if (t in held) == (split == "heldout"))


# -- captions -----------------------------------------------------------------------------------------------------


def _article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _where(position: str, pick: Callable[[int], int]) -> str:
    """A phrase placing the object: "at the top left", "in the top left corner", "on the left", "in the center"."""
    if position == "center":
        return ("in the center", "at the center")[pick(2)]
    if " " in position:
        return (f"at the {position}", f"in the {position} corner")[pick(2)]
    if position in ("left", "right"):
        return (f"on the {position}", f"at the {position}")[pick(2)]
    return (f"at the {position}", f"along the {position}")[pick(2)]


def caption(attributes: Attributes, named: tuple[str, ...], pick: Callable[[int], int]) -> str:
    """A caption naming the attributes in `named` (in one of a few phrasings chosen by `pick(n) -> 0..n-1`).

    "a large red circle at the top left on a blue background", "small green triangle, bottom right, white
    background", "a blue square in the center of a yellow picture", "a gray background with a red circle"."""
    a = attributes
    words = [a.size if "size" in named else "", a.color if "color" in named else ""]
    noun = " ".join([*(w for w in words if w), a.shape if "shape" in named else "shape"])
    pos = a.position if "position" in named else None
    bg = a.background if "background" in named else None
    form = pick(5)
    if form == 1:  # terse, comma-separated
        return ", ".join(p for p in (noun, pos, f"{bg} background" if bg else None) if p)
    if form == 2 and pos is not None:
        prep = "on" if pos in ("left", "right") else "at" if pos in ("top", "bottom") else "in"
        return f"{_article(noun)} {prep} the {pos} of {_article(bg) if bg else 'the'} picture"
    if form == 3 and bg is not None:
        return f"{_article(bg)} background with {_article(noun)}" + (f" {_where(pos, pick)}" if pos else "")
    if form == 4 and bg is not None:
        return f"{_article(noun)}" + (f" {_where(pos, pick)}" if pos else "") + f", {bg} background"
    parts = (_article(noun), _where(pos, pick) if pos else "", f"on {_article(bg)} background" if bg else "")
    return " ".join(p for p in parts if p)


# -- examples -----------------------------------------------------------------------------------------------------


class _Draws:
    """The random numbers of one picture, from (seed, index) alone."""

    def __init__(self, seed: int, index: int) -> None:
        self._random = random.Random(f"vqdiff-shapes:{seed}:{index}")

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * self._random.random()

    def pick(self, n: int) -> int:
        return min(n - 1, int(n * self._random.random()))

    def chance(self, p: float) -> bool:
        return self._random.random() < p


def _jitter(rgb: tuple[int, int, int], draws: _Draws) -> tuple[int, int, int]:
    r, g, b = (min(255, max(0, v + draws.pick(2 * JITTER + 1) - JITTER)) for v in rgb)
    return r, g, b


def _box(attributes: Attributes, draws: _Draws) -> tuple[float, float, float, float]:
    extent = draws.uniform(*EXTENT[attributes.size])
    row, col = divmod(POSITIONS.index(attributes.position), 3)
    centre = [(c + 0.5) / 3 + draws.uniform(-CENTRE_JITTER, CENTRE_JITTER) for c in (col, row)]
    low, high = MARGIN + extent / 2, 1 - MARGIN - extent / 2
    cx, cy = (min(high, max(low, c)) for c in centre)
    return cx - extent / 2, cy - extent / 2, cx + extent / 2, cy + extent / 2


def example(
    seed: int,
    index: int,
    split: str = "train",
    omit_rate: float = DEFAULT_OMIT_RATE,
    attributes: Attributes | None = None,
) -> Example:
    """Picture `index` of the dataset drawn from `seed`: attributes from the split's combinations (or `attributes`,
    as given), a caption that leaves out each attribute with probability `omit_rate`, and its geometry and colours."""
    if not 0 <= omit_rate < 1:
        raise UsageError(f"--omit-rate must be in [0, 1), got {omit_rate}")
    draws = _Draws(seed, index)
    pool = combinations(split)
    shape, color, background = pool[draws.pick(len(pool))]
    size, position = SIZES[draws.pick(2)], POSITIONS[draws.pick(9)]
    attributes = attributes or Attributes(shape, size, position, color, background)
    named = tuple(name for name in ATTRIBUTES if not draws.chance(omit_rate))
    text = caption(attributes, named, draws.pick)
    box = _box(attributes, draws)
    object_rgb, background_rgb = _jitter(PALETTE[color], draws), _jitter(PALETTE[background], draws)
    where = "heldout" if attributes.combination in heldout_combinations() else "train"
    return Example(index, attributes, text, named, box, object_rgb, background_rgb, where)


def draw(item: Example, resolution: int = DEFAULT_RESOLUTION) -> Image.Image:
    """The picture of an example, `resolution` pixels square, antialiased (drawn large and box-filtered down)."""
    from PIL import Image, ImageDraw  # here: the CLI reads this module's names at start-up

    if resolution < 8:
        raise UsageError(f"--resolution must be at least 8, got {resolution}")
    side = resolution * SUPERSAMPLE
    picture = Image.new("RGB", (side, side), item.background_rgb)
    pen = ImageDraw.Draw(picture)
    x0, y0, x1, y1 = (v * side for v in item.box)
    shape = item.attributes.shape
    if shape == "circle":
        pen.ellipse((x0, y0, x1 - 1, y1 - 1), fill=item.object_rgb)
    elif shape == "square":
        pen.rectangle((x0, y0, x1 - 1, y1 - 1), fill=item.object_rgb)
    else:  # a triangle pointing up, as wide at its base as it is tall
        pen.polygon(((x0 + x1) / 2, y0, x1, y1, x0, y1), fill=item.object_rgb)
    return picture.reduce(SUPERSAMPLE)


def with_attributes(item: Example, **changes: str) -> Example:
    """The same example (geometry and jitter) with some attributes changed: a picture that contradicts its caption,
    for tests of the checker, or a fresh drawing of known attributes."""
    attributes = Attributes(**{**item.attributes.as_dict(), **changes})
    # a changed colour is the palette's own; a changed size or position gets a new box
    box = item.box if not {"size", "position"} & set(changes) else _box(attributes, _Draws(-1, item.index))
    object_rgb = item.object_rgb if "color" not in changes else PALETTE[attributes.color]
    background_rgb = item.background_rgb if "background" not in changes else PALETTE[attributes.background]
    return Example(item.index, attributes, item.caption, item.named, box, object_rgb, background_rgb, item.split)
