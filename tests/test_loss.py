"""The training objective (diffusion/loss.py) against a direct evaluation of its formulas: the transition matrices
written out in float64, Bayes' rule for the posterior, the KL and NLL sums by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vqdiff_cli.config import SchedulerConfig, TransformerConfig
from vqdiff_cli.diffusion import loss
from vqdiff_cli.diffusion.schedule import MaskAndReplaceSchedule

ITHQ_LIKE = {}  # the default schedule: almost pure masking
REPLACE_HEAVY = {"alpha_cum_end": 0.05, "gamma_cum_end": 0.6}  # a large uniform-replace share


def config(num_classes: int, steps: int, **kw: float) -> SchedulerConfig:
    return SchedulerConfig(num_vec_classes=num_classes, num_train_timesteps=steps, **kw)


def cumulative_tables(cfg: SchedulerConfig) -> tuple[np.ndarray, np.ndarray]:
    frac = np.arange(cfg.num_train_timesteps) / (cfg.num_train_timesteps - 1)
    a = cfg.alpha_cum_start + frac * (cfg.alpha_cum_end - cfg.alpha_cum_start)
    c = cfg.gamma_cum_start + frac * (cfg.gamma_cum_end - cfg.gamma_cum_start)
    return a, c


def matrix(a: float, c: float, k: int) -> np.ndarray:
    """Q[from, to] of mask-and-replace: keep with a + b, any other code with b, the mask with c; the mask stays."""
    n = k - 1
    b = (1 - a - c) / n
    q = np.zeros((k, k))
    q[:n, :n] = b
    q[range(n), range(n)] += a
    q[:n, n] = c
    q[n, n] = 1.0
    return q


def matrices(cfg: SchedulerConfig, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Q-bar_t, Q-bar_{t-1}, Q_t) in float64."""
    a, c = cumulative_tables(cfg)
    k = cfg.num_vec_classes
    step = matrix(a[t] / a[t - 1], 1 - (1 - c[t]) / (1 - c[t - 1]), k)
    return matrix(a[t], c[t], k), matrix(a[t - 1], c[t - 1], k), step


def true_posterior(cfg: SchedulerConfig, t: int, x_0: int, x_t: int) -> np.ndarray:
    """q(x_{t-1} = k | x_t, x_0) by Bayes' rule: Q_t[k, x_t] Q-bar_{t-1}[x_0, k] / Q-bar_t[x_0, x_t]."""
    cum_t, cum_prev, step = matrices(cfg, t)
    return step[:, x_t] * cum_prev[x_0, :] / cum_t[x_0, x_t]


def kl(p: np.ndarray, q: np.ndarray) -> float:
    nz = p > 0
    return float((p[nz] * (np.log(p[nz]) - np.log(q[nz]))).sum())


@pytest.mark.parametrize("extra", [ITHQ_LIKE, REPLACE_HEAVY], ids=["ithq-like", "replace-heavy"])
@pytest.mark.parametrize("t", [1, 2, 5, 9])
def test_posteriors_follow_bayes_rule(extra: dict[str, float], t: int) -> None:
    cfg = config(4, 10, **extra)  # 3 codes + the mask
    schedule = MaskAndReplaceSchedule.from_config(cfg)
    cum_t, cum_prev, step = matrices(cfg, t)
    np.testing.assert_allclose(cum_prev @ step, cum_t, rtol=1e-12, atol=1e-15)  # the matrices themselves agree
    pairs = [(x0, xt) for x0 in range(3) for xt in range(4)]  # every (x_0, x_t) pair, one per position
    x_0 = torch.tensor([[p[0] for p in pairs]])
    x_t = torch.tensor([[p[1] for p in pairs]])
    ts = torch.tensor([t])
    # true posterior: a one-hot x_0 (impossible classes sit at the -70 floor, as in the original)
    log_got = loss.posterior(loss.log_onehot_codes(x_0, 4), x_t, ts, schedule)
    assert log_got.min().item() >= -70.0 and log_got.max().item() <= 0.0
    got = log_got.double().exp()[0]  # (K, N)
    for n, (x0, xt) in enumerate(pairs):
        np.testing.assert_allclose(got[:, n].numpy(), true_posterior(cfg, t, x0, xt), rtol=1e-4, atol=1e-6)
    # model posterior: sum over x_0 of the true posterior times p(x_0)
    g = torch.Generator().manual_seed(t)
    log_p = torch.log_softmax(torch.randn(1, 3, len(pairs), generator=g, dtype=torch.float64) * 2, dim=1).float()
    got = loss.posterior(log_p, x_t, ts, schedule).double().exp()[0]
    for n, (_, xt) in enumerate(pairs):
        p0 = log_p[0, :, n].double().exp().numpy()
        want = sum(p0[i] * true_posterior(cfg, t, i, xt) for i in range(3))
        np.testing.assert_allclose(got[:, n].numpy(), want, rtol=1e-4, atol=1e-6)
        assert got[:, n].sum().item() == pytest.approx(1.0, abs=1e-5)


def brute_force_loss(
    cfg: SchedulerConfig,
    p0: np.ndarray,
    x_0: np.ndarray,
    x_t: np.ndarray,
    t: np.ndarray,
    p_t: np.ndarray,
    w: loss.LossWeights,
) -> tuple[float, np.ndarray, np.ndarray]:
    """Section 13, steps 3-8, position by position in float64."""
    k = cfg.num_vec_classes
    steps = cfg.num_train_timesteps
    total, vbs, auxs = 0.0, [], []
    for b in range(x_0.shape[0]):
        vb = aux = nll = 0.0
        for n in range(x_0.shape[1]):
            weight = w.mask_weight if x_t[b, n] == k - 1 else w.unmask_weight
            p = p0[b, :, n]
            nll -= math.log(p[x_0[b, n]])
            aux += weight * -math.log(p[x_0[b, n]])  # KL(one-hot(x_0) || p) = -log p(x_0)
            if t[b] > 0:
                true = true_posterior(cfg, int(t[b]), int(x_0[b, n]), int(x_t[b, n]))
                model = sum(p[i] * true_posterior(cfg, int(t[b]), i, int(x_t[b, n])) for i in range(k - 1))
                vb += weight * kl(true, model)
        if t[b] == 0:
            vb = aux = nll
        scale = w.aux_weight * ((1 - t[b] / steps) + 1 if w.adaptive_aux else 1.0)
        total += (vb + scale * aux) / p_t[b]
        vbs.append(vb)
        auxs.append(aux)
    return total / x_0.size, np.array(vbs), np.array(auxs)


@pytest.mark.parametrize("extra", [ITHQ_LIKE, REPLACE_HEAVY], ids=["ithq-like", "replace-heavy"])
@pytest.mark.parametrize("adaptive", [True, False])
def test_vb_loss_matches_the_formulas(extra: dict[str, float], adaptive: bool) -> None:
    cfg = config(5, 8, **extra)  # 4 codes + the mask
    schedule = MaskAndReplaceSchedule.from_config(cfg)
    g = torch.Generator().manual_seed(3)
    b, n = 6, 7
    x_0 = torch.randint(0, 4, (b, n), generator=g)
    t = torch.tensor([0, 1, 3, 3, 6, 7])
    x_t = loss.q_sample(x_0, t, schedule, g)
    x_t[1, :3] = 4  # make sure masked and unmasked positions both occur
    x_t[4, 3:] = x_0[4, 3:]
    log_p = torch.log_softmax(torch.randn(b, 4, n, generator=g, dtype=torch.float64) * 1.5, dim=1).float()
    p_t = torch.tensor([0.1, 0.2, 0.05, 0.3, 0.15, 0.2])
    w = loss.LossWeights(mask_weight=2.0, unmask_weight=0.5, aux_weight=0.3, adaptive_aux=adaptive)
    terms = loss.vb_loss(log_p, x_0, x_t, t, p_t, schedule, w)
    want, vb, aux = brute_force_loss(
        cfg, log_p.double().exp().numpy(), x_0.numpy(), x_t.numpy(), t.numpy(), p_t.double().numpy(), w
    )
    np.testing.assert_allclose(terms.vb.double().numpy(), vb, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(terms.aux.double().numpy(), aux, rtol=1e-4, atol=1e-5)
    assert terms.loss.item() == pytest.approx(want, rel=1e-4)
    # a normaliser (the global batch of data-parallel training) only rescales
    scaled = loss.vb_loss(log_p, x_0, x_t, t, p_t, schedule, w, normaliser=4 * b * n)
    assert scaled.loss.item() == pytest.approx(want / 4, rel=1e-4)


def test_a_three_class_two_token_case_by_hand() -> None:
    """2 codes + the mask, 2 tokens, a uniform prediction: at t = 0 the loss is the decoder term alone."""
    schedule = MaskAndReplaceSchedule.from_config(config(3, 4))
    x_0 = torch.tensor([[0, 1]])
    x_t = torch.tensor([[0, 2]])
    uniform = torch.full((1, 2, 2), math.log(0.5))
    w = loss.LossWeights(aux_weight=0.25)
    terms = loss.vb_loss(uniform, x_0, x_t, torch.tensor([0]), torch.tensor([0.25]), schedule, w)
    nll = 2 * math.log(2)
    assert terms.vb.item() == pytest.approx(nll, rel=1e-6)
    assert terms.aux.item() == pytest.approx(nll, rel=1e-6)
    assert terms.loss.item() == pytest.approx((nll + 0.25 * 2 * nll) / 0.25 / 2, rel=1e-6)  # weight (1 - 0) + 1


@pytest.mark.parametrize("t", [1, 4, 7])
def test_a_perfect_prediction_has_no_kl(t: int) -> None:
    schedule = MaskAndReplaceSchedule.from_config(config(5, 8, **REPLACE_HEAVY))
    g = torch.Generator().manual_seed(t)
    x_0 = torch.randint(0, 4, (3, 9), generator=g)
    ts = torch.full((3,), t)
    x_t = loss.q_sample(x_0, ts, schedule, g)
    perfect = loss.log_onehot_codes(x_0, 5)
    terms = loss.vb_loss(perfect, x_0, x_t, ts, torch.ones(3), schedule)
    assert terms.vb.abs().max().item() < 1e-4
    assert terms.decoder_nll.abs().max().item() < 1e-4
    wrong = loss.log_onehot_codes((x_0 + 1) % 4, 5)  # every code wrong: the clamp at -70 bounds it
    assert loss.vb_loss(wrong, x_0, x_t, ts, torch.ones(3), schedule).decoder_nll.min().item() > 9 * 60


@pytest.mark.parametrize("t", [0, 3, 7])
def test_q_sample_draws_from_the_cumulative_matrix(t: int) -> None:
    cfg = config(5, 8, **REPLACE_HEAVY)
    schedule = MaskAndReplaceSchedule.from_config(cfg)
    a, c = cumulative_tables(cfg)
    g = torch.Generator().manual_seed(t)
    n = 40000
    x_0 = torch.full((1, n), 2)
    x_t = loss.q_sample(x_0, torch.tensor([t]), schedule, g)[0]
    row = matrix(a[t], c[t], 5)[2]  # q(x_t | x_0 = 2)
    freq = torch.bincount(x_t, minlength=5).double().numpy() / n
    sigma = np.sqrt(row * (1 - row) / n)
    assert (np.abs(freq - row) < 5 * sigma + 1e-4).all(), (freq, row)


def test_importance_sampling_is_uniform_until_every_t_has_history() -> None:
    steps = 6
    history = loss.TimestepHistory.empty(steps)
    g = torch.Generator().manual_seed(0)
    t, p_t = loss.sample_timesteps(history, 8, g)
    assert (p_t == 1 / steps).all() and t.min() >= 0 and t.max() < steps
    vb = torch.arange(1.0, steps + 1)
    for _ in range(loss.HISTORY_MIN_COUNT):
        history = history.update(torch.arange(steps), vb)
    assert not history.ready  # seen exactly 10 times: still uniform
    history = history.update(torch.arange(steps), vb)
    assert history.ready
    # the running mean of L_t^2 after 11 updates of the same value v: v^2 (1 - 0.9^11)
    np.testing.assert_allclose(history.loss_sq.numpy(), (vb.double() ** 2 * (1 - 0.9**11)).numpy(), rtol=1e-12)
    root = np.sqrt(history.loss_sq.numpy() + 1e-10) + 1e-4
    root[0] = root[1]
    want = root / root.sum()
    np.testing.assert_allclose(history.probabilities().numpy(), want, rtol=1e-12)
    t, p_t = loss.sample_timesteps(history, 60000, g)
    np.testing.assert_allclose(p_t.double().numpy(), want[t.numpy()], rtol=1e-6)
    freq = torch.bincount(t, minlength=steps).double().numpy() / 60000
    assert np.abs(freq - want).max() < 0.01


def test_history_update_folds_repeated_timesteps_in_order() -> None:
    history = loss.TimestepHistory.empty(3).update(torch.tensor([1, 1, 2]), torch.tensor([2.0, 4.0, 1.0]))
    first = 0.1 * 4.0
    assert history.loss_sq.tolist() == pytest.approx([0.0, 0.1 * 16.0 + 0.9 * first, 0.1])
    assert history.count.tolist() == [0, 2, 1]


def test_the_transformer_takes_one_timestep_per_image() -> None:
    """Training draws t per image; a (B,) t gives each image what a scalar t gives it alone."""
    from vqdiff_cli.models.transformer import DiffusionTransformer

    cfg = TransformerConfig(
        num_vector_embeds=9,
        sample_size=2,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=4,
        cross_attention_dim=6,
        num_embeds_ada_norm=10,
    )
    torch.manual_seed(0)
    model = DiffusionTransformer(cfg).eval()
    g = torch.Generator().manual_seed(1)
    x_t = torch.randint(0, 9, (3, 4), generator=g)
    text = torch.randn(3, 5, 6, generator=g)
    t = torch.tensor([0, 4, 9])
    with torch.no_grad():
        batched = model(x_t, text, t)
        for b in range(3):
            alone = model(x_t[b : b + 1], text[b : b + 1], int(t[b]))
            torch.testing.assert_close(batched[b : b + 1], alone, rtol=1e-5, atol=1e-6)
