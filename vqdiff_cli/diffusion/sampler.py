"""The reverse process: which timesteps to visit, which posterior each step takes, and the denoising loop from x_t
to x_0 (the posterior reveal, or the budgeted reveal of `reveal.py`).

The loop holds no model state: it takes the transformer as a callable and yields the token grid after every visited
timestep, so callers own progress, trajectories and decoding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from .reveal import RevealRule, budgets, call_sizes, reveal_sample, step_calls
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


# per visited step: the posterior it takes, q(x_sigma | x_tau, x_0) as (tau, sigma); None for the final step (x_0)
Levels = Sequence[tuple[int, int] | None]


def posterior_levels(
    timesteps: Sequence[int], stride_mode: str = "exact", stride: int | None = None
) -> list[tuple[int, int] | None]:
    """Which posterior each visited step takes. "exact": from t_i to the next visited t_(i+1) (the multi-step
    posterior of section 7 of the reference). "original": microsoft/VQ-Diffusion's `sample_fast`, which treats x_t
    as if it were at tau = t - skip (skip = stride - 1; tau = t where t <= skip) and takes the one-step posterior to
    tau - 1, while the network is told the true t. At a stride k that is (s + 1, s) for every step but the one to
    the added t = 0 (t = 99 mod k, a one-step posterior from t to t - 1, which leaves about two thirds of the tokens
    masked for the final step at k = 10). Without a stride (`--steps`) the skip of each step is its own gap minus
    one, so "original" is again (s + 1, s); with every timestep visited both modes are the one-step posterior."""
    levels: list[tuple[int, int] | None] = []
    for i, t in enumerate(timesteps):
        if i + 1 == len(timesteps):
            levels.append(None)
            continue
        s = timesteps[i + 1]
        if stride_mode == "exact":
            levels.append((t, s))
            continue
        skip = (stride if stride is not None else t - s) - 1
        tau = t - skip if t > skip else t
        levels.append((tau, tau - 1))
    return levels


def chain_tables(
    schedule: MaskAndReplaceSchedule, timesteps: Sequence[int], device: torch.device, levels: Levels | None = None
) -> list[StepTables]:
    """Every step's tables for a chain over `timesteps`, copied to `device` in one transfer before the first step, so
    that no step copies from the host (on a GPU each such copy waits for the work queued before it). The values are
    the schedule's own float32 tables, bit for bit. `levels` (default: exact, from each t to the next) says which
    posterior each step takes (`posterior_levels`)."""
    levels = posterior_levels(timesteps) if levels is None else levels
    rows: list[torch.Tensor] = []
    for t, level in zip(timesteps, levels, strict=True):
        if level is None:
            parts = [schedule.cumulative(t)]
        else:
            tau, s = level
            parts = [schedule.cumulative(tau), schedule.step(tau, s), schedule.cumulative(s)]
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


def x0_prediction(log_p: tuple[torch.Tensor, ...], guidance_scale: float, truncation_rate: float) -> torch.Tensor:
    """The guided (when two halves are given), truncated log p(x_0 | x_t): (B, K-1, N), dropped classes at -70."""
    log_p_x_0 = apply_guidance(log_p[0], log_p[1], guidance_scale) if len(log_p) == 2 else log_p[0]
    return truncate(log_p_x_0, truncation_rate)


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
    log_p_x_0 = x0_prediction(log_p, guidance_scale, truncation_rate)
    if tables.q_ts is None or tables.q_s is None:
        logits = log_p_x_0
    else:
        logits = posterior(log_p_x_0, x_t, tables.q_t, tables.q_ts, tables.q_s, num_classes)
    return gumbel_argmax(logits, gumbel_uniforms(logits.shape, generators, logits.device))


@dataclass(frozen=True)
class RevealPlan:
    """A batch's budgeted reveal: the rule, each step's target ratio (`reveal.reveal_ratios`) and each image's
    masked candidates at the start, from which every image's budgets and calls follow (`reveal.budgets`)."""

    rule: RevealRule
    ratios: tuple[float, ...]  # one per visited step but the last
    masked: tuple[int, ...]  # per image

    def step_calls(self) -> list[int]:
        return step_calls(self.masked, self.ratios, self.rule.per_call)

    def call_sizes(self, image: int) -> list[list[int]]:
        """Tokens image `image` reveals at each call of each step (a shorter list: none at the later calls)."""
        return [call_sizes(b, self.rule.per_call) for b in budgets(self.masked[image], self.ratios)]


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
    levels: Levels | None = None,
    reveal: RevealPlan | None = None,
) -> Iterator[torch.Tensor]:
    """Run the reverse chain over `timesteps` (descending), yielding x after each visited timestep; the last yield is
    x_0. `levels`: the posterior each step takes (`posterior_levels`; default exact); `reveal`: a budgeted reveal
    instead of the posterior at every step but the last.

    Image b draws all its noise from generators[b] and is processed alone after the network call, so an image's noise
    is the same whether it is made alone or in a batch (and on a CPU in float32 so is the image: tests/test_cli.py).
    Under a budgeted reveal an image draws only at the calls where it reveals something, so the extra calls a batch
    makes for another image's larger budget leave it as it is. The schedule's tables go to the device here, once,
    before the first step: the loop copies nothing from the host and reads nothing back (`tests/test_fast.py`
    records every op of its steps).
    """
    tables = chain_tables(schedule, timesteps, x_t.device, levels)
    params = _Params(schedule.num_classes, generators, guidance_scale, truncation_rate, known)
    if reveal is None:
        return _chain(denoiser, x_t, timesteps, tables, context, params)
    return _reveal_chain(denoiser, x_t, timesteps, tables, context, params, reveal)


@dataclass(frozen=True)
class _Params:
    num_classes: int
    generators: Sequence[torch.Generator]
    guidance_scale: float
    truncation_rate: float
    known: KnownTokens | None


def sample_batch(
    log_p: tuple[torch.Tensor, ...],
    x: torch.Tensor,
    step: StepTables,
    num_classes: int,
    guidance_scale: float,
    truncation_rate: float,
    generators: Sequence[torch.Generator],
) -> torch.Tensor:
    """`sample_step` image by image (each with its own generator): a batch's tokens equal each image's alone."""
    return torch.cat(
        [
            sample_step(
                tuple(lp[b : b + 1] for lp in log_p),
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


def _posterior_step(log_p: tuple[torch.Tensor, ...], x: torch.Tensor, step: StepTables, p: _Params) -> torch.Tensor:
    """Per image: guidance, truncation, posterior to s, Gumbel-max sample."""
    return sample_batch(log_p, x, step, p.num_classes, p.guidance_scale, p.truncation_rate, p.generators)


def _chain(
    denoiser: Denoiser,
    x_t: torch.Tensor,
    timesteps: Sequence[int],
    tables: Sequence[StepTables],
    context: TextContext,
    p: _Params,
) -> Iterator[torch.Tensor]:
    x = x_t
    for t, step in zip(timesteps, tables, strict=True):
        # 1. log p(x_0 | x_t, text) for the whole batch; 2. per image: the posterior's sample
        x = _posterior_step(model_log_p(denoiser, x, t, context), x, step, p)
        # 3. inpainting: known tokens back in place
        if p.known is not None:
            x = _impose_known(x, p.known, step, p.num_classes, p.generators)
        yield x


def _reveal_chain(
    denoiser: Denoiser,
    x_t: torch.Tensor,
    timesteps: Sequence[int],
    tables: Sequence[StepTables],
    context: TextContext,
    p: _Params,
    plan: RevealPlan,
) -> Iterator[torch.Tensor]:
    """Budgeted steps (`reveal.py`): each step's calls at the same t, then the final step's posterior sample."""
    x = x_t
    mask_id = p.num_classes - 1
    calls = plan.step_calls()
    sizes = [plan.call_sizes(b) for b in range(x.shape[0])]
    for i, (t, step) in enumerate(zip(timesteps, tables, strict=True)):
        if i == len(timesteps) - 1:
            x = _posterior_step(model_log_p(denoiser, x, t, context), x, step, p)
        for c in range(calls[i] if i < len(calls) else 0):
            log_p = model_log_p(denoiser, x, t, context)
            revealed = []
            for b in range(x.shape[0]):
                count = sizes[b][i][c] if c < len(sizes[b][i]) else 0
                x_b = x[b : b + 1]
                if count == 0:  # nothing left for this image at this step: no draw from its generator
                    revealed.append(x_b)
                    continue
                candidates = x_b == mask_id
                if p.known is not None:
                    candidates &= p.known.regenerate[b : b + 1]
                log_p_x_0 = x0_prediction(tuple(lp[b : b + 1] for lp in log_p), p.guidance_scale, p.truncation_rate)
                revealed.append(reveal_sample(log_p_x_0, x_b, candidates, count, plan.rule, p.generators[b]))
            x = torch.cat(revealed)
        if p.known is not None:
            x = _impose_known(x, p.known, step, p.num_classes, p.generators)
        yield x
