"""Masks: a pixel mask (white = regenerate) read from an image, checked against the image it edits, reduced to the
token grid (coverage, mask mode, grow), and the feathered alpha that composites a result back into the original."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import UsageError, excerpt
from .images import INT16_MODES, float_scale, open_image
from .options import MASK_MODES, InpaintOptions

ASPECT_TOLERANCE = 0.02  # relative difference of width/height ratios accepted between image and mask


def mask_values(mask: Image.Image) -> np.ndarray:
    """A mask image -> (H, W) float32 in [0, 1], 1 = regenerate.

    White regenerates. An alpha channel that is not fully opaque is the mask itself (painted = opaque); otherwise
    the luminance is used. Works for 1-bit, L, LA, P, RGB, RGBA, 16-bit and float greyscale images: integer ("I",
    "I;16") values are read as 16-bit when any exceeds 255, else as 8-bit; float ("F") ones as 0..1 when none
    exceeds 1, else as 0..255 (the rule `to_rgb` uses for images).
    """
    if mask.mode == "P":
        mask = mask.convert("RGBA" if "transparency" in mask.info else "RGB")
    if mask.mode in ("RGBA", "LA", "PA"):
        alpha = np.asarray(mask.getchannel("A"), dtype=np.float32) / 255.0
        if (alpha < 1.0).any():
            return alpha
    if mask.mode == "I" or mask.mode in INT16_MODES:
        values = np.asarray(mask, dtype=np.float32)
        top = 65535.0 if values.max() > 255 else 255.0
        clipped: np.ndarray = np.clip(values / top, 0.0, 1.0)
        return clipped
    if mask.mode == "F":
        floats = np.nan_to_num(np.asarray(mask, dtype=np.float32), nan=0.0)
        scaled: np.ndarray = np.clip(floats / float_scale(floats), 0.0, 1.0)
        return scaled
    return np.asarray(mask.convert("L"), dtype=np.float32) / 255.0


def load_mask(path: Path | str) -> np.ndarray:
    """Read a mask file as (H, W) bool, True = regenerate (values of at least one half)."""
    return mask_values(open_image(path)) >= 0.5


def token_coverage(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """The fraction of every token's patch that `mask` (H, W) covers: (h, w) float, area-weighted.

    The image is divided into h x w equal boxes (the tokens after resizing to the native size); each box's coverage is
    the exact area average of the mask over it, at the mask's own resolution, so no painted pixel is lost to resizing.
    """
    h, w = grid
    as_float = Image.fromarray(mask.astype(np.float32))
    return np.asarray(as_float.resize((w, h), Image.Resampling.BOX), dtype=np.float64)


def dilate(grid: np.ndarray, steps: int) -> np.ndarray:
    """Grow a bool grid by `steps` cells in every direction (8-neighbourhood)."""
    out = grid.copy()
    for _ in range(steps):
        if out.all() or not out.any():
            break  # nothing left to grow into (or nothing to grow): more steps change nothing
        padded = np.pad(out, 1)
        out = np.zeros_like(out)
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                out |= padded[dy : dy + grid.shape[0], dx : dx + grid.shape[1]]
    return out


def tokens_to_regenerate(coverage: np.ndarray, mode: str = "any", grow: int = 0) -> np.ndarray:
    """The token mask (h, w) bool: `any` marks a token when any of its patch is painted, `half` at one half or more,
    `all` only when the whole patch is; then `grow` dilates by that many tokens."""
    eps = 1e-6
    if mode == "any":
        marked = coverage > 0
    elif mode == "half":
        marked = coverage >= 0.5 - eps
    elif mode == "all":
        marked = coverage >= 1 - eps
    else:
        raise UsageError(f"unknown mask mode '{excerpt(mode)}'", hint=f"use one of: {', '.join(MASK_MODES)}")
    if grow < 0:
        raise UsageError(f"--grow must be >= 0, got {grow}")
    return dilate(marked, grow) if grow else marked


def feather(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Alpha (H, W) float32: 1 on the mask, falling linearly to 0 over `pixels` pixels outside it; exactly 0 beyond.

    Ring k (the pixels k steps from the mask, 8-neighbourhood) gets 1 - k / (pixels + 1). The rings run out after
    at most max(H, W) - 1 steps, so any larger `pixels` costs no more than that.
    """
    alpha = mask.astype(np.float32)
    grown = mask.copy()
    for k in range(1, pixels + 1):
        ring = dilate(grown, 1) & ~grown
        if not ring.any():
            break  # the whole image is reached (or the mask is empty): every further ring is empty too
        alpha[ring] = 1.0 - k / (pixels + 1)
        grown |= ring
    return alpha


def composite(original: Image.Image, generated: Image.Image, alpha: np.ndarray) -> Image.Image:
    """Blend `generated` (resized to the original's size) into `original` through `alpha`; where alpha is 0 the
    original's pixels are kept bit for bit."""
    if generated.size != original.size:
        generated = generated.resize(original.size, Image.Resampling.LANCZOS)
    base = np.asarray(original.convert("RGB"))
    new = np.asarray(generated.convert("RGB"))
    a = alpha[..., None]
    blended = np.rint(base * (1.0 - a) + new * a).astype(np.uint8)
    return Image.fromarray(np.where(a > 0, blended, base))


def mask_image(grid: np.ndarray, factor: int) -> Image.Image:
    """A token mask drawn at pixel size: white = regenerated, black = kept."""
    pixels = np.kron(grid.astype(np.uint8) * 255, np.ones((factor, factor), dtype=np.uint8))
    return Image.fromarray(pixels)


def _shrink_axis(mask: np.ndarray, dst: int, axis: int) -> np.ndarray:
    """Shrink a bool mask along one axis (when longer than `dst`): a destination pixel is painted when any source
    pixel whose centre falls inside it is, so no painted pixel is lost."""
    src = mask.shape[axis]
    if src <= dst:
        return mask
    target = ((np.arange(src) + 0.5) * dst / src).astype(np.int64)  # non-decreasing; every 0..dst-1 occurs
    starts = np.flatnonzero(np.diff(target, prepend=-1))
    return np.logical_or.reduceat(mask, starts, axis=axis)


def mask_to_image_size(mask: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """A bool mask at the image's size, for compositing; a mask of another size must have the same aspect ratio.

    A larger mask is shrunk so that an image pixel is painted when any mask pixel inside it is: a stroke thinner than
    an image pixel is kept, and the result is painted exactly when the mask is. A smaller mask is enlarged by nearest
    neighbour. Token coverage is measured on the mask itself (`FittedMask.painted`), not on this.
    """
    mh, mw = mask.shape
    w, h = image_size
    if (mw, mh) == (w, h):
        return mask
    if abs((mw / mh) / (w / h) - 1) > ASPECT_TOLERANCE:
        raise UsageError(
            f"the mask is {mw}x{mh} but the image is {w}x{h}: their aspect ratios differ",
            hint="make the mask from the image, at its size",
        )
    shrunk = _shrink_axis(_shrink_axis(mask.astype(bool), h, 0), w, 1)
    if shrunk.shape == (h, w):
        return shrunk
    resized = Image.fromarray(shrunk.astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST)
    return np.asarray(resized) >= 128


def check_mask_painted(mask: np.ndarray, name: str = "the mask") -> None:
    if not mask.any():
        raise UsageError(f"{name} is empty: nothing is painted white", hint="white marks what to regenerate")


@dataclass(frozen=True)
class FittedMask:
    """A pixel mask checked once against the image it edits (the same aspect ratio, something painted), at its own
    resolution, where token coverage is measured, and at the image's size, for the composite."""

    painted: np.ndarray  # (h, w) bool, True = regenerate, at the mask's own resolution
    at_image: np.ndarray  # (H, W) bool at the image's size

    @property
    def image_size(self) -> tuple[int, int]:
        return self.at_image.shape[1], self.at_image.shape[0]


def fit_mask(mask: Image.Image | np.ndarray, image_size: tuple[int, int], name: str = "the mask") -> FittedMask:
    """Check a mask (an image, white = regenerate, or a bool array) against an image of `image_size` (W, H)."""
    painted = (mask if isinstance(mask, np.ndarray) else mask_values(mask) >= 0.5).astype(bool)
    at_image = mask_to_image_size(painted, image_size)  # checks the aspect ratio
    check_mask_painted(at_image, name)  # painted exactly when `painted` is: resizing keeps every painted pixel
    return FittedMask(painted, at_image)


def regenerate_mask(mask: FittedMask, grid: tuple[int, int], options: InpaintOptions) -> np.ndarray:
    """The token mask (h, w) for a fitted pixel mask, with an error for one that selects no token."""
    marked = tokens_to_regenerate(token_coverage(mask.painted, grid), options.mask_mode, options.grow)
    if not marked.any():
        raise UsageError(
            f"the mask covers no whole token with --mask-mode {options.mask_mode}",
            hint="use --mask-mode any, --grow 1, or paint a larger area",
        )
    return marked
