"""Per-sequence log-probs of the trained tokens, computed in chunks.

The transformer body runs once; the LM head and log-softmax then run only on the positions whose next token
is trained, a chunk at a time, so the full [tokens x vocab] logits never exist at once: a frozen linear head
recomputes each chunk's logits in the backward (`FrozenHeadLogps`); a trained linear head on CUDA uses
Liger's fused linear cross-entropy where the model's KernelPolicy allows it (model/attention.py); any other
head (trained in full fine-tuning or `modules_to_save`, 4-bit) runs each chunk under activation
checkpointing. Every method (SFT and the preference methods) gets its log-probs from here.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..data.batching import Batch
from ..data.render import IGNORE
from ..model.attention import POLICY, attention_inputs
from ..model.fused import lora_inputs_uncast
from ..model.kernels import head_ce_kernel
from ..model.unwrap import unwrap


@dataclass
class SeqLogps:
    """Summed log-probs of each sequence's trained tokens, and how many tokens were summed."""

    logp_sum: torch.Tensor  # [S] float32
    n_tokens: torch.Tensor  # [S] float32

    @property
    def mean(self) -> torch.Tensor:
        return self.logp_sum / self.n_tokens.clamp(min=1)

    def split(self, n: int) -> tuple[SeqLogps, SeqLogps]:
        """First n sequences and the rest (chosen / rejected halves of a pair batch)."""
        return (SeqLogps(self.logp_sum[:n], self.n_tokens[:n]), SeqLogps(self.logp_sum[n:], self.n_tokens[n:]))

    def detach(self) -> SeqLogps:
        return SeqLogps(self.logp_sum.detach(), self.n_tokens.detach())


def hidden_states(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Last hidden states [R, T, H] of the transformer body (adapters included, LM head not applied)."""
    lm = unwrap(model)
    body = getattr(lm, lm.base_model_prefix)
    attention = attention_inputs(lm, batch)
    autocast = torch.is_autocast_enabled(batch.input_ids.device.type)
    with lora_inputs_uncast(model) if autocast else contextlib.nullcontext():
        out = body(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False, **attention)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _chunk_logps(head: torch.nn.Module, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(h).float()
    return torch.gather(logits.log_softmax(-1), -1, targets[:, None]).squeeze(-1)


class FrozenHeadLogps(torch.autograd.Function):
    """log p(target) = logit[target] - logsumexp(logits) through a frozen linear head: the [n, vocab] logits
    are made in the forward and again in the backward and never kept, and the backward forms
    g * (onehot - softmax) in one fp32 buffer (what checkpointing log_softmax + gather costs in about half
    the passes over [n, vocab])."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        device = h.device.type
        ctx.autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        logits = F.linear(h, weight)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        lse = torch.logsumexp(logits, -1)
        ctx.save_for_backward(h, weight, targets, lse)
        return logits.gather(-1, targets[:, None]).squeeze(-1) - lse

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, weight, targets, lse = ctx.saved_tensors
        dtype = ctx.autocast or h.dtype
        logits = F.linear(h.to(dtype), weight.to(dtype))
        p = torch.sub(logits, lse[:, None]).exp_().mul_(-grad[:, None])
        p.scatter_add_(1, targets[:, None], grad[:, None].to(p.dtype))
        return (p.to(dtype) @ weight.to(dtype)).to(h.dtype), None, None


def _frozen_linear(head: torch.nn.Module) -> bool:
    return type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad


def _trained_linear(head: torch.nn.Module) -> bool:
    return type(head) is torch.nn.Linear and head.bias is None and head.weight.requires_grad


def _fused_head_logps(fused_ce, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) through a fused linear cross-entropy, both operands in the compute dtype (what autocast
    would give the head's matmul)."""
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
    return -fused_ce(h.to(dtype), weight.to(dtype), targets)


def token_logps(model: torch.nn.Module, batch: Batch, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of every trained token and the sequence it belongs to, both [N_target]."""
    h = hidden_states(model, batch)
    lm = unwrap(model)
    head = lm.get_output_embeddings()
    targets_mask = batch.labels[:, 1:] != IGNORE
    h_sel = h[:, :-1][targets_mask]
    targets = batch.labels[:, 1:][targets_mask]
    seq = batch.seq_ids[:, 1:][targets_mask]
    fused_ce = head_ce_kernel(getattr(getattr(lm, POLICY, None), "head_ce", None))
    if fused_ce is not None and torch.is_grad_enabled() and _trained_linear(head) and targets.numel():
        return _fused_head_logps(fused_ce, h_sel, head.weight, targets), seq
    pieces = []
    for k in range(0, targets.shape[0], chunk):
        hc, tc = h_sel[k:k + chunk], targets[k:k + chunk]
        if _frozen_linear(head):
            pieces.append(FrozenHeadLogps.apply(hc, head.weight, tc))
        elif torch.is_grad_enabled() and hc.requires_grad:
            pieces.append(checkpoint(_chunk_logps, head, hc, tc, use_reentrant=False))
        else:
            pieces.append(_chunk_logps(head, hc, tc))
    logps = torch.cat(pieces) if pieces else h.new_zeros(0, dtype=torch.float32)
    return logps, seq


def sequence_logps(model: torch.nn.Module, batch: Batch, chunk: int = 1024) -> SeqLogps:
    logps, seq = token_logps(model, batch, chunk)
    s = batch.n_seqs
    total = torch.zeros(s, dtype=torch.float32, device=logps.device).index_add(0, seq, logps)
    count = torch.zeros(s, dtype=torch.float32, device=logps.device).index_add(
        0, seq, torch.ones_like(logps))
    return SeqLogps(total, count)
