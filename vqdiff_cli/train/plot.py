"""Pictures of a run, drawn with Pillow: the loss curve (one line per logged loss term, log-scaled when it spans more
than a decade, with the step and value ranges written on the axes) and grids of validation images."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from ..images import save_png

WIDTH, HEIGHT, MARGIN = 640, 360, 48
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
PLOTTED = ("loss", "vb", "aux", "rec", "gan", "disc", "codebook")  # the terms drawn, in this order, when logged


def write_loss_curve(rows: Sequence[dict[str, Any]], path: Path) -> bool:
    """Draw the logged loss terms against the step into `path` (replacing it); False when there is nothing yet."""
    keys = [k for k in PLOTTED if any(_finite(r.get(k)) for r in rows)]
    points = {k: [(float(r["step"]), float(r[k])) for r in rows if _finite(r.get(k))] for k in keys}
    if not keys or max(len(p) for p in points.values()) < 1:
        return False
    values = [v for k in keys for _, v in points[k]]
    steps = [s for k in keys for s, _ in points[k]]
    log_scale = min(values) > 0 and max(values) / min(values) > 10
    low, high = (math.log10(min(values)), math.log10(max(values))) if log_scale else (min(values), max(values))
    if high - low < 1e-12:
        low, high = low - 1, high + 1
    first, last = min(steps), max(steps)
    span = max(last - first, 1.0)

    def xy(step: float, value: float) -> tuple[float, float]:
        v = math.log10(value) if log_scale else value
        x = MARGIN + (step - first) / span * (WIDTH - 2 * MARGIN)
        y = HEIGHT - MARGIN - (v - low) / (high - low) * (HEIGHT - 2 * MARGIN)
        return x, y

    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((MARGIN, MARGIN, WIDTH - MARGIN, HEIGHT - MARGIN), outline=(160, 160, 160))
    for i, key in enumerate(keys):
        colour = COLOURS[i % len(COLOURS)]
        line = [xy(s, v) for s, v in points[key]]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        else:
            x, y = line[0]
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        draw.text((MARGIN + 8 + 90 * i, 12), key, fill=colour)
    top, bottom = (10**high, 10**low) if log_scale else (high, low)
    draw.text((4, MARGIN - 6), f"{top:.3g}", fill="black")
    draw.text((4, HEIGHT - MARGIN - 6), f"{bottom:.3g}", fill="black")
    draw.text((MARGIN, HEIGHT - MARGIN + 8), f"step {first:g}", fill="black")
    label = f"step {last:g}" + (" (log scale)" if log_scale else "")
    draw.text((WIDTH - MARGIN - 7 * len(label), HEIGHT - MARGIN + 8), label, fill="black")
    save_png(image, path, overwrite=True)
    return True


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def grid(images: list[Image.Image], columns: int) -> Image.Image:
    """Images of one size in rows of `columns`."""
    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (w * columns, h * rows), "white")
    for i, image in enumerate(images):
        sheet.paste(image, ((i % columns) * w, (i // columns) * h))
    return sheet
