"""Inpainting and variations, before and after sampling: from an image (and a mask) to the token grid, the tokens
to keep and the timestep to start from; and from the decoded result back to the original image's pixels.

The work happens at the model's native size: the image (any size; a non-square one is stretched) is resized to it
and encoded, the mask is reduced to the token grid at its own resolution (`masks.token_coverage`), and the result
is scaled back and composited into the original through the feathered pixel mask, so pixels the user did not paint
stay the original's, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from .. import images as imageio
from .. import masks
from ..diffusion.sampler import start_step_for
from ..diffusion.schedule import MaskAndReplaceSchedule
from ..errors import UsageError
from ..options import InpaintOptions, check_strength

STRETCH_WARNING = 1.25  # warn when the image's aspect ratio is further than this from square


@dataclass
class EditSource:
    """An image prepared for editing: the original, its native-size version and its token grid."""

    original: Image.Image  # RGB, the user's size
    native: Image.Image  # RGB, native size
    tokens: torch.Tensor  # (h, w) codes of the native image
    warnings: list[str] = field(default_factory=list)


@dataclass
class InpaintSetup(EditSource):
    regenerate: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))  # (h, w) bool
    start_step: int = 0
    alpha: np.ndarray | None = None  # (H, W) composite weights at the original size; None: no composite

    @property
    def masked_fraction(self) -> float:
        return float(self.regenerate.float().mean())


def check_image_size(image: Image.Image, grid: tuple[int, int], native: int) -> list[str]:
    """Errors for images too small to edit; warnings for ones that will be stretched or upscaled."""
    w, h = image.size
    if w < grid[1] or h < grid[0]:
        raise UsageError(f"image is {w}x{h}; it must be at least {grid[1]}x{grid[0]} pixels (one per token)")
    warnings = []
    ratio = max(w, h) / min(w, h)
    if ratio > STRETCH_WARNING:
        warnings.append(f"the {w}x{h} image is stretched to {native}x{native} for the model and back afterwards")
    if min(w, h) < native:
        warnings.append(f"the {w}x{h} image is upscaled to the model's {native}x{native}; expect a soft result")
    return warnings


# -- before sampling --------------------------------------------------------------------------------------------


def prepare_edit(
    image: Image.Image, size: int, grid: tuple[int, int], encode: Callable[[Image.Image], torch.Tensor]
) -> EditSource:
    """The image as RGB, at the native `size` (stretched if it is not square), and its tokens from `encode`."""
    original = imageio.to_rgb(image)
    warnings = check_image_size(original, grid, size)
    native = original if original.size == (size, size) else original.resize((size, size), Image.Resampling.LANCZOS)
    return EditSource(original, native, encode(native), warnings)


def prepare_inpaint(
    source: EditSource,
    mask: Image.Image | np.ndarray | masks.FittedMask,
    options: InpaintOptions,
    schedule: MaskAndReplaceSchedule,
) -> InpaintSetup:
    """The token mask (measured on the mask at its own resolution), the start step, and the composite's alpha. A mask
    fitted to this image already (`masks.fit_mask`, as the CLI does before the model loads) is not checked again."""
    grid = (source.tokens.shape[0], source.tokens.shape[1])
    if not (isinstance(mask, masks.FittedMask) and mask.image_size == source.original.size):
        mask = masks.fit_mask(mask if not isinstance(mask, masks.FittedMask) else mask.painted, source.original.size)
    regenerate = torch.from_numpy(masks.regenerate_mask(mask, grid, options))
    start = inpaint_start_step(regenerate, options, schedule)
    warnings = list(source.warnings)
    if bool(regenerate.all()):
        warnings.append("the mask covers every token: this is plain generation from the prompt")
    alpha = masks.feather(mask.at_image, options.feather) if options.composite else None
    return InpaintSetup(source.original, source.native, source.tokens, warnings, regenerate, start, alpha)


def inpaint_start_step(regenerate: torch.Tensor, options: InpaintOptions, schedule: MaskAndReplaceSchedule) -> int:
    """--start-step, else T-1 for a mask of every token, else the t whose gamma-bar_t is closest to the masked
    fraction."""
    t_max = schedule.num_timesteps - 1
    if options.start_step is not None and options.start_step > t_max:
        raise UsageError(f"--start-step must be between 0 and {t_max}, got {options.start_step}")
    if options.start_step is not None:
        return options.start_step
    if bool(regenerate.all()):
        return t_max
    return start_step_for(schedule, float(regenerate.float().mean()))


def variation_start(strength: float, num_train_timesteps: int) -> int | None:
    """The timestep round(strength * (T-1)) that a variation starts from; None for strength 0 (no change)."""
    check_strength(strength)
    return None if strength == 0 else round(strength * (num_train_timesteps - 1))


# -- after sampling ---------------------------------------------------------------------------------------------


def put_back(source: EditSource, image: Image.Image) -> Image.Image:
    """A decoded result at the original's size: composited through the feathered mask when inpainting asked for it
    (pixels the user did not paint stay the original's), else resized."""
    if isinstance(source, InpaintSetup) and source.alpha is not None:
        return masks.composite(source.original, image, source.alpha)
    return image.resize(source.original.size, Image.Resampling.LANCZOS)
