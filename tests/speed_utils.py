"""Shared helpers for the speed-technique tests (packing, chunked log-probs, speed options): a tiny LoRA model
whose adapters are not zero, random token sequences, and the plain (un-optimised) per-sequence log-probs that
every fast path is checked against."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tiny import build_model
from tunesmith.config import AdapterConfig
from tunesmith.data.render import IGNORE, Tokenized
from tunesmith.model.adapters import apply_adapter

VOCAB = 512
PAD = 2


def tiny_lora(seed: int = 0) -> torch.nn.Module:
    """The 2-layer tiny Llama (fp32) with LoRA on every linear layer; lora_B is random, not PEFT's zeros, so
    the adapters change the outputs and every adapter weight gets a non-zero gradient."""
    model = apply_adapter(build_model(vocab_size=VOCAB, seed=seed), AdapterConfig(kind="lora", r=4, alpha=8))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def random_seqs(lengths: Sequence[int], seed: int, prompt_frac: float = 0.4) -> list[Tokenized]:
    """Sequences of random tokens; the first `prompt_frac` of each is untrained (a prompt)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(4, VOCAB, (n,), generator=g).tolist()
        cut = max(1, int(n * prompt_frac))
        out.append(Tokenized(tuple(ids), tuple([IGNORE] * cut + ids[cut:])))
    return out


def lora_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def solo_logits(model: torch.nn.Module, seq: Tokenized) -> torch.Tensor:
    """[T, V] logits of one sequence alone, through the model's own forward (its default causal mask)."""
    return model(input_ids=torch.tensor([seq.input_ids]), use_cache=False).logits[0]


def naive_seq_logp(model: torch.nn.Module, seq: Tokenized) -> torch.Tensor:
    """Sum of log p(token t | tokens < t) over the trained tokens t > 0, from full logits of the sequence alone."""
    logp = solo_logits(model, seq).float().log_softmax(-1)
    ids = torch.tensor(seq.input_ids)
    trained = torch.tensor(seq.labels[1:]) != IGNORE
    per_token = logp[:-1].gather(-1, ids[1:, None]).squeeze(-1)
    return per_token[trained].sum()


def grads(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of `loss` w.r.t. the trainable parameters (and zeroes them afterwards)."""
    params = lora_params(model)
    values = torch.autograd.grad(loss, list(params.values()))
    return dict(zip(params, values, strict=True))
