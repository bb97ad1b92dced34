"""Preference and SFT losses as pure functions of per-sequence log-probs.

Every input is a 1-D tensor of shape ``[B]``: the SUM of the log-probs of the completion tokens of each
sequence (and, where a loss needs it, the number of those tokens). Each function returns per-example losses
(reduce them with ``.mean()``) and detached rewards for logging. Formulas and how they compare with TRL 1.16
are in docs/methods.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import TunesmithError

__all__ = [
    "KTOOut",
    "PreferenceOut",
    "chosen_nll",
    "dpo_loss",
    "ipo_loss",
    "kto_loss",
    "kto_mismatched_indices",
    "orpo_loss",
    "sft_nll",
    "simpo_loss",
]

_LN_HALF = -0.6931471805599453  # log(1/2): where the two forms of log(1 - e^x) trade accuracy


@dataclass(frozen=True)
class PreferenceOut:
    losses: Tensor  # [B], differentiable
    chosen_rewards: Tensor  # [B], detached
    rejected_rewards: Tensor  # [B], detached


@dataclass(frozen=True)
class KTOOut:
    losses: Tensor  # [B], differentiable
    rewards: Tensor  # [B], beta * (policy - ref), detached
    kl: Tensor  # scalar reference point z0, detached


def _float(*xs: Tensor) -> list[Tensor]:
    """Check that all inputs are [B] with the same B; compute in at least float32."""
    shape = xs[0].shape
    if len(shape) != 1 or any(x.shape != shape for x in xs):
        raise ValueError(f"loss inputs must all have the same shape [B], got {[tuple(x.shape) for x in xs]}")
    return [x.to(torch.promote_types(x.dtype, torch.float32)) for x in xs]


def _smoothed_logistic(logits: Tensor, label_smoothing: float) -> Tensor:
    """-log sigmoid(logits), with the preference label flipped with probability label_smoothing."""
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and for very negative x (Maechler, 2012)."""
    return torch.where(x < _LN_HALF, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _log_odds(logp: Tensor) -> Tensor:
    """log(p / (1 - p)) from log p. log p is capped just below 0: the odds are infinite at p == 1, and a
    float32 log-softmax returns exactly 0 for very confident tokens, which would make gradients NaN."""
    logp = logp.clamp(max=-torch.finfo(logp.dtype).eps)
    return logp - _log1mexp(logp)


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    dpop_lambda: float = 0.0,
) -> PreferenceOut:
    """Sigmoid DPO; ``label_smoothing`` > 0 gives conservative DPO (cDPO). ``dpop_lambda`` > 0 gives
    DPO-Positive (Pal et al., 2024): the margin is reduced by lambda * max(0, ref_chosen - policy_chosen), so
    the loss cannot fall by pushing the chosen answer's likelihood below the reference's."""
    pc, pr, rc, rr = _float(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    chosen_ratio, rejected_ratio = pc - rc, pr - rr
    margin = chosen_ratio - rejected_ratio
    if dpop_lambda:
        margin = margin - dpop_lambda * (-chosen_ratio).clamp(min=0)
    losses = _smoothed_logistic(beta * margin, label_smoothing)
    return PreferenceOut(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def ipo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
    chosen_tokens: Tensor | None = None,
    rejected_tokens: Tensor | None = None,
) -> PreferenceOut:
    """IPO: (h - 1/(2 beta))^2. With token counts, h uses per-token log-ratios (as TRL does);
    without, the summed log-ratios of the paper."""
    pc, pr, rc, rr = _float(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    chosen_ratio, rejected_ratio = pc - rc, pr - rr
    rewards = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    if (chosen_tokens is None) != (rejected_tokens is None):
        raise ValueError("ipo_loss: pass both chosen_tokens and rejected_tokens, or neither")
    if chosen_tokens is not None and rejected_tokens is not None:
        nc, nr = _float(chosen_tokens, rejected_tokens)
        chosen_ratio, rejected_ratio = chosen_ratio / nc.clamp(min=1), rejected_ratio / nr.clamp(min=1)
    losses = (chosen_ratio - rejected_ratio - 1 / (2 * beta)) ** 2
    return PreferenceOut(losses, *rewards)


def orpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    lam: float = 0.1,
) -> PreferenceOut:
    """ORPO: per-token NLL of the chosen completion + lam * -log sigmoid(log odds ratio)."""
    pc, pr, nc, nr = _float(policy_chosen, policy_rejected, chosen_tokens, rejected_tokens)
    avg_chosen, avg_rejected = pc / nc.clamp(min=1), pr / nr.clamp(min=1)
    log_odds = _log_odds(avg_chosen) - _log_odds(avg_rejected)
    losses = -avg_chosen - lam * F.logsigmoid(log_odds)
    return PreferenceOut(losses, lam * avg_chosen.detach(), lam * avg_rejected.detach())


def simpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> PreferenceOut:
    """SimPO (reference-free): -log sigmoid(beta*logp_w/|y_w| - beta*logp_l/|y_l| - gamma)."""
    pc, pr, nc, nr = _float(policy_chosen, policy_rejected, chosen_tokens, rejected_tokens)
    chosen_reward = beta * pc / nc.clamp(min=1)
    rejected_reward = beta * pr / nr.clamp(min=1)
    losses = _smoothed_logistic(chosen_reward - rejected_reward - gamma, label_smoothing)
    return PreferenceOut(losses, chosen_reward.detach(), rejected_reward.detach())


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    policy_kl_logps: Tensor,
    ref_kl_logps: Tensor,
    desirable: Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KTOOut:
    """KTO. ``policy_kl_logps``/``ref_kl_logps`` score mismatched (prompt, completion) pairs (see
    `kto_mismatched_indices`); their mean log-ratio, clamped at 0 and detached, is the reference point z0."""
    if desirable.dtype != torch.bool:
        raise ValueError(f"kto_loss: desirable must be a bool tensor, got {desirable.dtype}")
    policy, ref = _float(policy_logps, ref_logps)
    policy_kl, ref_kl = _float(policy_kl_logps, ref_kl_logps)
    if desirable.shape != policy.shape:
        raise ValueError(
            f"kto_loss: desirable has shape {tuple(desirable.shape)}, logps {tuple(policy.shape)}"
        )
    kl = (policy_kl - ref_kl).mean().clamp(min=0).detach()
    ratio = policy - ref
    desirable_losses = desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl)))
    undesirable_losses = undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio)))
    losses = torch.where(desirable, desirable_losses, undesirable_losses)
    return KTOOut(losses, beta * ratio.detach(), kl)


def kto_mismatched_indices(batch_size: int) -> Tensor:
    """Permutation pairing prompt i with the completion of example (i + 1) % B, for KTO's KL estimate.

    Use it as ``kl_completions = completions[perm]``. Every prompt gets another example's completion and the
    mismatched set holds the same completions as the batch.
    """
    if batch_size < 2:
        raise TunesmithError(
            f"KTO needs at least 2 examples per micro-batch to estimate its KL term, got {batch_size}",
            hint="set train.micro_batch_size to 2 or more (and drop a last micro-batch of 1) for method: kto",
        )
    return (torch.arange(batch_size) + 1) % batch_size


def chosen_nll(policy_chosen: Tensor, chosen_tokens: Tensor) -> Tensor:
    """Per-pair mean NLL of the chosen completion's tokens ([B]): the term `method_args.sft_weight` adds to a
    preference loss (RPO; TRL's `rpo_alpha`) to keep the chosen answer likely while the margin grows."""
    pc, nc = _float(policy_chosen, chosen_tokens)
    return -pc / nc.clamp(min=1)


def sft_nll(token_logp_sum: Tensor, n_tokens: Tensor | int) -> Tensor:
    """Mean negative log-likelihood per target token: -sum(log-probs) / number of tokens (scalar)."""
    total = torch.as_tensor(n_tokens, device=token_logp_sum.device).sum().clamp(min=1)
    return -token_logp_sum.sum() / total
