"""The mask-and-replace math on its own: timestep plans, the exact strided posterior, the masking rate.

The transitions and both samplers' strided posteriors are checked against the chain written out as K x K matrices
(tests/markov.py): one-step matrices from diffusers' schedule functions, composed, and Bayes' rule term by term.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from vqdiff_cli.config import SchedulerConfig
from vqdiff_cli.diffusion.fast import (
    A_S,
    A_T,
    B_S,
    B_T,
    BETA,
    G_S,
    KEEP,
    P_MODEL,
    P_STAY,
    sample_columns,
    step_coefficients,
)
from vqdiff_cli.diffusion.sampler import KnownTokens, TextContext, denoise, q_sample
from vqdiff_cli.diffusion.schedule import MaskAndReplaceSchedule, q_posterior, truncate
from vqdiff_cli.options import plan_timesteps

from .markov import Chain

ITHQ = MaskAndReplaceSchedule.from_config(SchedulerConfig(num_vec_classes=4097, num_train_timesteps=100))


def test_plan_every_timestep():
    assert plan_timesteps(99) == tuple(range(99, -1, -1))
    assert plan_timesteps(99, steps=100) == tuple(range(99, -1, -1))
    assert plan_timesteps(99, stride=1) == tuple(range(99, -1, -1))


def test_plan_even_spread():
    assert plan_timesteps(99, steps=1) == (99,)
    assert plan_timesteps(99, steps=2) == (99, 0)
    assert plan_timesteps(99, steps=12) == tuple(range(99, -1, -9))
    assert plan_timesteps(99, stride=9) == plan_timesteps(99, steps=12)
    assert plan_timesteps(99, stride=33) == (99, 66, 33, 0)
    assert plan_timesteps(99, stride=10) == (99, 89, 79, 69, 59, 49, 39, 29, 19, 9, 0)
    for n in range(1, 101):
        ts = plan_timesteps(99, steps=n)
        assert len(ts) == n
        assert ts[0] == 99
        assert n == 1 or ts[-1] == 0
        assert all(a > b for a, b in itertools.pairwise(ts))


@pytest.mark.parametrize(("steps", "stride"), [(0, None), (101, None), (None, 0), (3, 3)])
def test_plan_rejects(steps, stride):
    with pytest.raises(ValueError, match=r"steps|stride"):
        plan_timesteps(99, steps=steps, stride=stride)


# -- the strided posterior against the chain written out as matrices (tests/markov.py) ---------------------------

K_SMALL = 9  # 8 codes + the mask: alpha and gamma do not depend on K, so the small chain has ITHQ's schedule
NOISY_CFG = SchedulerConfig(  # a large uniform-replacement share, so the beta terms matter
    num_vec_classes=K_SMALL,
    num_train_timesteps=20,
    alpha_cum_start=0.9,
    alpha_cum_end=0.01,
    gamma_cum_start=0.02,
    gamma_cum_end=0.95,
)
ITHQ_CFG = SchedulerConfig(num_vec_classes=K_SMALL, num_train_timesteps=100)
JUMPS = [
    (NOISY_CFG, [(10, 9), (15, 5), (19, 0), (1, 0), (7, 3)]),
    (ITHQ_CFG, [(99, 98), (40, 10), (99, 0), (1, 0), (60, 45)]),
]
CASES = [(cfg, t, s) for cfg, pairs in JUMPS for t, s in pairs]
CASE_IDS = [f"{'noisy' if cfg is NOISY_CFG else 'ithq'}-{t}-{s}" for cfg, t, s in CASES]


@pytest.mark.parametrize("cfg", [NOISY_CFG, ITHQ_CFG], ids=["noisy", "ithq"])
def test_transitions_are_products_of_one_step_matrices(cfg):
    """q(x_t | x_0) and q(x_t | x_s) of the schedule equal products of one-step matrices, to float32 rounding of
    their logs (the tables are float32 logs of float64 values, as in diffusers: relative error about 1e-7)."""
    schedule = MaskAndReplaceSchedule.from_config(cfg)
    chain = Chain(cfg)
    mask = K_SMALL - 1

    def entries(tr):  # stay, move to one other code, mask: what the three logs say
        a, b, c = (v.double().exp().item() for v in (tr.log_a, tr.log_b, tr.log_c))
        return np.array([a + b, b, c])

    for t in range(cfg.num_train_timesteps):
        q = chain.cumulative(t)
        np.testing.assert_allclose(entries(schedule.cumulative(t)), [q[0, 0], q[0, 1], q[0, mask]], rtol=1e-6)
    for t, s in [(u, u - 1) for u in range(1, cfg.num_train_timesteps)] + [(19, 0), (15, 5), (12, 11)]:
        q = chain.jump(t, s)
        np.testing.assert_allclose(entries(schedule.step(t, s)), [q[0, 0], q[0, 1], q[0, mask]], rtol=1e-6)


def _column_inputs(seed: int, truncated: bool):
    """Random p(x_0 | x_t) (B=1, K-1, N=K), one column per x_t = 0 .. K-1; optionally with classes cut to zero."""
    g = torch.Generator().manual_seed(seed)
    log_p = torch.log_softmax(torch.randn(1, K_SMALL - 1, K_SMALL, generator=g, dtype=torch.float64) * 2, dim=1)
    if truncated:
        log_p = truncate(log_p.float(), 0.7).double()
        log_p = log_p.masked_fill(log_p <= -70, -torch.inf).log_softmax(dim=1)
    return log_p, torch.arange(K_SMALL).view(1, -1)


@pytest.mark.parametrize(("cfg", "t", "s"), CASES, ids=CASE_IDS)
def test_strided_posterior_is_bayes_rule_over_the_composed_chain(cfg, t, s):
    """q_posterior(t -> s) is sum over x_0 of p(x_0) q(x_t|x_s) q(x_s|x_0) / q(x_t|x_0), computed here term by term
    from the one-step matrices. Tolerance: relative 1e-5 (measured: at most 2.3e-6; the float32 log tables and the
    float32 posterior carry about 1e-7 relative per operation), and 1e-20 where the true value is exactly 0 (an
    unmasked x_t never came from the mask): diffusers' log one-hot floor log(1e-30) leaves at most 1e-30 times the
    normaliser there (measured: below 1e-23)."""
    schedule = MaskAndReplaceSchedule.from_config(cfg)
    chain = Chain(cfg)
    log_p, x_t = _column_inputs(t + 100 * s, truncated=False)
    ours = q_posterior(log_p.float(), x_t, schedule, t, s)[0].double().exp().numpy()  # (K, N): not normalised
    for column in range(K_SMALL):
        expected = chain.posterior(log_p[0, :, column].exp().numpy(), column, t, s)
        assert expected.sum() == pytest.approx(1.0, abs=1e-12)
        got = ours[:, column]
        zero = expected == 0
        assert (zero == (np.arange(K_SMALL) == K_SMALL - 1)).all() or column == K_SMALL - 1
        np.testing.assert_allclose(got[~zero], expected[~zero], rtol=1e-5, err_msg=f"x_t = {column}")
        assert (got[zero] < 1e-20).all()


def _single_switch(predicate, shape: tuple[int, ...], iterations: int = 80) -> torch.Tensor:
    """Switch points of predicates on u in [0, 1) that are True on [0, edge) and False on [edge, 1), by bisection
    (to float64 resolution): predicate maps u of `shape` to bool of `shape`."""
    lo = torch.zeros(shape, dtype=torch.float64)
    hi = torch.ones(shape, dtype=torch.float64)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        below = predicate(mid)
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    return torch.where(predicate(lo), hi, 0.0)  # false from the start: an empty interval


def fast_law(weights: torch.Tensor, x_t: torch.Tensor, coef: torch.Tensor, final: bool) -> np.ndarray:
    """The exact distributions `sample_columns` draws from, read off the function itself: (N, n) weights and (N,)
    ids x_t -> (N, K) float64.

    It spends one uniform per decision: u0 whether the token moves, u1 whether the new class comes from the model or
    from the uniform part, u2 the model's class (inverse CDF), u3 the uniform class. Each decision switches once in
    its uniform, so each probability is the length of an interval, found by bisection.
    """
    cols, n = weights.shape
    weights = weights.to(torch.float64)

    def draw(u0, u1, u2, u3):  # each (cols,) or (cols, m) or a float -> (cols, m) classes
        parts = [torch.as_tensor(v, dtype=torch.float64) for v in (u0, u1, u2, u3)]
        parts = [v.view(cols, -1) if v.ndim else v.expand(cols, 1) for v in parts]
        m = max(v.shape[1] for v in parts)
        u = torch.stack([v.expand(cols, m) for v in parts], -1).reshape(1, cols * m, 4)
        w = weights.repeat_interleave(m, 0)[None]
        out = sample_columns(w, x_t.repeat_interleave(m)[None], coef, u, final)
        return out.view(cols, m)

    def class_law(sweep) -> torch.Tensor:  # sweep((cols, n) u) -> classes rising with u; -> (cols, n)
        edges = _single_switch(lambda u: sweep(u) < torch.arange(1, n + 1), (cols, n))  # |{u: class < k + 1}|
        return torch.diff(edges, dim=1, prepend=torch.zeros(cols, 1, dtype=torch.float64))

    law = torch.zeros(cols, n + 1, dtype=torch.float64)
    if final:
        law[:, :n] = class_law(lambda u: draw(0.5, 0.5, u, 0.5))
        return law.numpy()

    def interval(predicate):  # predicate((cols,) u) -> (cols,) bool, one switch: where it is true, and its length
        at_0 = predicate(torch.zeros(cols, dtype=torch.float64))
        edge = _single_switch(lambda u: predicate(u) == at_0, (cols,))
        inside = torch.where(at_0, edge / 2, (1 + edge) / 2)
        outside = torch.where(at_0, (1 + edge) / 2, edge / 2)
        return torch.where(at_0, edge, 1 - edge), inside, outside

    p_move, u0, _ = interval(lambda u: draw(u, 0.5, 0.5, 0.5)[:, 0] != x_t)
    high = 1 - 2**-40  # the last uniform class, where 0.0 gives the first: they differ, the model's class does not
    p_model, u1_model, u1_uniform = interval(lambda u: (draw(u0, u, 0.5, 0.0) == draw(u0, u, 0.5, high))[:, 0])
    law[:, :n] = p_model[:, None] * class_law(lambda u: draw(u0, u1_model, u, 0.5))
    law[:, :n] += (1 - p_model[:, None]) * class_law(lambda u: draw(u0, u1_uniform, 0.5, u))
    law *= p_move[:, None]
    law[torch.arange(cols), x_t] = 1 - p_move
    return law.numpy()


@pytest.mark.parametrize("truncated", [False, True], ids=["full", "truncated"])
@pytest.mark.parametrize(("cfg", "t", "s"), CASES, ids=CASE_IDS)
def test_fast_posterior_is_bayes_rule_to_float64_precision(cfg, t, s, truncated):
    """The fast sampler's per-column law (step coefficients + `sample_columns`, float64) against Bayes' rule on the
    composed matrices, to float64 precision: relative 1e-12 on the noisy schedule (measured: 2.4e-14; bisection
    resolves each interval to about 1e-16). Under ITHQ's schedule alpha-bar + gamma-bar = 0.999999, so
    beta-bar = (1 - alpha-bar - gamma-bar) / n cancels six of float64's sixteen digits in any computation of it
    (ours, and the matrices' one-step betas): relative 5e-9 there (measured: 5.7e-10). The weights are scaled by
    3.7: `sample_columns` takes them unnormalised."""
    schedule = MaskAndReplaceSchedule.from_config(cfg)
    chain = Chain(cfg)
    log_p, x_t = _column_inputs(t + 100 * s + 7, truncated)
    p = log_p[0].T.exp()  # (N = K columns, n)
    coef = torch.tensor(step_coefficients(schedule, t, s), dtype=torch.float64)
    got = fast_law(3.7 * p, x_t[0], coef, final=False)
    rtol = 1e-12 if cfg is NOISY_CFG else 5e-9
    for column in range(K_SMALL):
        expected = chain.posterior(p[column].numpy(), column, t, s)
        np.testing.assert_allclose(got[column], expected, rtol=rtol, atol=1e-15, err_msg=f"x_t = {column}")
        assert (got[column][expected == 0] == 0).all()


def test_fast_final_step_draws_from_p_x0():
    log_p, x_t = _column_inputs(5, truncated=True)
    p = log_p[0].T.exp()
    coef = torch.tensor(step_coefficients(MaskAndReplaceSchedule.from_config(ITHQ_CFG), 3, None), dtype=torch.float64)
    got = fast_law(2.0 * p, x_t[0], coef, final=True)
    np.testing.assert_allclose(got[:, :-1], p.numpy(), rtol=1e-12, atol=1e-15)
    assert (got[:, -1] == 0).all() and (got[:, :-1][p.numpy() == 0] == 0).all() and (p == 0).any()


@pytest.mark.parametrize(("cfg", "t", "s"), CASES, ids=CASE_IDS)
def test_step_coefficients_are_the_chains_entries(cfg, t, s):
    """Each float64 coefficient of the fast step is an entry of the composed matrices or of the Bayes posterior."""
    schedule = MaskAndReplaceSchedule.from_config(cfg)
    chain = Chain(cfg)
    c = step_coefficients(schedule, t, s)
    q_t, q_s, jump = chain.cumulative(t), chain.cumulative(s), chain.jump(t, s)
    mask = K_SMALL - 1
    n = K_SMALL - 1
    one_hot = np.eye(n)[0]
    stay = chain.posterior(one_hot, mask, t, s)[mask]  # independent of p(x_0)
    moved = chain.posterior(one_hot, mask, t, s)[:n] / (1 - stay)  # P_MODEL * one_hot + (1 - P_MODEL) / n
    expected = {
        P_STAY: stay,
        P_MODEL: (moved[0] - moved[1]),
        A_T: q_t[0, 0] - q_t[0, 1],
        B_T: q_t[0, 1],
        A_S: q_s[0, 0] - q_s[0, 1],
        B_S: q_s[0, 1],
        KEEP: jump[0, 0],
        BETA: jump[0, 1],
        G_S: q_s[0, mask],
    }
    for index, value in expected.items():
        rel = 1e-12 if cfg is NOISY_CFG else 5e-9  # ITHQ: beta-bar cancels six digits (see above)
        assert c[index] == pytest.approx(value, rel=rel, abs=1e-18), index


def _random_denoiser(k: int):
    def run(x, context, t):
        g = torch.Generator().manual_seed(1000 + t)
        return torch.log_softmax(torch.randn(x.shape[0], k - 1, x.shape[1], generator=g) * 2, dim=1)

    return run


@pytest.mark.parametrize("steps", [12, 5, 100])
def test_masked_fraction_follows_cumgamma(steps):
    """Whatever the network predicts, after the step to s about gamma-bar_s of the tokens are still masked."""
    k, n, b = 33, 2048, 4
    schedule = MaskAndReplaceSchedule.from_config(SchedulerConfig(num_vec_classes=k, num_train_timesteps=100))
    timesteps = plan_timesteps(99, steps=steps)
    x = torch.full((b, n), k - 1)
    gens = [torch.Generator().manual_seed(i) for i in range(b)]
    context = TextContext(torch.zeros(b, 77, 8), None)
    fractions = [(x == k - 1).float().mean().item()]
    for x_s in denoise(_random_denoiser(k), x, timesteps, context, schedule, gens, 1.0, 1.0):
        fractions.append((x_s == k - 1).float().mean().item())
    assert fractions[0] == 1.0
    assert fractions[-1] == 0.0
    for s, frac in zip(timesteps[1:], fractions[1:-1], strict=True):
        expected = float(schedule.cumprod_ct[s])
        sd = (expected * (1 - expected) / (n * b)) ** 0.5
        assert abs(frac - expected) < 5 * sd + 1e-3, (s, frac, expected)


def test_q_sample_masks_at_cumgamma():
    k, n = 65, 8192
    schedule = MaskAndReplaceSchedule.from_config(SchedulerConfig(num_vec_classes=k, num_train_timesteps=100))
    x0 = torch.randint(0, k - 1, (1, n), generator=torch.Generator().manual_seed(0))
    for t in (0, 30, 70, 99):
        x_t = q_sample(x0, schedule, t, [torch.Generator().manual_seed(t)])
        masked = (x_t == k - 1).float().mean().item()
        assert abs(masked - schedule.cumprod_ct[t]) < 0.02
        kept = (x_t == x0).float().mean().item()
        assert (
            abs(kept - (schedule.cumprod_at[t] + (1 - schedule.cumprod_at[t] - schedule.cumprod_ct[t]) / (k - 1)))
            < 0.02
        )


def test_reference_sampler_restores_or_renoises_known_tokens():
    """Inpainting's known tokens under the reference loop: restored after every step, or (renoise) re-drawn from
    q(x_s | x_0), so masked at the rate gamma-bar_s and otherwise nearly always the original, and exact at the end."""
    k, n, b = 33, 2048, 2
    schedule = MaskAndReplaceSchedule.from_config(SchedulerConfig(num_vec_classes=k, num_train_timesteps=100))
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, k - 1, (b, n), generator=g)
    regenerate = torch.rand(b, n, generator=g) < 0.5
    timesteps = plan_timesteps(99, steps=10)
    context = TextContext(torch.zeros(b, 77, 8), None)
    start = torch.where(regenerate, k - 1, tokens)

    def chain(renoise: bool) -> list[torch.Tensor]:
        gens = [torch.Generator().manual_seed(i) for i in range(b)]
        known = KnownTokens(tokens, regenerate, renoise)
        return list(denoise(_random_denoiser(k), start, timesteps, context, schedule, gens, 1.0, 1.0, known))

    for x in chain(renoise=False):
        assert torch.equal(x[~regenerate], tokens[~regenerate])
    renoised = chain(renoise=True)
    for s, x in zip(timesteps[1:], renoised[:-1], strict=True):
        known = x[~regenerate]
        expected = float(schedule.cumprod_ct[s])
        sd = (expected * (1 - expected) / known.numel()) ** 0.5
        assert abs((known == k - 1).float().mean().item() - expected) < 5 * sd + 1e-3, s
        unmasked = known != k - 1
        assert (known[unmasked] == tokens[~regenerate][unmasked]).float().mean() > 0.99
    assert torch.equal(renoised[-1][~regenerate], tokens[~regenerate])
