"""The VQ-Diffusion training objective as pure functions: forward sampling of x_t, the variational bound's terms, the
auxiliary x_0 loss and importance sampling of t (Gu et al. 2111.14822 eq. 4-8; the original `_train_loss`,
shared/reference/vq-diffusion.md section 13).

The posteriors come from `schedule.q_posterior` (diffusers' one-step posterior, the same math the sampler uses),
clamped to [-70, 0] as the original does; nothing here holds state: the per-t loss history is a value passed in and
returned. Shapes: B batch, K classes including the mask (id K-1), N latent tokens, T timesteps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .schedule import LOG_FLOOR, MaskAndReplaceSchedule, index_to_log_onehot, q_posterior

HISTORY_MIN_COUNT = 10  # importance sampling starts once every t has been seen more than this many times
HISTORY_DECAY = 0.9  # loss_sq[t] <- 0.1 L_t^2 + 0.9 loss_sq[t]


@dataclass(frozen=True)
class LossWeights:
    """How the terms are weighted (ITHQ's values by default)."""

    mask_weight: float = 1.0  # positions where x_t is the mask token
    unmask_weight: float = 1.0  # the other positions
    aux_weight: float = 5e-4  # the auxiliary x_0 term
    adaptive_aux: bool = True  # scale the auxiliary term by (1 - t/T) + 1


def q_sample(
    x_0: torch.Tensor, t: torch.Tensor, schedule: MaskAndReplaceSchedule, generator: torch.Generator
) -> torch.Tensor:
    """Draw x_t ~ q(x_t | x_0): per token, the mask with gamma-bar_t, x_0 kept with alpha-bar_t, else a uniform code.

    x_0: (B, N) codes in 0..K-2; t: (B,) long. The uniform draw covers all K-1 codes (x_0 among them), so x_0
    survives with alpha-bar_t + beta-bar_t, as in the cumulative matrix. Draws on the generator's device.
    """
    device = generator.device
    a = torch.as_tensor(schedule.cumprod_at, device=device)[t.to(device)].unsqueeze(1)  # (B, 1) float64
    c = torch.as_tensor(schedule.cumprod_ct, device=device)[t.to(device)].unsqueeze(1)
    u = torch.rand(x_0.shape, generator=generator, device=device, dtype=torch.float64)
    uniform = torch.randint(0, schedule.num_classes - 1, x_0.shape, generator=generator, device=device)
    codes = x_0.to(device)
    x_t = torch.where(u < c + a, codes, uniform)
    x_t = torch.where(u < c, torch.full_like(codes, schedule.mask_id), x_t)
    return x_t.to(x_0.device)


def clamp_log_p_x_0(log_p_x_0: torch.Tensor) -> torch.Tensor:
    """The original `predict_start`'s floor: log p_theta(x_0 | x_t) clamped to [-70, 0]."""
    return log_p_x_0.clamp(LOG_FLOOR, 0.0)


def log_onehot_codes(x_0: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, N) codes -> (B, K-1, N) log one-hot over the codes (0 at x_0, log 1e-30 elsewhere)."""
    return index_to_log_onehot(x_0, num_classes)[:, :-1, :]


def posterior(
    log_p_x_0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, schedule: MaskAndReplaceSchedule
) -> torch.Tensor:
    """log p(x_{t-1} | x_t) = log sum_{x_0} q(x_{t-1} | x_t, x_0) p(x_0), clamped to [-70, 0]: (B, K, N).

    log_p_x_0: (B, K-1, N); x_t: (B, N); t: (B,) with every t >= 1 (at t = 0 there is no x_{t-1}: the decoder
    term uses p(x_0) itself). With a one-hot p(x_0) this is the true posterior q(x_{t-1} | x_t, x_0).
    Images are grouped by t, since `q_posterior` takes one t per call.
    """
    if bool((t < 1).any()):
        raise ValueError("posterior needs t >= 1")
    out = torch.empty(
        (x_t.shape[0], schedule.num_classes, x_t.shape[1]), dtype=log_p_x_0.dtype, device=log_p_x_0.device
    )
    for step in torch.unique(t).tolist():
        rows = (t == step).nonzero().squeeze(1)
        out[rows] = q_posterior(log_p_x_0[rows], x_t[rows], schedule, int(step), int(step) - 1)
    return out.clamp(LOG_FLOOR, 0.0)


def multinomial_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_k p_k (log p_k - log q_k) over dim 1: (B, C, N) -> (B, N)."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def position_weights(x_t: torch.Tensor, mask_id: int, weights: LossWeights) -> torch.Tensor:
    """(B, N): `mask_weight` where x_t is the mask token, `unmask_weight` elsewhere."""
    masked = x_t == mask_id
    return torch.where(masked, weights.mask_weight, weights.unmask_weight).to(torch.float32)


def aux_scale(t: torch.Tensor, num_timesteps: int, weights: LossWeights) -> torch.Tensor:
    """The auxiliary term's weight per image: aux_weight x ((1 - t/T) + 1) when adaptive, else aux_weight: (B,)."""
    if not weights.adaptive_aux:
        return torch.full(t.shape, weights.aux_weight, dtype=torch.float32, device=t.device)
    return weights.aux_weight * ((1 - t.float() / num_timesteps) + 1.0)


@dataclass(frozen=True)
class LossTerms:
    """One batch's loss and its parts, per image before weighting (for the log and the t history)."""

    loss: torch.Tensor  # scalar: sum_b (L_t + w_aux aux) / p_t, divided by B x N (what is back-propagated)
    vb: torch.Tensor  # (B,) L_t: the KL term for t > 0, the decoder NLL for t = 0, summed over positions
    aux: torch.Tensor  # (B,) the auxiliary term (KL on x_0, or the decoder NLL at t = 0), summed over positions
    decoder_nll: torch.Tensor  # (B,) -log p_theta(x_0 | x_t) summed over positions (the t = 0 term, at every t)


def vb_loss(
    log_p_x_0: torch.Tensor,
    x_0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    p_t: torch.Tensor,
    schedule: MaskAndReplaceSchedule,
    weights: LossWeights | None = None,
    normaliser: int | None = None,
) -> LossTerms:
    """The training loss of one batch (section 13, steps 3-8).

    log_p_x_0: (B, K-1, N) the network's log p_theta(x_0 | x_t); x_0, x_t: (B, N); t: (B,) long; p_t: (B,) the
    probability each t was drawn with. `normaliser` divides the summed loss (default B x N; data-parallel ranks pass
    the global batch's B x N so that averaging their gradients gives one process's).
    """
    weights = weights or LossWeights()
    k = schedule.num_classes
    log_p_x_0 = clamp_log_p_x_0(log_p_x_0)
    log_x_0 = log_onehot_codes(x_0, k)
    pos_weight = position_weights(x_t, k - 1, weights)
    decoder_nll = -(log_x_0.exp() * log_p_x_0).sum(dim=1).sum(dim=1)  # (B,)
    kl = torch.zeros_like(decoder_nll)
    later = (t > 0).nonzero().squeeze(1)
    if later.numel():
        sub_t, sub_x_t = t[later], x_t[later]
        log_model = posterior(log_p_x_0[later], sub_x_t, sub_t, schedule)
        log_true = posterior(log_x_0[later], sub_x_t, sub_t, schedule)
        kl = kl.index_put((later,), (multinomial_kl(log_true, log_model) * pos_weight[later]).sum(dim=1))
    kl_aux = (multinomial_kl(log_x_0, log_p_x_0) * pos_weight).sum(dim=1)
    first = t == 0
    vb = torch.where(first, decoder_nll, kl)
    aux = torch.where(first, decoder_nll, kl_aux)
    per_image = (vb + aux_scale(t, schedule.num_timesteps, weights) * aux) / p_t
    total = normaliser if normaliser is not None else x_0.shape[0] * x_0.shape[1]
    return LossTerms(per_image.sum() / total, vb.detach(), aux.detach(), decoder_nll.detach())


# -- importance sampling of t over the per-t loss history ------------------------------------------------------


@dataclass(frozen=True)
class TimestepHistory:
    """Running mean of L_t^2 per t, and how often each t was seen (the original's Lt_history and Lt_count)."""

    loss_sq: torch.Tensor  # (T,) float64
    count: torch.Tensor  # (T,) int64

    @classmethod
    def empty(cls, num_timesteps: int) -> TimestepHistory:
        return cls(torch.zeros(num_timesteps, dtype=torch.float64), torch.zeros(num_timesteps, dtype=torch.long))

    @property
    def ready(self) -> bool:
        """Importance sampling applies once every t has been seen more than HISTORY_MIN_COUNT times."""
        return bool((self.count > HISTORY_MIN_COUNT).all())

    def probabilities(self) -> torch.Tensor:
        """p_t proportional to sqrt(loss_sq[t] + 1e-10) + 1e-4, with t = 0 given t = 1's value; uniform before ready."""
        num = self.loss_sq.shape[0]
        if not self.ready:
            return torch.full((num,), 1.0 / num, dtype=torch.float64)
        root = torch.sqrt(self.loss_sq + 1e-10) + 1e-4
        root[0] = root[1]  # the decoder term's scale says little about how hard t = 0 is
        return root / root.sum()

    def update(self, t: torch.Tensor, vb: torch.Tensor) -> TimestepHistory:
        """A new history with each image's L_t folded in, in batch order."""
        loss_sq, count = self.loss_sq.clone(), self.count.clone()
        for step, value in zip(t.tolist(), vb.detach().double().cpu().tolist(), strict=True):
            loss_sq[step] = (1 - HISTORY_DECAY) * value**2 + HISTORY_DECAY * loss_sq[step]
            count[step] += 1
        return TimestepHistory(loss_sq, count)


def sample_timesteps(
    history: TimestepHistory, batch: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, p_t), each (batch,): uniform until the history is ready, then drawn with replacement from its p_t."""
    num = history.loss_sq.shape[0]
    if not history.ready:
        t = torch.randint(0, num, (batch,), generator=generator, device=generator.device)
        return t.cpu(), torch.full((batch,), 1.0 / num, dtype=torch.float32)
    probs = history.probabilities()
    t = torch.multinomial(probs.to(generator.device), batch, replacement=True, generator=generator).cpu()
    return t, probs[t].float()
