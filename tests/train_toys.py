"""Toy training data the tests draw themselves: solid and two-colour pictures captioned by their colours."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 190, 50),
    "blue": (30, 50, 220),
    "yellow": (235, 215, 40),
    "black": (15, 15, 15),
    "white": (240, 240, 240),
}


def colour_dataset(
    folder: Path,
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow"),
    per_colour: int = 3,
    size: int = 16,
    two_colour: bool = False,
    layout: str = "txt",
    seed: int = 0,
) -> Path:
    """Solid pictures (with a little noise) captioned by their colour; with `two_colour`, also left/right halves of
    two colours captioned "COLOUR1 and COLOUR2"."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []

    def save(name: str, pixels: np.ndarray, caption: str) -> None:
        noisy = np.clip(pixels + rng.normal(0, 4, pixels.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"{name}.png")
        if layout == "txt":
            (folder / f"{name}.txt").write_text(caption, encoding="utf-8")
        rows.append({"file_name": f"{name}.png", "text": caption})

    for colour in colours:
        for i in range(per_colour):
            save(f"{colour}-{i}", np.full((size, size, 3), COLOURS[colour], dtype=np.float64), colour)
    if two_colour:
        for left in colours:
            for right in colours:
                if left != right:
                    pixels = np.zeros((size, size, 3))
                    pixels[:, : size // 2] = COLOURS[left]
                    pixels[:, size // 2 :] = COLOURS[right]
                    save(f"{left}-{right}", pixels, f"{left} and {right}")
    if layout == "jsonl":
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder


def mean_colour(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(axis=0)


def nearest_colour(image: Image.Image, colours: tuple[str, ...]) -> str:
    mean = mean_colour(image)
    return min(colours, key=lambda c: float(np.linalg.norm(mean - np.array(COLOURS[c]))))
