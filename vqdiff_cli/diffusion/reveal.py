"""Improved VQ-Diffusion's budgeted reveal ("high-quality" and "purity" sampling) as pure functions: how many masked
tokens each visited timestep reveals, how many network calls that takes, and which positions take which tokens.

References: Tang et al., Improved Vector Quantized Diffusion Models (arXiv 2205.16007), section 3.3 and Eq. 11;
shared/reference/vq-diffusion.md section 6.5 (what microsoft/VQ-Diffusion's `p_sample` does with `prior_rule`).

**One step** at a visited timestep t that is not the run's last (the last one draws every position from p(x_0), as
the posterior reveal does):
1. a token is drawn for every position from the (guided, truncated) x_0 prediction p; the purity reveal sharpens
   it first, p'_i(k) proportional to p_i(k) ** (1 + r s_i), with r the purity weight and s_i the purity score below;
2. only `count` of the currently masked positions, the candidates (for inpainting, never a known token), take
   their token: chosen without replacement with probability in proportion to a score (drawn as the `count` largest
   keys log(score) + Gumbel noise, which is exactly successive sampling in proportion to the score). The score is
   the purity s_i = max_k p_i(k) / max_j max_k p_j(k) for the purity reveal and 1 (uniform) for the random one.
   Unmasked tokens never change.

**Budgets.** A chain starts at t_0 with M masked candidates and visits t_0 > t_1 > ... > t_K. Under the forward
process a token masked at t_0 is still masked at s < t_0 with probability gamma-bar_s / gamma-bar_{t_0} (the mask is
absorbing), so the expected number still masked after the step from t_i is M rho_i, rho_i = gamma-bar_{t_(i+1)} /
gamma-bar_{t_0}. The step's target is m_i = floor(M rho_i + 1/2), but 0 for the last step before the final one
(nothing is left for the final step: it would draw those tokens all at once); its budget is m_(i-1) - m_i (with
m_(-1) = M). So each budget is the expected number of tokens the forward process unmasks between the step's
timestep and the next visited one, rounded so that the running total is the rounded expected total, and the
budgets sum to M: for any T, grid, `--steps`, `--stride` or start step (inpainting, variations).
For the ITHQ schedule with T = 100, the whole chain from t = 99 and a 32 x 32 grid all masked, the original's own
tables are used (`ORIGINAL_BUDGETS`): the rule above gives the same up to one token per timestep (a step holds
10.34 tokens in expectation, the tables' period-3 pattern 10.33 and its remainder at t = 99 and 98).

**Calls.** With at most n tokens per call (`--tokens-per-call`, the original's `prior_ps`), a step of budget b makes
ceil(b / n) network calls at the same t, revealing n, n, ..., and the rest; a step with nothing to reveal in the
whole batch makes none (it could change nothing); the final step makes one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

RULES = ("random", "purity")
GUMBEL_EPS = 1e-30  # the offsets of the Gumbel formula the samplers share (as diffusers writes it)
# microsoft/VQ-Diffusion's `n_sample` for T = 100 (index t; entry 0 only makes the call at t = 0, which reveals all)
ORIGINAL_BUDGETS = [1, 10] + [11, 10, 10] * 32 + [11, 11]
ORIGINAL_BUDGETS_FEW_PER_CALL = [1, 6] + [11, 10, 10] * 32 + [11, 15]  # its table for at most 10 tokens per call
ORIGINAL_GRID = 1024  # both tables sum to 32 x 32 over t = 1 .. 99
# gamma-bar of the ITHQ schedule with T = 100, by the expression `MaskAndReplaceSchedule.from_config` evaluates
ITHQ_CUMPROD_CT = np.arange(0, 100) / 99 * (0.99999 - 0.000009) + 0.000009


@dataclass(frozen=True)
class RevealRule:
    """How a budgeted step reveals: the position score, the purity weight r and the tokens per network call."""

    rule: str  # one of RULES
    weight: float = 0.0  # r; used by the purity rule only
    per_call: int | None = None  # None: the whole budget in one call

    @property
    def sharpens(self) -> bool:
        return self.rule == "purity" and self.weight > 0


# -- budgets and calls (host integers) ---------------------------------------------------------------------------


def is_original_setting(cumprod_ct: np.ndarray, timesteps: Sequence[int], num_tokens: int, masked: int) -> bool:
    """Whether a chain is the one the original's tables were written for: the ITHQ schedule, T = 100, every
    timestep from 99, and all 1024 tokens of a 32 x 32 grid masked at the start."""
    return (
        len(cumprod_ct) == 100
        and bool(np.array_equal(cumprod_ct, ITHQ_CUMPROD_CT))
        and tuple(timesteps) == tuple(range(99, -1, -1))
        and num_tokens == masked == ORIGINAL_GRID
    )


def reveal_ratios(
    cumprod_ct: np.ndarray, timesteps: Sequence[int], num_tokens: int, masked: Sequence[int], per_call: int | None
) -> tuple[float, ...]:
    """rho_i for every visited step but the last: the share of the start's masked candidates still masked after it
    (0 for the step before the last). `masked`: each image's candidates at the start (the original's tables are
    used only when every image has all 1024 masked); the targets are `still_masked(M, rho_i)`."""
    steps = len(timesteps) - 1
    if steps <= 0:
        return ()
    if all(is_original_setting(cumprod_ct, timesteps, num_tokens, m) for m in masked) and masked:
        table = ORIGINAL_BUDGETS_FEW_PER_CALL if per_call is not None and per_call <= 10 else ORIGINAL_BUDGETS
        left, ratios = ORIGINAL_GRID, []
        for t in timesteps[:-1]:
            left -= table[t]
            ratios.append(left / ORIGINAL_GRID)  # dyadic: M * rho is exact, and so is the target
        return tuple(ratios)
    top = float(cumprod_ct[timesteps[0]])
    return tuple([float(cumprod_ct[s]) / top for s in timesteps[1:-1]] + [0.0])


def still_masked(masked: int, ratio: float) -> int:
    """The target floor(M rho + 1/2), in float64 exactly as the fast sampler computes it on the device."""
    return math.floor(float(masked) * ratio + 0.5)


def budgets(masked: int, ratios: Sequence[float]) -> list[int]:
    """Tokens each step reveals for an image that starts with `masked` candidates; they sum to `masked`."""
    targets = [masked] + [still_masked(masked, r) for r in ratios]
    return [targets[i] - targets[i + 1] for i in range(len(ratios))]


def call_sizes(budget: int, per_call: int | None) -> list[int]:
    """How many tokens each network call of a step reveals: [n, n, ..., rest]; none for a budget of 0."""
    if budget <= 0:
        return []
    if per_call is None or per_call >= budget:
        return [budget]
    return [per_call] * (budget // per_call) + ([budget % per_call] if budget % per_call else [])


def step_calls(masked: Sequence[int], ratios: Sequence[float], per_call: int | None) -> list[int]:
    """Network calls of each step but the last for a batch: the most any of its images needs."""
    per_image = [[len(call_sizes(b, per_call)) for b in budgets(m, ratios)] for m in masked]
    return [max(calls) for calls in zip(*per_image, strict=True)] if per_image else [0] * len(ratios)


def network_calls(num_timesteps: int, masked: Sequence[int], ratios: Sequence[float], per_call: int | None) -> int:
    """Network calls of a budgeted chain over `num_timesteps` visited timesteps (each call runs the whole batch)."""
    return sum(step_calls(masked, ratios, per_call)) + (1 if num_timesteps else 0)


# -- which positions take which tokens (device tensors) ----------------------------------------------------------


def gumbel(u: torch.Tensor) -> torch.Tensor:
    """Gumbel noise from uniforms in [0, 1), with the samplers' offsets (finite even for u = 0)."""
    return -torch.log(-torch.log(u + GUMBEL_EPS) + GUMBEL_EPS)


def purity(max_prob: torch.Tensor) -> torch.Tensor:
    """(B, N) max_k p(x_0 = k) per position -> the purity score, divided by its maximum over the image."""
    return max_prob / max_prob.amax(dim=-1, keepdim=True)


def choose_positions(keys: torch.Tensor, candidates: torch.Tensor, count: torch.Tensor | int) -> torch.Tensor:
    """(B, N) bool: the `count` candidates (per image: a (B,) tensor, or one int) with the largest keys.

    A rank per position from one sort, compared with the count: no data-dependent shape, no read on the host.
    The count never exceeds an image's candidates, whose keys are finite, so exactly `count` are chosen.
    """
    keys = torch.where(candidates, keys, -torch.inf)
    order = keys.argsort(dim=-1, descending=True)
    positions = torch.arange(keys.shape[-1], device=keys.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)
    limit = count.unsqueeze(-1) if isinstance(count, torch.Tensor) else count
    return candidates & (rank < limit)


def reveal_sample(
    log_p_x_0: torch.Tensor,
    x_t: torch.Tensor,
    candidates: torch.Tensor,
    count: int,
    reveal: RevealRule,
    generator: torch.Generator,
) -> torch.Tensor:
    """The reference sampler's budgeted step for one image: (1, K-1, N) guided, truncated log p(x_0), (1, N) ids and
    candidates -> (1, N) ids. Two draws from the image's generator: a `torch.rand` of (1, K-1, N) for the tokens
    (Gumbel-max), then one of (1, N) for the positions."""
    score = purity(log_p_x_0.amax(dim=1).exp()) if reveal.rule == "purity" else None
    logits = log_p_x_0
    if reveal.sharpens and score is not None:
        logits = log_p_x_0 * (1 + reveal.weight * score).unsqueeze(1)  # softmax of it: p ** (1 + r s), normalised
    device = log_p_x_0.device
    u_tokens = torch.rand(logits.shape, generator=generator, device=device)
    tokens = (logits + gumbel(u_tokens)).argmax(dim=1)
    keys = gumbel(torch.rand(x_t.shape, generator=generator, device=device))
    if score is not None:
        keys = keys + score.log()
    return torch.where(choose_positions(keys, candidates, count), tokens, x_t)
