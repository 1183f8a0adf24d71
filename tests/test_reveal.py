"""The budgeted reveal's math (Improved VQ-Diffusion's high-quality and purity sampling) and the original fast mode's
posterior, against direct implementations of their formulas: the budgets (the original's tables, the derivation for
every other chain), the calls, the positions and tokens a step draws (statistically, over many seeds, in both
samplers), and which posterior each step of `--stride-mode original` takes."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from vqdiff_cli.config import SchedulerConfig
from vqdiff_cli.diffusion import fast, reveal
from vqdiff_cli.diffusion.reveal import RevealRule, budgets, call_sizes, network_calls, reveal_ratios
from vqdiff_cli.diffusion.sampler import chain_tables, posterior_levels
from vqdiff_cli.diffusion.schedule import MaskAndReplaceSchedule
from vqdiff_cli.diffusion.streams import seed_words
from vqdiff_cli.options import plan_timesteps

ITHQ = MaskAndReplaceSchedule.from_config(SchedulerConfig(num_vec_classes=4097))
T50 = MaskAndReplaceSchedule.from_config(SchedulerConfig(num_vec_classes=17, num_train_timesteps=50))
# the original's n_sample lists (shared/reference/vq-diffusion.md section 6.5), written out again here
TABLE = [1, 10] + [11, 10, 10] * 32 + [11, 11]
TABLE_FEW = [1, 6] + [11, 10, 10] * 32 + [11, 15]


def by_timestep(timesteps, per_step):  # type: ignore[no-untyped-def]
    return dict(zip(timesteps[:-1], per_step, strict=True))


# -- budgets ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("per_call", "table"), [(None, TABLE), (1024, TABLE), (11, TABLE), (10, TABLE_FEW), (5, TABLE_FEW)]
)
def test_ithq_t100_budgets_are_the_originals_tables(per_call, table):
    timesteps = plan_timesteps(99)
    ratios = reveal_ratios(ITHQ.cumprod_ct, timesteps, 1024, [1024], per_call)
    found = by_timestep(timesteps, budgets(1024, ratios))
    assert [found[t] for t in range(1, 100)] == table[1:]
    assert sum(table[1:]) == 1024


def test_the_derivation_is_within_a_token_of_the_originals_table():
    """The rule every other chain uses, applied to the original's setting: the tables up to rounding."""
    c = ITHQ.cumprod_ct
    left = {t: math.floor(1024 * c[t - 1] / c[99] + 0.5) for t in range(2, 100)}  # masked after the step at t
    left |= {1: 0, 100: 1024}  # nothing is left after t = 1; all 1024 are masked before t = 99
    derived = {t: left[t + 1] - left[t] for t in range(1, 100)}
    assert sum(derived.values()) == 1024
    assert max(abs(derived[t] - TABLE[t]) for t in range(1, 100)) == 1


CHAINS = [
    ("T100-grid256", ITHQ, plan_timesteps(99), 256),
    ("T100-steps25", ITHQ, plan_timesteps(99, steps=25), 1024),
    ("T100-stride4", ITHQ, plan_timesteps(99, stride=4), 1024),
    ("T100-stride10", ITHQ, plan_timesteps(99, stride=10), 1024),
    ("T100-inpaint-from-40-300", ITHQ, plan_timesteps(40), 300),
    ("T50-grid1024", T50, plan_timesteps(49), 1024),
    ("T50-grid16-steps7", T50, plan_timesteps(49, steps=7), 16),
]


@pytest.mark.parametrize(("name", "schedule", "timesteps", "masked"), CHAINS, ids=[c[0] for c in CHAINS])
def test_derived_budgets_sum_to_the_masked_tokens_and_follow_the_expectation(name, schedule, timesteps, masked):
    """Budget of the step from t_i: what the forward process unmasks in expectation between t_i and t_(i+1),
    M (gamma-bar_t_i - gamma-bar_t_(i+1)) / gamma-bar_t_0, rounded so that the running total stays within half a
    token of the expected total; all of it revealed before the final step."""
    grid = 1024 if masked in (300, 1024) else masked
    found = budgets(masked, reveal_ratios(schedule.cumprod_ct, timesteps, grid, [masked], None))
    assert len(found) == len(timesteps) - 1
    assert sum(found) == masked and min(found) >= 0
    c, top = schedule.cumprod_ct, schedule.cumprod_ct[timesteps[0]]
    running = 0
    for i, b in enumerate(found[:-1]):
        running += b
        assert abs(running - masked * (1 - c[timesteps[i + 1]] / top)) <= 0.5, (i, running)


def test_calls_split_each_budget_and_skip_empty_steps():
    assert call_sizes(11, 4) == [4, 4, 3]
    assert call_sizes(8, 4) == [4, 4]
    assert call_sizes(11, None) == [11]
    assert call_sizes(0, 3) == []
    timesteps = plan_timesteps(99)
    ratios = reveal_ratios(ITHQ.cumprod_ct, timesteps, 1024, [1024], 5)
    expected = sum(-(-b // 5) for b in TABLE_FEW[1:]) + 1  # ceil(b / 5) per t, and the final call at t = 0
    assert network_calls(100, [1024], ratios, 5) == expected
    assert network_calls(100, [1024], reveal_ratios(ITHQ.cumprod_ct, timesteps, 1024, [1024], None), None) == 100
    # a batch makes the calls of its neediest image at each step; a step with nothing left for any image makes none
    ratios = reveal_ratios(ITHQ.cumprod_ct, timesteps, 16, [16, 3], 2)
    per_step = [max(-(-a // 2), -(-b // 2)) for a, b in zip(budgets(16, ratios), budgets(3, ratios), strict=True)]
    assert network_calls(100, [16, 3], ratios, 2) == sum(per_step) + 1
    assert network_calls(100, [16], ratios, 1) == 17 and network_calls(100, [3], ratios, 1) == 4


# -- one budgeted step: positions and tokens, in both samplers ---------------------------------------------------

P = torch.tensor(  # p(x_0 = k) at 4 positions over 4 classes: distinct purities 0.7, 0.4, 0.55, 0.9
    [[0.7, 0.1, 0.1, 0.1], [0.4, 0.3, 0.2, 0.1], [0.15, 0.55, 0.2, 0.1], [0.9, 0.05, 0.03, 0.02]], dtype=torch.float64
)
MASK = 4
X_T = torch.tensor([[MASK, MASK, MASK, 2]])  # positions 0, 1 and 2 masked: the candidates
COUNT = 2
DRAWS = 6000


def selection_law(score: torch.Tensor) -> dict[frozenset[int], float]:
    """Successive sampling without replacement in proportion to `score` (torch.multinomial's law), by enumeration."""
    law: dict[frozenset[int], float] = {}
    for order in itertools.permutations(range(3), COUNT):
        prob, left = 1.0, float(score[:3].sum())
        for i in order:
            prob *= float(score[i]) / left
            left -= float(score[i])
        law[frozenset(order)] = law.get(frozenset(order), 0.0) + prob
    return law


def token_law(rule: str, weight: float) -> torch.Tensor:
    """(4, 4) the class a chosen position takes: p, or p ** (1 + r s) normalised for the purity rule."""
    score = P.amax(1) / P.amax()
    power = 1 + weight * score if rule == "purity" else torch.ones(4, dtype=torch.float64)
    sharp = P ** power.unsqueeze(1)
    return sharp / sharp.sum(1, keepdim=True)


def draws_reference(rule: str, weight: float) -> list[torch.Tensor]:
    log_p = P.log().float().T.unsqueeze(0)  # (1, K-1, N)
    candidates = X_T == MASK
    rr = RevealRule(rule, weight)
    return [
        reveal.reveal_sample(log_p, X_T, candidates, COUNT, rr, torch.Generator().manual_seed(seed))[0]
        for seed in range(DRAWS)
    ]


def draws_fast(rule: str, weight: float) -> list[torch.Tensor]:
    logits = P.log().float().unsqueeze(0).expand(DRAWS, -1, -1)  # raw scores (B, N, n): log p itself
    coef = torch.zeros(fast.NUM_COEF, dtype=torch.float64)
    coef[fast.RATIO] = 1 / 3  # 3 candidates, target floor(3 / 3 + 1/2) = 1: two revealed
    words = seed_words(list(range(DRAWS)), "cpu")
    masked0 = torch.full((DRAWS,), 3)
    x = X_T.expand(DRAWS, -1)
    out = fast.fast_step(
        logits, x, coef, words, torch.tensor(6), None, 1.0, False, RevealRule(rule, weight), masked0, None
    )
    return list(out)


def chi2_ok(counts: np.ndarray, expected: np.ndarray) -> tuple[bool, float, int]:
    keep = expected >= 5
    chi2 = float((((counts - expected) ** 2)[keep] / expected[keep]).sum())
    dof = int(keep.sum()) - 1
    return chi2 < dof + 5 * (2 * dof) ** 0.5, chi2, dof


@pytest.mark.parametrize("sampler", ["reference", "fast"])
@pytest.mark.parametrize(("rule", "weight"), [("purity", 0.0), ("random", 0.0), ("purity", 2.0)])
def test_a_step_draws_positions_by_score_and_tokens_from_the_prediction(sampler, rule, weight):
    """Over many seeds: exactly COUNT candidates change, never an unmasked position; the chosen pair follows
    successive sampling in proportion to purity (uniform for the random rule); the chosen positions' tokens follow p
    (purity weight 0, random) or p ** (1 + r s) (weight r)."""
    out = draws_reference(rule, weight) if sampler == "reference" else draws_fast(rule, weight)
    score = P.amax(1) if rule == "purity" else torch.ones(4, dtype=torch.float64)
    law = selection_law(score)
    sets = sorted(law, key=sorted)
    set_counts = np.zeros(len(sets))
    tokens = np.zeros((3, 4))
    for x in out:
        changed = x != X_T[0]
        assert int(changed.sum()) == COUNT and not bool(changed[3])
        assert (x[changed] < MASK).all()
        set_counts[sets.index(frozenset(changed.nonzero().flatten().tolist()))] += 1
        for i in changed.nonzero().flatten().tolist():
            tokens[i, int(x[i])] += 1
    ok, chi2, dof = chi2_ok(set_counts, np.array([law[s] for s in sets]) * DRAWS)
    assert ok, ("positions", chi2, dof)
    expected = token_law(rule, weight)[:3].numpy() * tokens.sum(1, keepdims=True)
    ok, chi2, dof = chi2_ok(tokens.flatten(), expected.flatten())
    assert ok, ("tokens", chi2, dof)


def test_known_tokens_are_never_candidates_in_the_fast_step():
    logits = P.log().float().unsqueeze(0).expand(64, -1, -1)
    coef = torch.zeros(fast.NUM_COEF, dtype=torch.float64)  # ratio 0: reveal every candidate
    regenerate = torch.tensor([[True, False, True, True]]).expand(64, -1)
    x = X_T.expand(64, -1)
    out = fast.fast_step(
        logits,
        x,
        coef,
        seed_words(list(range(64)), "cpu"),
        torch.tensor(2),
        None,
        1.0,
        False,
        RevealRule("purity", 1.0),
        torch.full((64,), 2),
        regenerate,
    )
    assert (out[:, 1] == MASK).all() and (out[:, 3] == 2).all()  # a masked known token stays as it is
    assert (out[:, [0, 2]] < MASK).all()


# -- the original fast mode's posterior -------------------------------------------------------------------------


def original_fast_mode(k: int, top: int = 99) -> list[tuple[int, int, int | None]]:
    """microsoft/VQ-Diffusion's `sample_fast` (section 6.4 of the reference), directly: (t the network is told,
    the level tau of the one-step posterior q(x_(tau-1) | x_tau, x_0), None for the final step)."""
    skip = k - 1
    visited = list(range(top, -1, -(1 + skip)))
    if visited[-1] != 0:
        visited.append(0)
    return [(t, t - skip if t > skip else t, None) if t > 0 else (t, 0, None) for t in visited]


@pytest.mark.parametrize("stride", [2, 3, 4, 10, 33])
def test_stride_mode_original_takes_the_originals_posteriors(stride):
    timesteps = plan_timesteps(99, stride=stride)
    original = original_fast_mode(stride)
    assert list(timesteps) == [t for t, _, _ in original]
    levels = posterior_levels(timesteps, "original", stride)
    assert levels[-1] is None
    assert list(levels[:-1]) == [(tau, tau - 1) for _, tau, _ in original[:-1]]
    tables = chain_tables(ITHQ, timesteps, torch.device("cpu"), levels)  # what the reference sampler is given
    for (_, tau, _), step in zip(original[:-1], tables[:-1], strict=True):
        assert torch.equal(step.q_t.log_c, ITHQ.cumulative(tau).log_c)
        assert torch.equal(step.q_ts.log_c, ITHQ.step(tau, tau - 1).log_c)
        assert torch.equal(step.q_s.log_c, ITHQ.cumulative(tau - 1).log_c)
    plan = fast.FastPlan.build(ITHQ, timesteps, torch.device("cpu"), levels)  # what the fast sampler is given
    assert plan.t.tolist() == list(timesteps)  # the true t for the network
    for i, (_, tau, _) in enumerate(original[:-1]):
        assert plan.coef[i].tolist() == fast.step_coefficients(ITHQ, tau, tau - 1)


def test_exact_and_original_agree_without_a_stride():
    timesteps = plan_timesteps(99)
    assert posterior_levels(timesteps, "original") == posterior_levels(timesteps, "exact")
    steps = plan_timesteps(99, steps=7)
    assert posterior_levels(steps, "original")[:-1] == [(s + 1, s) for s in steps[1:]]


# -- the fast sampler's calls -----------------------------------------------------------------------------------


def test_the_fast_plan_has_a_row_per_call_with_its_own_stream():
    """Several calls at one t: the network told that t each time, a fresh noise stream per call, known tokens
    imposed only after a timestep's last call, the step's target ratio in every row."""
    from vqdiff_cli.diffusion.sampler import RevealPlan

    timesteps = plan_timesteps(99, steps=5)
    ratios = reveal_ratios(ITHQ.cumprod_ct, timesteps, 16, [16], 2)
    plan = RevealPlan(RevealRule("purity", 1.0, 2), ratios, (16,))
    built = fast.FastPlan.build(ITHQ, timesteps, torch.device("cpu"), reveal=plan)
    calls = plan.step_calls()
    assert built.calls == (*calls, 1)
    assert built.t.tolist() == [t for t, n in zip(timesteps, built.calls, strict=True) for _ in range(n)]
    assert len(set(built.salt.tolist())) == len(built.salt)  # no two calls share a stream
    hold = built.coef[:-1, fast.HOLD_KNOWN].tolist()
    assert hold == [1.0 if c + 1 < n else 0.0 for n in calls for c in range(n)]
    assert built.coef[:-1, fast.RATIO].tolist() == [r for r, n in zip(ratios, calls, strict=True) for _ in range(n)]


def test_known_tokens_are_imposed_only_after_a_timesteps_last_call():
    from vqdiff_cli.diffusion.sampler import KnownTokens

    known = KnownTokens(torch.tensor([[3, 3, 3, 3]]), torch.tensor([[True, True, False, False]]))
    x = torch.tensor([[MASK, MASK, MASK, 1]])  # a known position masked (as re-noising leaves it), one replaced

    def logits_fn(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return P.log().float().unsqueeze(0).expand(x_in.shape[0], -1, -1)

    step = fast.make_step(
        logits_fn, seed_words([0], "cpu"), None, 1.0, 4, known, reveal=RevealRule("random"), masked0=torch.tensor([2])
    )
    coef = torch.zeros(fast.NUM_COEF, dtype=torch.float64)
    coef[fast.RATIO] = 0.5  # one of the two candidates
    coef[fast.HOLD_KNOWN] = 1.0
    held = step(x, torch.tensor(50), coef, torch.tensor(100), False)
    assert held[0, 2:].tolist() == [MASK, 1]  # left as they were
    assert int((held[0, :2] == MASK).sum()) == 1
    coef[fast.HOLD_KNOWN] = 0.0
    assert step(x, torch.tensor(50), coef, torch.tensor(100), False)[0, 2:].tolist() == [3, 3]  # restored
