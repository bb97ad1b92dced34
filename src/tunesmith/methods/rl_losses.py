"""GRPO's losses as pure functions of per-token log-probs (methods/grpo.py feeds them; docs/grpo.md has the
formulas and how they compare with TRL 1.16's GRPOTrainer, which tests/test_grpo_losses.py checks).

Shapes: N trained (completion) tokens of S sequences. `seq` [N] gives each token's sequence; per-token inputs
are [N], per-sequence ones [S]. Every function works in at least float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

LossType = Literal["grpo", "dr_grpo", "dapo"]
Scale = Literal["group", "batch", "none"]
STD_EPS = 1e-4  # added to the std before dividing (TRL's value)

__all__ = ["GRPOTerms", "LossType", "Scale", "grpo_loss_sum", "grpo_terms", "grpo_units", "group_advantages",
           "group_std", "kl_k3"]


def _f32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def group_std(rewards: Tensor, group_size: int) -> Tensor:
    """Standard deviation of the rewards within each group of `group_size` consecutive completions, with
    Bessel's correction ([S / G])."""
    return _f32(rewards).view(-1, group_size).std(dim=1, unbiased=True)


def group_advantages(rewards: Tensor, group_size: int, scale: Scale = "group") -> Tensor:
    """A_i = (r_i - mean of its group) / (std + 1e-4) for completions laid out group by group ([S]).
    `scale`: the std of the group (GRPO), of the whole batch (`batch`), or no division (`none`, Dr. GRPO).
    A group whose rewards are all equal gets advantages of exactly 0."""
    r = _f32(rewards)
    if r.dim() != 1 or r.numel() % group_size:
        raise ValueError(f"rewards must be [groups * {group_size}], got {tuple(r.shape)}")
    grouped = r.view(-1, group_size)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)
    if scale == "none":
        return centred
    std = group_std(r, group_size).repeat_interleave(group_size) if scale == "group" else r.std(unbiased=True)
    return centred / (std + STD_EPS)


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token estimate of KL(policy || reference) from tokens sampled by the policy (Schulman's k3):
    exp(ref - logp) - (ref - logp) - 1, >= 0, exactly 0 where the two agree."""
    d = _f32(ref_logp) - _f32(logp)
    return torch.exp(d) - d - 1


@dataclass(frozen=True)
class GRPOTerms:
    losses: Tensor  # [N] per-token loss, differentiable
    ratio: Tensor  # [N] pi / pi_old, detached
    clipped_low: Tensor  # [N] bool: ratio < 1 - eps_low with a negative advantage (the clip took over)
    clipped_high: Tensor  # [N] bool: ratio > 1 + eps_high with a positive advantage
    kl: Tensor | None  # [N] k3 estimate, detached (None without a reference)


def grpo_terms(logp: Tensor, old_logp: Tensor, advantages: Tensor, ref_logp: Tensor | None = None,
               beta: float = 0.0, epsilon: float = 0.2, epsilon_high: float | None = None) -> GRPOTerms:
    """The clipped surrogate per token, -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) with r = exp(logp -
    old_logp) and A the advantage of the token's sequence (already [N]); `epsilon_high` > `epsilon` is DAPO's
    clip-higher. With a reference and beta > 0, + beta * r * k3: the KL penalty weighted by the ratio, whose
    gradient is then the unbiased reverse-KL gradient (TRL's default `use_bias_correction_kl`)."""
    logp, old, adv = _f32(logp), _f32(old_logp).detach(), _f32(advantages).detach()
    if not logp.shape == old.shape == adv.shape:
        raise ValueError(f"per-token inputs must share one shape, got {[tuple(x.shape) for x in (logp, old, adv)]}")
    high = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(logp - old)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + high)
    losses = -torch.min(ratio * adv, clipped * adv)
    kl = None
    if ref_logp is not None and beta:
        per_token = kl_k3(logp, ref_logp.detach())
        losses = losses + beta * per_token * ratio
        kl = per_token.detach()
    r = ratio.detach()
    return GRPOTerms(losses, r, (r < 1 - epsilon) & (adv < 0), (r > 1 + high) & (adv > 0), kl)


def grpo_loss_sum(token_losses: Tensor, seq: Tensor, n_seqs: int, loss_type: LossType) -> Tensor:
    """The batch's loss SUM, to be divided by `grpo_units` of the whole step (which the loop does):
      grpo     each sequence's mean token loss, summed over sequences        (units: sequences)
      dr_grpo  token losses summed                                           (units: sequences x max_new_tokens)
      dapo     token losses summed                                           (units: completion tokens)
    so the step's loss is TRL's: the mean over sequences of per-sequence means (grpo), the token sum over
    sequences x the completion limit (dr_grpo), the mean over every completion token of the step (dapo)."""
    losses = _f32(token_losses)
    if loss_type in ("dr_grpo", "dapo"):
        return losses.sum()
    if loss_type != "grpo":
        raise ValueError(f"unknown GRPO loss type {loss_type!r}")
    total = losses.new_zeros(n_seqs).index_add(0, seq, losses)
    count = losses.new_zeros(n_seqs).index_add(0, seq, torch.ones_like(losses))
    return (total / count.clamp(min=1)).sum()


def grpo_units(loss_type: LossType, n_seqs: int, n_tokens: int, max_new_tokens: int) -> int:
    """What the step's loss sum is divided by (see `grpo_loss_sum`)."""
    if loss_type == "grpo":
        return n_seqs
    if loss_type == "dr_grpo":
        return n_seqs * max_new_tokens
    return n_tokens
