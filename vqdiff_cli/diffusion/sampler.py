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
    Transition,
    apply_guidance,
    gumbel_argmax,
    gumbel_uniforms,
    posterior,
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


@dataclass(frozen=True)
class StepTables:
    """The schedule's tables one step of the chain reads, as 0-dim float32 tensors on the batch's device."""

    q_t: Transition  # q(x_t | x_0)
    q_ts: Transition | None  # q(x_t | x_s); None for the final step, which samples x_0 directly
    q_s: Transition | None  # q(x_s | x_0)


def chain_tables(schedule: MaskAndReplaceSchedule, timesteps: Sequence[int], device: torch.device) -> list[StepTables]:
    """Every step's tables for a chain over `timesteps`, copied to `device` in one transfer before the first step, so
    that no step copies from the host (on a GPU each such copy waits for the work queued before it). The values are
    the schedule's own float32 tables, bit for bit."""
    rows: list[torch.Tensor] = []
    for i, t in enumerate(timesteps):
        s = timesteps[i + 1] if i + 1 < len(timesteps) else None
        parts = [schedule.cumulative(t)] + ([] if s is None else [schedule.step(t, s), schedule.cumulative(s)])
        values = [v for tr in parts for v in (tr.log_a, tr.log_b, tr.log_c)]
        rows.append(torch.stack(values + [torch.zeros(())] * (9 - len(values))))
    table = torch.stack(rows).to(device) if rows else torch.zeros((0, 9), device=device)

    def transition(row: torch.Tensor, j: int) -> Transition:
        return Transition(row[3 * j], row[3 * j + 1], row[3 * j + 2])

    final = len(timesteps) - 1
    return [
        StepTables(
            transition(row, 0),
            None if i == final else transition(row, 1),
            None if i == final else transition(row, 2),
        )
        for i, row in enumerate(table)
    ]


def model_log_p(denoiser: Denoiser, x_t: torch.Tensor, t: int, context: TextContext) -> tuple[torch.Tensor, ...]:
    """One network call for the batch (doubled under guidance, unconditional half first, as diffusers)."""
    if context.uncond is None:
        return (denoiser(x_t, context.cond, t),)
    out = denoiser(torch.cat([x_t, x_t]), torch.cat([context.uncond, context.cond]), t)
    return tuple(out.chunk(2))


def sample_step(
    log_p: tuple[torch.Tensor, ...],
    x_t: torch.Tensor,
    tables: StepTables,
    num_classes: int,
    guidance_scale: float,
    truncation_rate: float,
    generators: Sequence[torch.Generator],
) -> torch.Tensor:
    """Guidance, truncation, posterior to s (or x_0 for the final step), Gumbel-max sample; (B, N) -> (B, N)."""
    log_p_x_0 = apply_guidance(log_p[0], log_p[1], guidance_scale) if len(log_p) == 2 else log_p[0]
    log_p_x_0 = truncate(log_p_x_0, truncation_rate)
    if tables.q_ts is None or tables.q_s is None:
        logits = log_p_x_0
    else:
        logits = posterior(log_p_x_0, x_t, tables.q_t, tables.q_ts, tables.q_s, num_classes)
    return gumbel_argmax(logits, gumbel_uniforms(logits.shape, generators, logits.device))


def q_sample(
    x_0: torch.Tensor, schedule: MaskAndReplaceSchedule, t: int, generators: Sequence[torch.Generator]
) -> torch.Tensor:
    """Forward process: draw x_t ~ q(x_t | x_0) for (B, N) ids, one uniform draw of (1, K, N) per image."""
    return q_sample_with(x_0, schedule.cumulative(t).to(x_0.device), schedule.num_classes, generators)


def q_sample_with(
    x_0: torch.Tensor, tr: Transition, num_classes: int, generators: Sequence[torch.Generator]
) -> torch.Tensor:
    """`q_sample` from q(x_t | x_0) given as its transition, on x_0's device already."""
    k = num_classes
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
    tables: StepTables,
    num_classes: int,
    generators: Sequence[torch.Generator],
) -> torch.Tensor:
    source = known.tokens
    if known.renoise and tables.q_s is not None:
        source = q_sample_with(known.tokens, tables.q_s, num_classes, generators)  # one draw per image's generator
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

    Image b draws all its noise from generators[b] and is processed alone after the network call, so an image's noise
    is the same whether it is made alone or in a batch (and on a CPU in float32 so is the image: tests/test_cli.py).
    The schedule's tables go to the device here, once, before the first step: the loop copies nothing from the host
    and reads nothing back (`tests/test_fast.py` records every op of its steps).
    """
    tables = chain_tables(schedule, timesteps, x_t.device)
    return _chain(
        denoiser,
        x_t,
        timesteps,
        tables,
        context,
        schedule.num_classes,
        generators,
        guidance_scale,
        truncation_rate,
        known,
    )


def _chain(
    denoiser: Denoiser,
    x_t: torch.Tensor,
    timesteps: Sequence[int],
    tables: Sequence[StepTables],
    context: TextContext,
    num_classes: int,
    generators: Sequence[torch.Generator],
    guidance_scale: float,
    truncation_rate: float,
    known: KnownTokens | None,
) -> Iterator[torch.Tensor]:
    x = x_t
    for t, step in zip(timesteps, tables, strict=True):
        # 1. log p(x_0 | x_t, text) for the whole batch
        log_p = model_log_p(denoiser, x, t, context)
        # 2. per image: guidance, truncation, posterior to s, Gumbel-max sample
        x = torch.cat(
            [
                sample_step(
                    tuple(p[b : b + 1] for p in log_p),
                    x[b : b + 1],
                    step,
                    num_classes,
                    guidance_scale,
                    truncation_rate,
                    generators[b : b + 1],
                )
                for b in range(x.shape[0])
            ]
        )
        # 3. inpainting: known tokens back in place
        if known is not None:
            x = _impose_known(x, known, step, num_classes, generators)
        yield x
