"""The fast sampler: the reverse process of `sampler.denoise`, batched, sampled per column in closed form.

`sampler.denoise` follows diffusers op for op (bit-identical on CPU float32). This module samples from the same
distributions with far less work; each change and why it keeps the distribution (shared/reference/vq-diffusion.md
sections 5.6, 5.9 and 7 give diffusers' formulas):

1. **Guidance on raw scores, in float32.** `log_softmax(u) + s (log_softmax(c) - log_softmax(u))`, renormalised, equals
   `log_softmax(u + s (c - u))`: the two log-normalisers are a per-column constant. So the network returns raw
   scores in its own dtype and one float32 expression replaces two float64 log-softmaxes and a logsumexp. float64
   bought nothing: the scores are already rounded to the network's dtype (bf16/fp16 on a GPU), and a float32
   softmax of them is exact to about 1e-7 relative, far below that rounding.
2. **Truncation at rate 1.0 is skipped.** diffusers' float32 cumulative sum reaches 1.0 before the last classes and
   cuts a tail of total mass below 3e-8; keeping it is the exact rate-1.0 distribution. Below 1.0 the same rule
   (keep a class while the mass ranked above it is below the rate) runs with one sort and a float64 cumulative sum.
3. **The posterior per column, in closed form.** diffusers builds (B, K, N) tensors (one-hot, transition rows,
   posterior) per step. Per column the posterior reduces to a few scalars (`sample_columns`): a masked token stays
   masked with probability gamma-bar_s / gamma-bar_t, otherwise it takes a class from
   alpha-bar_s p(x_0) + beta-bar_s; an unmasked token j keeps j unless a rare replacement (weight beta_{t|s}) happens.
   Terms diffusers carries at log(1e-30) (the one-hot floor, the mask row of an unmasked column) are exactly 0 here;
   they are below anything a float32 Gumbel draw can pick.
4. **Inverse-CDF sampling in float64.** A class is drawn with one uniform per column against a float64 cumulative
   sum, instead of 4096 Gumbel variables per column: exact up to float64 rounding, and no (B, N, K) noise tensor.
5. **Counter-based noise** (`streams.py`): per-image uniforms from (seed, timestep, column), all images in one
   expression, no generator state, no host synchronisation.

The budgeted reveal (`reveal.py`) runs here too, on the same weights: the purity score is 1 / (sum of the guided
weights), whose largest entry is 1; the sharpened class is drawn by inverse CDF of weights ** (1 + r s), the
positions as the `count` largest keys log(score) + Gumbel noise among the candidates. Each call's count is found on
the device from the candidates still masked and the step's target (the plan's ratio times the image's masked
candidates at the start, rounded exactly as the host rounds it), so the loop never reads it back.

What is the same alone or in a batch: an image's noise, always and on any device. Its tokens, bit for bit, on a CPU
in float32 (every op treats an image of a batch on its own; `tests/test_fast.py` checks it). On a GPU only for the
same batch size: cuBLAS picks its GEMM kernels by problem size, so an image's float16 (or bfloat16, or float32)
scores differ in their last bits between batch sizes, an inverse-CDF boundary moves, a token flips and the chain
diverges. The PNG metadata records each image's batch; `generate --from-image --same-batch` re-runs it in that batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from .reveal import RevealRule, choose_positions, gumbel, purity
from .sampler import KnownTokens, Levels, RevealPlan, posterior_levels
from .schedule import MaskAndReplaceSchedule
from .streams import uniforms

# Per-step coefficients (float64), by index into one row of `FastPlan.coef`.
P_STAY = 0  # a masked token stays masked: gamma-bar_s / (gamma-bar_s + gamma_{t|s} (alpha-bar_s + n beta-bar_s))
P_MODEL = 1  # a token leaving the mask comes from p(x_0) (else uniform): alpha-bar_s / (alpha-bar_s + n beta-bar_s)
A_T, B_T = 2, 3  # alpha-bar_t, beta-bar_t: q(x_t = j | x_0 = j) = A_T + B_T, q(x_t = j | x_0 = k != j) = B_T
A_S, B_S = 4, 5  # alpha-bar_s, beta-bar_s
KEEP, BETA = 6, 7  # q(x_t = j | x_s = j) = alpha_{t|s} + beta_{t|s}; q(x_t = j | x_s = k != j) = beta_{t|s}
G_S = 8  # gamma-bar_s, for re-noising known tokens
RATIO = 9  # budgeted reveal: the share of the start's masked candidates still masked after this step
HOLD_KNOWN = 10  # budgeted reveal: 1 for a call that does not end its timestep (known tokens are left as they are)
NUM_COEF = 11

DRAWS = 4  # uniforms per column and step: move?, from the model?, which class (model), which class (uniform)
RENOISE_SALT = 1  # the re-noising stream of a step is salt + 1 (steps use even salts)
START_SALT = -1  # the stream of an edit's start draw (steps use salts 2t and 2t + 1, never negative)
CALL_SALT = 1 << 20  # call c of a budgeted step at t draws from salt 2t + c * CALL_SALT (even, as every step's)


def step_coefficients(schedule: MaskAndReplaceSchedule, t: int, s: int | None) -> list[float]:
    """The float64 scalars of the step from t to s (all zero for the final step to x_0, which needs none)."""
    if s is None:
        return [0.0] * NUM_COEF
    n = schedule.num_classes - 1
    a_t, c_t = float(schedule.cumprod_at[t]), float(schedule.cumprod_ct[t])
    a_s, c_s = float(schedule.cumprod_at[s]), float(schedule.cumprod_ct[s])
    b_t, b_s = (1 - a_t - c_t) / n, (1 - a_s - c_s) / n
    alpha = a_t / a_s  # the multi-step transition t|s, as MaskAndReplaceSchedule.step computes it
    gamma = 1 - (1 - c_t) / (1 - c_s)
    beta = max(0.0, (1 - alpha - gamma) / n)
    coef = [0.0] * NUM_COEF
    coef[P_STAY] = c_s / (c_s + gamma * (a_s + n * b_s))
    coef[P_MODEL] = a_s / (a_s + n * b_s)
    coef[A_T], coef[B_T], coef[A_S], coef[B_S] = a_t, b_t, a_s, b_s
    coef[KEEP], coef[BETA], coef[G_S] = alpha + beta, beta, c_s
    return coef


@dataclass(frozen=True)
class FastPlan:
    """Everything the loop needs per network call, on the device up front, so that no call copies from the host."""

    timesteps: tuple[int, ...]  # the visited timesteps
    t: torch.Tensor  # (C,) int64: the network's timestep at each call
    coef: torch.Tensor  # (C, NUM_COEF) float64
    salt: torch.Tensor  # (C,) int64: the noise stream of each call
    calls: tuple[int, ...] = ()  # network calls per visited timestep (default: one each)

    def __post_init__(self) -> None:
        if not self.calls:
            object.__setattr__(self, "calls", (1,) * len(self.timesteps))

    @classmethod
    def build(
        cls,
        schedule: MaskAndReplaceSchedule,
        timesteps: Sequence[int],
        device: torch.device,
        levels: Levels | None = None,
        reveal: RevealPlan | None = None,
    ) -> FastPlan:
        """The posterior each step takes (`levels`, default exact), or a budgeted reveal's calls."""
        levels = posterior_levels(timesteps) if levels is None else levels
        targets: list[int | None] = [*timesteps[1:], None]
        per_step = reveal.step_calls() if reveal is not None else [1] * (len(timesteps) - 1)
        rows: list[tuple[int, list[float], int]] = []  # (t, coefficients, salt) per call
        for i, t in enumerate(timesteps):
            if i + 1 == len(timesteps):
                rows.append((t, step_coefficients(schedule, t, None), 2 * t))
            elif reveal is None:
                level = levels[i]
                assert level is not None
                rows.append((t, step_coefficients(schedule, *level), 2 * t))
            for c in range(per_step[i] if reveal is not None and i + 1 < len(timesteps) else 0):
                assert reveal is not None
                coef = step_coefficients(schedule, t, targets[i])  # the level s, for re-noising known tokens
                coef[RATIO] = reveal.ratios[i]
                coef[HOLD_KNOWN] = 1.0 if c + 1 < per_step[i] else 0.0
                rows.append((t, coef, 2 * t + c * CALL_SALT))
        calls = tuple(per_step[: len(timesteps) - 1]) + ((1,) if timesteps else ())
        return cls(
            tuple(timesteps),
            torch.tensor([t for t, _, _ in rows], dtype=torch.long, device=device),
            torch.tensor([c for _, c, _ in rows], dtype=torch.float64, device=device).view(len(rows), NUM_COEF),
            torch.tensor([salt for _, _, salt in rows], dtype=torch.long, device=device),
            calls if reveal is not None else (),
        )


# -- the per-step math: pure functions --------------------------------------------------------------------------


def guided_weights(logits: torch.Tensor, guidance_scale: float | None) -> torch.Tensor:
    """(2B or B, N, n) raw scores (unconditional half first) -> (B, N, n) float32 p(x_0) up to a per-column factor."""
    if guidance_scale is None:
        z = logits.float()
    else:
        uncond, cond = logits.chunk(2)
        z = torch.lerp(uncond.float(), cond.float(), guidance_scale)  # u + s (c - u)
    return (z - z.amax(dim=-1, keepdim=True)).exp_()


def truncate_weights(weights: torch.Tensor, rate: float) -> torch.Tensor:
    """Zero every class ranked below the smallest top set holding `rate` of the mass (the top class always stays)."""
    ranked, order = weights.sort(dim=-1, descending=True, stable=True)
    cum = ranked.cumsum(dim=-1, dtype=torch.float64)
    keep_ranked = (cum - ranked) < rate * cum[..., -1:]  # mass ranked above the class is below the rate
    keep = torch.empty_like(keep_ranked).scatter_(-1, order, keep_ranked)
    return weights.masked_fill(~keep, 0.0)


def _invert_cdf(cdf: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The class whose cdf interval holds `target` (B, N); classes of zero weight are never returned."""
    total = cdf[..., -1]
    target = torch.minimum(target, torch.nextafter(total, torch.zeros_like(total)))  # strictly below the total
    index = torch.searchsorted(cdf, target.unsqueeze(-1), right=True).squeeze(-1)
    return index.clamp_(max=cdf.shape[-1] - 1)


def sample_columns(
    weights: torch.Tensor, x_t: torch.Tensor, coef: torch.Tensor, u: torch.Tensor, final: bool
) -> torch.Tensor:
    """Draw x_s ~ p(x_s | x_t) per column (or x_0 ~ p(x_0 | x_t) when `final`): (B, N) ids -> (B, N) ids.

    weights: (B, N, n) unnormalised p(x_0 | x_t), zero where truncated; coef: one row of the plan; u: (B, N, DRAWS)
    float64 uniforms. With p the normalised weights, the posterior of diffusers' q_posterior is, per column:
    * x_t = mask: mask with weight gamma-bar_s; class k with weight gamma_{t|s} (alpha-bar_s p_k + beta-bar_s).
    * x_t = j: with r_k proportional to p_k / q(x_t = j | x_0 = k) (that is p_j / (A_T + B_T) for k = j and
      p_k / B_T for the others), class k has weight (alpha-bar_s r_k + beta-bar_s) q(x_t = j | x_s = k):
      KEEP for k = j, BETA for every other class, 0 for the mask (which is absorbing). Given that the token moves,
      the new class is from r restricted to k != j (that is p restricted to k != j) or uniform over the others.
    Each branch is drawn with its own uniform: whether the token moves, whether the new class comes from p or from
    the uniform part, then the class itself (by inverse CDF, skipping j's interval when j may not be drawn).
    """
    n = weights.shape[-1]
    cdf = weights.cumsum(dim=-1, dtype=torch.float64)  # (B, N, n)
    total = cdf[..., -1]
    if final:  # x_0 ~ p(x_0 | x_t) for every column, as diffusers' last step
        return _invert_cdf(cdf, u[..., 2] * total)
    c = coef.unbind()
    masked = x_t == n
    j = x_t.clamp(max=n - 1).unsqueeze(-1)
    w_j = weights.gather(-1, j).squeeze(-1).double()
    below = cdf.gather(-1, (j - 1).clamp_(min=0)).squeeze(-1)
    before_j = torch.where(j.squeeze(-1) == 0, 0.0, below)  # mass of the classes below j, exactly as in the cdf
    rest = total - w_j  # mass of the classes other than j
    den = w_j * c[B_T] + rest * (c[A_T] + c[B_T])
    r_j = w_j * c[B_T] / den
    r_rest = rest * (c[A_T] + c[B_T]) / den  # 1 - r_j without cancellation
    model_rest = c[A_S] * r_rest  # weight of "another class, from p" (times BETA)
    uniform_rest = (n - 1) * c[B_S]  # weight of "another class, uniformly" (times BETA)
    w_keep = (c[A_S] * r_j + c[B_S]) * c[KEEP]
    w_move = c[BETA] * (model_rest + uniform_rest)
    moves = torch.where(masked, u[..., 0] >= c[P_STAY], u[..., 0] * (w_keep + w_move) < w_move)
    from_model = torch.where(masked, u[..., 1] < c[P_MODEL], u[..., 1] * (model_rest + uniform_rest) < model_rest)
    # the model's class: any class for a masked column, any but j for an unmasked one (j's interval is skipped)
    target = u[..., 2] * torch.where(masked, total, rest)
    target = torch.where(~masked & (target >= before_j), target + w_j, target)
    model_class = _invert_cdf(cdf, target)
    # the uniform class: one of n for a masked column, one of the n - 1 others for an unmasked one
    others = torch.where(masked, n, n - 1)
    uniform_class = (u[..., 3] * others).long().clamp_(max=n - 1)
    uniform_class = uniform_class + (~masked & (uniform_class >= x_t)).long()
    new = torch.where(from_model, model_class, uniform_class)
    return torch.where(moves, new, x_t)


def reveal_columns(
    weights: torch.Tensor,
    x_t: torch.Tensor,
    candidates: torch.Tensor,
    count: torch.Tensor,
    score: torch.Tensor | None,
    sharpen: float,
    u: torch.Tensor,
) -> torch.Tensor:
    """A budgeted step: `count` (B,) of the candidates (B, N) take a token of the (truncated) weights (B, N, n),
    sharpened to weights ** (1 + sharpen * score) when `sharpen` > 0, chosen in proportion to `score` (B, N)
    (uniformly when None); the other positions keep x_t. u: (B, N, DRAWS) (the positions' keys use u[..., 0], the
    classes u[..., 2])."""
    w = weights.double()
    if score is not None and sharpen > 0:
        w = w.pow((1 + sharpen * score).unsqueeze(-1))
    cdf = w.cumsum(dim=-1)
    tokens = _invert_cdf(cdf, u[..., 2] * cdf[..., -1])
    keys = gumbel(u[..., 0]) if score is None else gumbel(u[..., 0]) + score.log()
    return torch.where(choose_positions(keys, candidates, count), tokens, x_t)


def reveal_count(
    candidates: torch.Tensor, masked0: torch.Tensor, coef: torch.Tensor, per_call: int | None
) -> torch.Tensor:
    """(B,) tokens this call reveals: what is left above the step's target floor(M rho + 1/2), at most `per_call`."""
    target = torch.floor(masked0.double() * coef[RATIO] + 0.5).long()
    left = candidates.sum(dim=-1) - target
    return left.clamp(min=0, max=per_call if per_call is not None else candidates.shape[-1])


def q_sample_columns(x_0: torch.Tensor, coef: torch.Tensor, u: torch.Tensor, num_codes: int) -> torch.Tensor:
    """x_s ~ q(x_s | x_0) for (B, N) ids: the mask with gamma-bar_s, x_0 with alpha-bar_s, else a uniform class."""
    c = coef.unbind()
    uniform_class = (u[..., 1] * num_codes).long().clamp_(max=num_codes - 1)
    kept = torch.where(u[..., 0] < c[G_S] + c[A_S], x_0, uniform_class)
    return torch.where(u[..., 0] < c[G_S], num_codes, kept)


def q_sample_start(x_0: torch.Tensor, schedule: MaskAndReplaceSchedule, t: int, words: torch.Tensor) -> torch.Tensor:
    """x_t ~ q(x_t | x_0) for (B, N) ids, drawn from the images' streams (B, 2 seed words): where an edit starts,
    the same alone or in a batch and on any device, like the rest of the fast sampler's draws."""
    coef = torch.zeros(NUM_COEF, dtype=torch.float64, device=x_0.device)
    coef[G_S], coef[A_S] = float(schedule.cumprod_ct[t]), float(schedule.cumprod_at[t])
    salt = torch.tensor(START_SALT, dtype=torch.long, device=x_0.device)
    u = uniforms(words, salt, (x_0.shape[1], 2))
    return q_sample_columns(x_0, coef, u, schedule.num_classes - 1)


def fast_step(
    logits: torch.Tensor,
    x_t: torch.Tensor,
    coef: torch.Tensor,
    words: torch.Tensor,
    salt: torch.Tensor,
    guidance_scale: float | None,
    truncation_rate: float,
    final: bool,
    reveal: RevealRule | None = None,
    masked0: torch.Tensor | None = None,
    regenerate: torch.Tensor | None = None,
) -> torch.Tensor:
    """Guidance, truncation, posterior and sample for a batch: raw scores (2B or B, N, n), x_t (B, N) -> (B, N).

    With `reveal` every step but the final one is a budgeted call instead (`masked0`: (B,) each image's candidates
    at the start; `regenerate`: (B, N) the positions inpainting may reveal, None for all)."""
    weights = guided_weights(logits, guidance_scale)
    u = uniforms(words, salt, (x_t.shape[1], DRAWS))
    if reveal is not None and not final:
        assert masked0 is not None
        score = purity(1 / weights.sum(dim=-1, dtype=torch.float64)) if reveal.rule == "purity" else None
        if truncation_rate < 1.0:
            weights = truncate_weights(weights, truncation_rate)
        candidates = x_t == weights.shape[-1]
        if regenerate is not None:
            candidates = candidates & regenerate
        count = reveal_count(candidates, masked0, coef, reveal.per_call)
        return reveal_columns(weights, x_t, candidates, count, score, reveal.weight, u)
    if truncation_rate < 1.0:
        weights = truncate_weights(weights, truncation_rate)
    return sample_columns(weights, x_t, coef, u, final)


def impose_known(
    x: torch.Tensor,
    known: KnownTokens,
    coef: torch.Tensor,
    words: torch.Tensor,
    salt: torch.Tensor,
    final: bool,
    num_codes: int,
) -> torch.Tensor:
    """Inpainting: known tokens back in place, or re-noised to the new level s when `known.renoise`."""
    source = known.tokens
    if known.renoise and not final:
        u = uniforms(words, salt + RENOISE_SALT, (x.shape[1], 2))
        source = q_sample_columns(known.tokens, coef, u, num_codes)
    return torch.where(known.regenerate, x, source)


# -- the loop ---------------------------------------------------------------------------------------------------

# (x (B or 2B, N) ids, t 0-dim int64 tensor) -> raw scores (B or 2B, N, n)
LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class FastStep(Protocol):
    """One whole step (network call and sampling): (x_t, t, coef, salt) -> x_s, every input a device tensor."""

    def __call__(
        self, x: torch.Tensor, t: torch.Tensor, coef: torch.Tensor, salt: torch.Tensor, final: bool
    ) -> torch.Tensor: ...


def make_step(
    logits_fn: LogitsFn,
    words: torch.Tensor,
    guidance_scale: float | None,
    truncation_rate: float,
    num_codes: int,
    known: KnownTokens | None = None,
    step_math: Callable[..., torch.Tensor] = fast_step,
    reveal: RevealRule | None = None,
    masked0: torch.Tensor | None = None,
) -> FastStep:
    """Bind the network and the batch's fixed inputs (seed words, known tokens, masked candidates at the start of a
    budgeted reveal) into one step function.

    `guidance_scale` None means no guidance: the network sees x once, not [x, x] with the unconditional half first.
    `step_math` is `fast_step` or a compiled version of it.
    """
    regenerate = known.regenerate if known is not None else None

    def step(x: torch.Tensor, t: torch.Tensor, coef: torch.Tensor, salt: torch.Tensor, final: bool) -> torch.Tensor:
        logits = logits_fn(x if guidance_scale is None else torch.cat([x, x]), t)
        if reveal is None:
            x_s = step_math(logits, x, coef, words, salt, guidance_scale, truncation_rate, final)
        else:
            x_s = step_math(
                logits, x, coef, words, salt, guidance_scale, truncation_rate, final, reveal, masked0, regenerate
            )
        if known is not None:
            imposed = impose_known(x_s, known, coef, words, salt, final, num_codes)
            x_s = imposed if reveal is None or final else torch.where(coef[HOLD_KNOWN] > 0, x_s, imposed)
        return x_s

    return step


def denoise_fast(step: FastStep, x_t: torch.Tensor, plan: FastPlan) -> Iterator[torch.Tensor]:
    """Run the reverse chain of `plan`, yielding x after each visited timestep (after all its calls); the last yield
    is x_0.

    Nothing in the loop reads a device value on the host or copies one to the device (the plan is on the device
    already), so a GPU never waits for Python; `tests/test_fast.py` checks this op by op.
    """
    x = x_t
    last = len(plan.t) - 1
    i = 0
    for calls in plan.calls:
        for _ in range(calls):
            x = step(x, plan.t[i], plan.coef[i], plan.salt[i], i == last)
            i += 1
        yield x
