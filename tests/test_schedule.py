"""The mask-and-replace math on its own: timestep plans, the exact strided posterior, the masking rate."""

from __future__ import annotations

import itertools

import pytest
import torch

from vqdiff_cli.config import SchedulerConfig
from vqdiff_cli.diffusion.sampler import TextContext, denoise, q_sample
from vqdiff_cli.diffusion.schedule import MaskAndReplaceSchedule, q_posterior
from vqdiff_cli.options import plan_timesteps

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


def test_strided_transition_is_a_product_of_steps():
    """alpha_{t|s} and gamma_{t|s} equal the product of the one-step transitions between s and t."""
    t, s = 60, 45
    keep = torch.tensor(1.0, dtype=torch.float64)
    survive = torch.tensor(1.0, dtype=torch.float64)
    for u in range(s + 1, t + 1):
        one = ITHQ.step(u, u - 1)
        keep = keep * one.log_a.double().exp()
        survive = survive * (1 - one.log_c.double().exp())
    multi = ITHQ.step(t, s)
    assert torch.isclose(multi.log_a.double().exp(), keep, rtol=1e-5)
    assert torch.isclose(1 - multi.log_c.double().exp(), survive, rtol=1e-5)


def test_strided_posterior_shape_and_finiteness():
    """Any (t, s): K rows and finite per-column mass (s = t-1 is compared with diffusers in test_parity)."""
    g = torch.Generator().manual_seed(0)
    log_p = torch.log_softmax(torch.randn(1, 4096, 64, generator=g) * 2, dim=1)
    x_t = torch.randint(0, 4097, (1, 64), generator=g)
    for t, s in [(99, 98), (50, 49), (99, 60), (30, 0)]:
        post = q_posterior(log_p, x_t, ITHQ, t, s)
        assert post.shape == (1, 4097, 64)
        assert torch.isfinite(torch.logsumexp(post, dim=1)).all()  # not normalised per column, as in diffusers


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
