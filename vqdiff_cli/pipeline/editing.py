"""Inpainting and variations: from an image (and a mask) to the token grid, the tokens to keep and the timestep
to start from; and from the decoded result back to the original image's pixels.

The work happens at the model's native size: the image (any size; a non-square one is stretched) is resized to it
and encoded, the mask is reduced to the token grid at its own resolution (`masks.token_coverage`), and the result
is scaled back and composited into the original through the feathered pixel mask, so pixels the user did not paint
stay the original's, bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from .. import images as imageio
from .. import masks
from ..diffusion.fast import q_sample_start
from ..diffusion.sampler import KnownTokens, initial_tokens, q_sample, start_step_for
from ..diffusion.streams import seed_words
from ..errors import UsageError
from ..options import InpaintOptions, check_strength

if TYPE_CHECKING:
    from .pipeline import GeneratedImage, GenerateOptions, StepCallback, VQDiffusion

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


# -- the steps, on a loaded pipeline -------------------------------------------------------------------------------


@torch.inference_mode()
def prepare_edit(pipe: VQDiffusion, image: Image.Image) -> EditSource:
    original = imageio.to_rgb(image)
    size = pipe.config.image_size
    warnings = check_image_size(original, pipe.token_grid, size)
    native = original if original.size == (size, size) else original.resize((size, size), Image.Resampling.LANCZOS)
    tokens = pipe.components.vqvae.encode(imageio.to_tensor([native]).to(pipe.device, pipe.dtype))[0].cpu()
    return EditSource(original, native, tokens, warnings)


def prepare_inpaint(
    pipe: VQDiffusion, image: Image.Image, mask: Image.Image | np.ndarray, options: InpaintOptions
) -> InpaintSetup:
    source = prepare_edit(pipe, image)
    painted = (mask if isinstance(mask, np.ndarray) else masks.mask_values(mask) >= 0.5).astype(bool)
    pixels = masks.mask_to_image_size(painted, source.original.size)  # checks the aspect ratio; the composite's mask
    regenerate = torch.from_numpy(masks.regenerate_mask(painted, pipe.token_grid, options))  # at the mask's resolution
    t_max = pipe.num_train_timesteps - 1
    if options.start_step is not None and options.start_step > t_max:
        raise UsageError(f"--start-step must be between 0 and {t_max}, got {options.start_step}")
    warnings = list(source.warnings)
    if options.start_step is not None:
        start = options.start_step
    elif bool(regenerate.all()):
        start = t_max
    else:
        start = start_step_for(pipe.schedule, float(regenerate.float().mean()))
    if bool(regenerate.all()):
        warnings.append("the mask covers every token: this is plain generation from the prompt")
    alpha = masks.feather(pixels, options.feather) if options.composite else None
    return InpaintSetup(source.original, source.native, source.tokens, warnings, regenerate, start, alpha)


def inpaint_iter(
    pipe: VQDiffusion,
    setup: InpaintSetup,
    prompts: str | Sequence[str],
    options: GenerateOptions,
    inpaint_options: InpaintOptions,
    trajectory: bool,
    on_step: StepCallback | None,
) -> Iterator[GeneratedImage]:
    """Regenerate the masked tokens from `setup.start_step`, keeping the others; results at the original size."""
    renoise = inpaint_options.known == "renoise"
    x_0 = setup.tokens.view(1, -1).to(pipe.device)
    regenerate = setup.regenerate.view(1, -1).to(pipe.device)

    fast = pipe.uses_fast_sampler(options)

    def start(generators: list[torch.Generator], seeds: list[int]) -> tuple[torch.Tensor, KnownTokens | None]:
        b = len(generators)
        x0, regen = x_0.expand(b, -1), regenerate.expand(b, -1)
        if fast:  # the fast sampler's own streams, as in its steps
            words = seed_words(seeds, pipe.device)
            kept = q_sample_start(x0, pipe.schedule, setup.start_step, words) if renoise else x0
            x_t = torch.where(regen, torch.full_like(x0, pipe.mask_id), kept)
        else:
            x_t = initial_tokens(x0, regen, setup.start_step, pipe.schedule, generators, renoise)
        return x_t, KnownTokens(x0, regen, renoise)

    timesteps = options.timesteps(pipe.num_train_timesteps, start=setup.start_step)
    for result in pipe.run_sampling(prompts, options, timesteps, start, trajectory, on_step):
        if setup.alpha is not None:
            result.image = masks.composite(setup.original, result.image, setup.alpha)
        else:
            result.image = result.image.resize(setup.original.size, Image.Resampling.LANCZOS)
        yield result


def variation_start(strength: float, num_train_timesteps: int) -> int | None:
    check_strength(strength)
    return None if strength == 0 else round(strength * (num_train_timesteps - 1))


def vary_iter(
    pipe: VQDiffusion,
    source: EditSource,
    prompts: str | Sequence[str],
    strength: float,
    options: GenerateOptions,
    trajectory: bool,
    on_step: StepCallback | None,
) -> Iterator[GeneratedImage]:
    """Noise the image's tokens with the forward process to round(strength * (T-1)) and denoise from there.

    Strength 0 returns the encoded tokens unchanged; strength 1 starts from the all-mask grid, which is plain
    generation (the same tokens as `generate` with the same seed and prompt)."""
    t0 = variation_start(strength, pipe.num_train_timesteps)
    x_0 = source.tokens.view(1, -1).to(pipe.device)
    t_max = pipe.num_train_timesteps - 1

    fast = pipe.uses_fast_sampler(options)

    def start(generators: list[torch.Generator], seeds: list[int]) -> tuple[torch.Tensor, KnownTokens | None]:
        b = len(generators)
        if t0 is None:
            return x_0.expand(b, -1).clone(), None
        if t0 == t_max:
            return torch.full((b, x_0.shape[1]), pipe.mask_id, dtype=torch.long, device=pipe.device), None
        if fast:  # the fast sampler's own streams, as in its steps
            return q_sample_start(x_0.expand(b, -1), pipe.schedule, t0, seed_words(seeds, pipe.device)), None
        return q_sample(x_0.expand(b, -1), pipe.schedule, t0, generators), None

    timesteps = () if t0 is None else options.timesteps(pipe.num_train_timesteps, start=t0)
    for result in pipe.run_sampling(prompts, options, timesteps, start, trajectory, on_step):
        result.image = result.image.resize(source.original.size, Image.Resampling.LANCZOS)
        yield result
