"""Per-sequence log-probs of the trained tokens, computed in chunks.

The transformer body runs once; the LM head and log-softmax then run only on the positions whose next token
is trained, a chunk at a time, so the full [tokens x vocab] logits never exist at once: a frozen linear head
recomputes each chunk's logits in the backward (`FrozenHeadLogps`); a trained linear head on CUDA uses
Liger's fused linear cross-entropy where the model's KernelPolicy allows it (model/attention.py); any other
head (trained in full fine-tuning or `modules_to_save`, 4-bit, or followed by a logit transform) runs each
chunk under activation checkpointing. Every method gets its log-probs from here.

Some architectures transform the head's output before the softmax (Gemma-2/3 soft-capping, Granite's
`logits_scaling`, Cohere's `logit_scale`, Falcon-H1's `lm_head_multiplier`); `logit_transform` applies the
model's own transform inside the chunked head, and `check_head` compares tunesmith's log-probs with the
model's own forward once before training, refusing an architecture whose forward does something else.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..data.batching import Batch
from ..data.render import IGNORE
from ..errors import TunesmithError
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


@dataclass
class TokenLogps:
    """Log-prob of every trained token (in the batch's row-major order of trained positions) and the sequence
    it belongs to: what a per-token loss (GRPO) needs instead of per-sequence sums."""

    logp: torch.Tensor  # [N] float32
    seq: torch.Tensor  # [N] long

    def detach(self) -> TokenLogps:
        return TokenLogps(self.logp.detach(), self.seq)


def hidden_states(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Last hidden states [R, T, H] of the transformer body (adapters included, LM head not applied)."""
    lm = unwrap(model)
    body = getattr(lm, lm.base_model_prefix)
    attention = attention_inputs(lm, batch)
    autocast = torch.is_autocast_enabled(batch.input_ids.device.type)
    with lora_inputs_uncast(model) if autocast else contextlib.nullcontext():
        out = body(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False, **attention)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


Transform = Callable[[torch.Tensor], torch.Tensor]


def logit_transform(model: torch.nn.Module) -> Transform | None:
    """What the model's own forward does to the head's output before the softmax (None: nothing)."""
    lm = unwrap(model)
    cfg = lm.config
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:
        return lambda x: torch.tanh(x / cap) * cap
    scaling = getattr(cfg, "logits_scaling", None)
    if scaling not in (None, 1, 1.0):
        if cfg.model_type == "hyperclovax":
            return lambda x: x * scaling
        return lambda x: x / scaling  # the Granite family
    for scale in (getattr(lm, "logit_scale", None), getattr(getattr(lm, "model", None), "lm_head_multiplier", None)):
        if isinstance(scale, (int, float)) and scale != 1:
            return lambda x, s=scale: x * s  # Cohere's logit_scale, Falcon-H1's lm_head_multiplier
    return None


def _chunk_logps(head: torch.nn.Module, h: torch.Tensor, targets: torch.Tensor,
                 transform: Transform | None = None, temperature: float = 1.0) -> torch.Tensor:
    logits = head(h).float()
    if transform is not None:
        logits = transform(logits)
    if temperature != 1.0:
        logits = logits / temperature
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


def token_logps(model: torch.nn.Module, batch: Batch, chunk: int = 1024, temperature: float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of every trained token and the sequence it belongs to, both [N_target], in the order of the
    trained positions (row by row). With a temperature, of softmax(logits / temperature): the distribution
    an online method samples from (model/sampling.py)."""
    h = hidden_states(model, batch)
    lm = unwrap(model)
    head = lm.get_output_embeddings()
    transform = logit_transform(model)
    targets_mask = batch.labels[:, 1:] != IGNORE
    h_sel = h[:, :-1][targets_mask]
    targets = batch.labels[:, 1:][targets_mask]
    seq = batch.seq_ids[:, 1:][targets_mask]
    fused_ce = head_ce_kernel(getattr(getattr(lm, POLICY, None), "head_ce", None))
    if fused_ce is not None and transform is None and temperature == 1.0 and torch.is_grad_enabled() \
            and _trained_linear(head) and targets.numel():
        return _fused_head_logps(fused_ce, h_sel, head.weight, targets), seq
    pieces = []
    for k in range(0, targets.shape[0], chunk):
        hc, tc = h_sel[k:k + chunk], targets[k:k + chunk]
        if transform is None and _frozen_linear(head):  # logits / T == linear(h / T): the head stays fused
            pieces.append(FrozenHeadLogps.apply(hc / temperature if temperature != 1.0 else hc, head.weight, tc))
        elif torch.is_grad_enabled() and hc.requires_grad:
            pieces.append(checkpoint(_chunk_logps, head, hc, tc, transform, temperature, use_reentrant=False))
        else:
            pieces.append(_chunk_logps(head, hc, tc, transform, temperature))
    logps = torch.cat(pieces) if pieces else h.new_zeros(0, dtype=torch.float32)
    return logps, seq


def sequence_logps(model: torch.nn.Module, batch: Batch, chunk: int = 1024) -> SeqLogps:
    logps, seq = token_logps(model, batch, chunk)
    s = batch.n_seqs
    total = torch.zeros(s, dtype=torch.float32, device=logps.device).index_add(0, seq, logps)
    count = torch.zeros(s, dtype=torch.float32, device=logps.device).index_add(
        0, seq, torch.ones_like(logps))
    return SeqLogps(total, count)


def _rows(layer: torch.nn.Module) -> int:
    """The token count of an embedding or head, read from the module, not its weight: a 4-bit weight is packed."""
    base = getattr(layer, "base_layer", layer)  # a PEFT-wrapped layer
    return getattr(base, "num_embeddings", None) or getattr(base, "out_features", None) or base.weight.shape[0]


@torch.no_grad()
def check_head(model: torch.nn.Module, n_tokens: int = 24, tolerance: float = 0.05) -> None:
    """Compare tunesmith's per-token log-probs with the model's own forward on a short random sequence and
    refuse the model when they differ (its forward does something after the head that the chunked head
    does not reproduce). Run once, before training, on the model as training will use it."""
    from ..data.batching import collate
    from ..data.render import Tokenized

    lm = unwrap(model)
    vocab = min(_rows(lm.get_input_embeddings()), _rows(lm.get_output_embeddings()))
    device = next(lm.parameters()).device
    ids = torch.randint(1, vocab, (n_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    batch = collate([Tokenized(tuple(ids), (IGNORE,) + tuple(ids[1:]))], 0).to(device)
    mine, _ = token_logps(model, batch)
    logits = model(input_ids=batch.input_ids, use_cache=False).logits[0, :-1].float()
    theirs = logits.log_softmax(-1).gather(-1, batch.input_ids[0, 1:, None]).squeeze(-1)
    gap = float((mine.detach().float() - theirs.detach()).abs().max())
    if not gap <= tolerance:
        kind = getattr(lm.config, "model_type", type(lm).__name__)
        raise TunesmithError(
            f"tunesmith cannot reproduce the output of '{kind}' models: its log-probs differ from the model's own "
            f"forward by up to {gap:.3g} nats per token (its forward transforms the logits in a way tunesmith's "
            "chunked LM head does not know), so training and scoring would use the wrong distribution",
            hint="use a supported architecture (docs/methods.md lists the logit transforms tunesmith applies)")
