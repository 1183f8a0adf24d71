"""Inpainting and variations: from an image (and a mask) to the token grid, the tokens to keep and the timestep
to start from; and from the decoded result back to the original image's pixels.

The work happens at the model's native size: the image (any size; a non-square one is stretched) is resized to it
and encoded, the mask is reduced to the token grid at its own resolution (`images.token_coverage`), and the result
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

from . import images as imageio
from .diffusion.fast import q_sample_start
from .diffusion.sampler import KnownTokens, initial_tokens, q_sample, start_step_for
from .diffusion.streams import seed_words
from .errors import UsageError, excerpt

if TYPE_CHECKING:
    from .api import GeneratedImage, GenerateOptions, StepCallback, VQDiffusion

KNOWN_MODES = ("restore", "renoise")
ASPECT_TOLERANCE = 0.02  # relative difference of width/height ratios accepted between image and mask
STRETCH_WARNING = 1.25  # warn when the image's aspect ratio is further than this from square


@dataclass(frozen=True)
class InpaintOptions:
    """How the mask becomes a token mask, where sampling starts, and how the result is put back."""

    mask_mode: str = "any"  # a token is regenerated when any / at least half / all of its patch is painted
    grow: int = 0  # then dilate the token mask by this many tokens
    start_step: int | None = None  # default: the t whose gamma-bar_t is closest to the masked fraction
    known: str = "restore"  # known tokens after every step: restored, or re-noised to the current level
    feather: int = 4  # pixels over which the composite fades out beyond the painted area
    composite: bool = True  # paste into the original through the mask; False returns the plain decode

    def __post_init__(self) -> None:
        if self.mask_mode not in imageio.MASK_MODES:
            raise UsageError(
                f"unknown --mask-mode '{excerpt(self.mask_mode)}'", hint=f"use one of: {', '.join(imageio.MASK_MODES)}"
            )
        if self.grow < 0:
            raise UsageError(f"--grow must be >= 0, got {self.grow}")
        if self.known not in KNOWN_MODES:
            raise UsageError(f"unknown --known '{excerpt(self.known)}'", hint=f"use one of: {', '.join(KNOWN_MODES)}")
        if self.feather < 0:
            raise UsageError(f"--feather must be >= 0, got {self.feather}")
        if self.start_step is not None and self.start_step < 0:
            raise UsageError(f"--start-step must be >= 0, got {self.start_step}")


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
    neighbour. Token coverage is measured on the mask itself (`regenerate_mask`), not on this.
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


def regenerate_mask(mask: np.ndarray, grid: tuple[int, int], options: InpaintOptions) -> np.ndarray:
    """The token mask (h, w) for a pixel mask, with errors for masks that select nothing."""
    check_mask_painted(mask)
    marked = imageio.tokens_to_regenerate(imageio.token_coverage(mask, grid), options.mask_mode, options.grow)
    if not marked.any():
        raise UsageError(
            f"the mask covers no whole token with --mask-mode {options.mask_mode}",
            hint="use --mask-mode any, --grow 1, or paint a larger area",
        )
    return marked


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
    painted = (mask if isinstance(mask, np.ndarray) else imageio.mask_values(mask) >= 0.5).astype(bool)
    pixels = mask_to_image_size(painted, source.original.size)  # checks the aspect ratio; the composite's mask
    regenerate = torch.from_numpy(regenerate_mask(painted, pipe.token_grid, options))  # at the mask's resolution
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
    alpha = imageio.feather(pixels, options.feather) if options.composite else None
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
            result.image = imageio.composite(setup.original, result.image, setup.alpha)
        else:
            result.image = result.image.resize(setup.original.size, Image.Resampling.LANCZOS)
        yield result


def check_strength(strength: float) -> None:
    if not 0 <= strength <= 1:
        raise UsageError(f"--strength must be between 0 and 1, got {strength}")


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
