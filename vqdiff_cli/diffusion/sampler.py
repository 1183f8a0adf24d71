"""The reverse process: which timesteps to visit, and the denoising loop from x_t to x_0.

The loop holds no model state: it takes the transformer as a callable and yields the token grid after every step,
so callers own progress, trajectories and decoding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from .schedule import (
    MaskAndReplaceSchedule,
    apply_guidance,
    gumbel_argmax,
    gumbel_uniforms,
    q_posterior,
    truncate,
)

# (x_t (B, N) ids, text states (B, L, D), t) -> log p(x_0 | x_t) (B, K-1, N) float32
Denoiser = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class TextContext:
    """Transformer conditioning for a batch: prompt states and, under guidance, the unconditional states."""

    cond: torch.Tensor  # (B, L, D)
    uncond: torch.Tensor | None  # (B, L, D), or None without guidance

    @property
    def guided(self) -> bool:
        return self.uncond is not None


@dataclass(frozen=True)
class KnownTokens:
    """Tokens that inpainting keeps: where `regenerate` is False, x is reset to `tokens` (or, with `renoise`, to a
    draw of q(x_s | tokens)) after every step."""

    tokens: torch.Tensor  # (B, N) ids
    regenerate: torch.Tensor  # (B, N) bool, True where the token is generated
    renoise: bool = False  # re-noise known tokens to the current level instead of restoring them (RePaint)


def model_log_p(denoiser: Denoiser, x_t: torch.Tensor, t: int, context: TextContext) -> tuple[torch.Tensor, ...]:
    """One network call for the batch (doubled under guidance, unconditional half first, as diffusers)."""
    if context.uncond is None:
        return (denoiser(x_t, context.cond, t),)
    out = denoiser(torch.cat([x_t, x_t]), torch.cat([context.uncond, context.cond]), t)
    return tuple(out.chunk(2))


def sample_step(
    log_p: tuple[torch.Tensor, ...],
    x_t: torch.Tensor,
    t: int,
    s: int | None,
    schedule: MaskAndReplaceSchedule,
    guidance_scale: float,
    truncation_rate: float,
    generators: Sequence[torch.Generator],
) -> torch.Tensor:
    """Guidance, truncation, posterior to s (or x_0 when s is None), Gumbel-max sample; (B, N) -> (B, N)."""
    log_p_x_0 = apply_guidance(log_p[0], log_p[1], guidance_scale) if len(log_p) == 2 else log_p[0]
    log_p_x_0 = truncate(log_p_x_0, truncation_rate)
    logits = log_p_x_0 if s is None else q_posterior(log_p_x_0, x_t, schedule, t, s)
    return gumbel_argmax(logits, gumbel_uniforms(logits.shape, generators, logits.device))


def q_sample(
    x_0: torch.Tensor, schedule: MaskAndReplaceSchedule, t: int, generators: Sequence[torch.Generator]
) -> torch.Tensor:
    """Forward process: draw x_t ~ q(x_t | x_0) for (B, N) ids, one uniform draw of (1, K, N) per image."""
    tr = schedule.cumulative(t).to(x_0.device)
    k = schedule.num_classes
    log_onehot = torch.full((x_0.shape[0], k - 1, x_0.shape[1]), -69.07755278982137, device=x_0.device)
    log_onehot.scatter_(1, x_0.unsqueeze(1), 0.0)  # log one-hot over the K-1 codes (x_0 is never the mask)
    logits = (log_onehot + tr.log_a).logaddexp(tr.log_b)
    logits = torch.cat((logits, tr.log_c.expand(x_0.shape[0], 1, x_0.shape[1])), dim=1)
    return gumbel_argmax(logits, gumbel_uniforms(logits.shape, generators, logits.device))


def start_step_for(schedule: MaskAndReplaceSchedule, masked_fraction: float) -> int:
    """The timestep whose cumulative mask probability gamma-bar_t is closest to `masked_fraction` (Improved
    VQ-Diffusion's rule for a partly known grid); ties go to the earlier timestep."""
    gaps = [abs(float(c) - masked_fraction) for c in schedule.cumprod_ct]
    return min(range(len(gaps)), key=lambda t: (gaps[t], t))


def _impose_known(
    x: torch.Tensor,
    known: KnownTokens,
    s: int | None,
    schedule: MaskAndReplaceSchedule,
    generators: Sequence[torch.Generator],
) -> torch.Tensor:
    source = known.tokens
    if known.renoise and s is not None:
        source = q_sample(known.tokens, schedule, s, generators)  # one draw per image's generator
    return torch.where(known.regenerate, x, source)


def denoise(
    denoiser: Denoiser,
    x_t: torch.Tensor,
    timesteps: Sequence[int],
    context: TextContext,
    schedule: MaskAndReplaceSchedule,
    generators: Sequence[torch.Generator],
    guidance_scale: float,
    truncation_rate: float,
    known: KnownTokens | None = None,
) -> Iterator[torch.Tensor]:
    """Run the reverse chain over `timesteps` (descending), yielding x after each step; the last yield is x_0.

    Image b draws all its noise from generators[b] and is processed alone after the network call, so an image comes
    out the same whether it is made alone or in a batch.
    """
    x = x_t
    for i, t in enumerate(timesteps):
        s = timesteps[i + 1] if i + 1 < len(timesteps) else None  # None: go straight to x_0
        # 1. log p(x_0 | x_t, text) for the whole batch
        log_p = model_log_p(denoiser, x, t, context)
        # 2. per image: guidance, truncation, posterior to s, Gumbel-max sample
        x = torch.cat(
            [
                sample_step(
                    tuple(p[b : b + 1] for p in log_p),
                    x[b : b + 1],
                    t,
                    s,
                    schedule,
                    guidance_scale,
                    truncation_rate,
                    generators[b : b + 1],
                )
                for b in range(x.shape[0])
            ]
        )
        # 3. inpainting: known tokens back in place
        if known is not None:
            x = _impose_known(x, known, s, schedule, generators)
        yield x
