"""Where a batch's reverse chain starts: all-mask tokens (generation), an image's tokens with the regenerated ones
masked (inpainting), or an image's tokens noised by the forward process (variations).

The forward-noise draw q(x_t | x_0) is written once, in `q_sample_from`: from each image's torch generator for the
reference sampler, or from its counter-based stream for the fast sampler (the noise each sampler draws its steps from).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..device import make_generators
from .fast import q_sample_start
from .sampler import KnownTokens, q_sample
from .schedule import MaskAndReplaceSchedule
from .streams import seed_words


@dataclass(frozen=True)
class Noise:
    """Where a batch's random numbers come from; exactly one is set. The reference sampler draws from one torch
    generator per image, the fast sampler from streams keyed by each image's seed words."""

    generators: list[torch.Generator] | None = None
    words: torch.Tensor | None = None  # (B, 2) int64 seed words

    @classmethod
    def for_seeds(cls, seeds: Sequence[int], device: torch.device, fast: bool) -> Noise:
        """What the sampler that runs the batch uses, and only that (generators are never made for the fast one)."""
        if fast:
            return cls(words=seed_words(seeds, device))
        return cls(generators=make_generators(list(seeds), device))

    @property
    def batch(self) -> int:
        if self.words is not None:
            return int(self.words.shape[0])
        assert self.generators is not None
        return len(self.generators)


# per batch: its noise -> (x_t to start from (B, N), tokens to keep or None)
StartFn = Callable[[Noise], tuple[torch.Tensor, KnownTokens | None]]


def q_sample_from(noise: Noise, x_0: torch.Tensor, schedule: MaskAndReplaceSchedule, t: int) -> torch.Tensor:
    """x_t ~ q(x_t | x_0) for (B, N) ids, drawn as the batch's sampler draws (a generator or a stream per image)."""
    if noise.words is not None:
        return q_sample_start(x_0, schedule, t, noise.words)
    assert noise.generators is not None
    return q_sample(x_0, schedule, t, noise.generators)


def all_masked(batch: int, num_tokens: int, mask_id: int, device: torch.device) -> torch.Tensor:
    """(B, N) grids of the mask id: x_T, where generation starts."""
    return torch.full((batch, num_tokens), mask_id, dtype=torch.long, device=device)


def inpaint_start(
    noise: Noise,
    x_0: torch.Tensor,
    regenerate: torch.Tensor,
    schedule: MaskAndReplaceSchedule,
    t: int,
    renoise: bool,
) -> tuple[torch.Tensor, KnownTokens]:
    """x_t for one image's (1, N) tokens x_0 and (1, N) bool `regenerate`, for every image of the batch: [MASK] where
    tokens are regenerated; elsewhere x_0 itself or, with `renoise`, a draw of q(x_t | x_0). With the tokens to keep."""
    x0, regen = x_0.expand(noise.batch, -1), regenerate.expand(noise.batch, -1)
    kept = q_sample_from(noise, x0, schedule, t) if renoise else x0
    return torch.where(regen, torch.full_like(x0, schedule.mask_id), kept), KnownTokens(x0, regen, renoise)


def variation_start(noise: Noise, x_0: torch.Tensor, schedule: MaskAndReplaceSchedule, t: int | None) -> torch.Tensor:
    """x_t for one image's (1, N) tokens, for every image of the batch: the tokens themselves (t None, strength 0),
    all-mask at T-1 (strength 1 is plain generation), else a draw of q(x_t | x_0)."""
    if t is None:
        return x_0.expand(noise.batch, -1).clone()
    if t == schedule.num_timesteps - 1:
        return all_masked(noise.batch, x_0.shape[1], schedule.mask_id, x_0.device)
    return q_sample_from(noise, x_0.expand(noise.batch, -1), schedule, t)
