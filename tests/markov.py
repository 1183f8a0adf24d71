"""The mask-and-replace chain written out as K x K float64 matrices: an independent reference for vqdiff's
closed-form transitions and posteriors (nothing here calls vqdiff's diffusion code).

The one-step coefficients alpha_t, gamma_t come from diffusers' own `alpha_schedules` / `gamma_schedules`
(beta_t = (1 - alpha_t - gamma_t) / n), the process of Gu et al. 2111.14822 eq. 4 as
shared/reference/vq-diffusion.md section 5.4 defines it: from a code j, stay j with alpha + beta, become each other
code with beta, become the mask with gamma; the mask (class K-1) is absorbing. Q[u][i, j] = q(x_u = j | x_{u-1} = i),
so index t of the tables is the state after the transitions Q[0] ... Q[t] from x_0. The strided jump t|s is the
matrix product Q[s+1] ... Q[t], and the posterior is Bayes' rule summed over x_0, term by term.
"""

from __future__ import annotations

import numpy as np
from diffusers.schedulers.scheduling_vq_diffusion import alpha_schedules, gamma_schedules

from vqdiff_cli.config import SchedulerConfig


def one_step_matrices(cfg: SchedulerConfig) -> list[np.ndarray]:
    """Q[u] for u = 0 .. T-1, each (K, K) float64, rows summing to 1."""
    at, _ = alpha_schedules(cfg.num_train_timesteps, cfg.alpha_cum_start, cfg.alpha_cum_end)
    ct, _ = gamma_schedules(cfg.num_train_timesteps, cfg.gamma_cum_start, cfg.gamma_cum_end)
    k = cfg.num_vec_classes
    n = k - 1
    out = []
    for a, c in zip(at, ct, strict=True):
        b = (1 - a - c) / n
        q = np.zeros((k, k))
        q[:n, :n] = b
        q[np.arange(n), np.arange(n)] = a + b
        q[:n, n] = c
        q[n, n] = 1.0
        out.append(q)
    return out


def product(matrices: list[np.ndarray], k: int) -> np.ndarray:
    out = np.eye(k)
    for q in matrices:
        out = out @ q
    return out


class Chain:
    """The matrices of one schedule: q(x_t | x_0) and q(x_t | x_s) by multiplying one-step matrices."""

    def __init__(self, cfg: SchedulerConfig) -> None:
        self.k = cfg.num_vec_classes
        self.steps = one_step_matrices(cfg)

    def cumulative(self, t: int) -> np.ndarray:
        """q(x_t | x_0): Q[0] ... Q[t]."""
        return product(self.steps[: t + 1], self.k)

    def jump(self, t: int, s: int) -> np.ndarray:
        """q(x_t | x_s) for s < t: Q[s+1] ... Q[t]."""
        return product(self.steps[s + 1 : t + 1], self.k)

    def posterior(self, p_x0: np.ndarray, x_t: int, t: int, s: int) -> np.ndarray:
        """p(x_s | x_t) = sum over x_0 of p(x_0) q(x_s | x_t, x_0), with q(x_s | x_t, x_0) by Bayes' rule:
        q(x_t | x_s) q(x_s | x_0) / sum over x_s' of q(x_t | x_s') q(x_s' | x_0). p_x0: (K-1,); returns (K,)."""
        to_s = self.cumulative(s)  # [x_0, x_s]
        jump = self.jump(t, s)  # [x_s, x_t]
        out = np.zeros(self.k)
        for x0 in range(self.k - 1):
            joint = to_s[x0, :] * jump[:, x_t]  # q(x_s, x_t | x_0) for every x_s
            out += p_x0[x0] * joint / joint.sum()
        return out
