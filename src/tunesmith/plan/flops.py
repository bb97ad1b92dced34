"""Model FLOPs of a training pass, and the machine's matmul rate on the model's own shapes.

Model FLOPs of one training pass, per real (non-pad) token, for a model with N weights in its linear layers
(the transformer body; embeddings are lookups), hidden size d, vocab V, L layers, d_q = heads x head dim:
  body, LoRA      4N + 6N_A   forward 2N; backward 2N for activation gradients only (frozen weights need no
                              weight gradient); the adapters (N_A weights) 2N_A forward + 4N_A backward
  body, full      6N          forward 2N + backward 4N
  attention       12 d_q per (query, key) pair a layer (forward 4, backward 8); a sequence of n tokens has
                  n(n+1)/2 causal pairs — computed per sequence, so packing adds no FLOPs here
  LM head         4Vd per trained position (LoRA, frozen head: forward + input gradient), 6Vd when trained.
                  tunesmith runs the head only on positions whose next token is trained, so it is counted
                  on those alone; a trainer that runs it on every position does more work than this counts
  reference pass  (DPO) forward only: 2N + head 2Vd per trained position + 4 d_q per pair
Recomputation (gradient checkpointing, the checkpointed head chunks) is not counted: MFU, not HFU.
`recompute_flops` gives what gradient checkpointing adds (one more forward of the body).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shapes:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim_: int | None = None  # when the config sets head_dim (Gemma-2: 256 with hidden 3584, 16 heads)

    @classmethod
    def of(cls, config) -> Shapes:
        return cls(config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                   config.num_attention_heads, getattr(config, "num_key_value_heads", None) or
                   config.num_attention_heads, config.vocab_size, getattr(config, "head_dim", None))

    @classmethod
    def of_architecture(cls, arch) -> Shapes:
        return cls(arch.hidden, arch.intermediate, arch.layers, arch.heads, arch.kv_heads, arch.vocab, arch.head_dim)

    @property
    def head_dim(self) -> int:
        return self.head_dim_ or self.hidden // self.heads

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of the linear layers of one decoder layer (Llama layout)."""
        d, q, kv, ff = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return [(d, q), (d, kv), (d, kv), (q, d), (d, ff), (d, ff), (ff, d)]

    @property
    def n_linear(self) -> int:
        return self.layers * sum(i * o for i, o in self.linears())

    def n_lora(self, r: int) -> int:
        return self.layers * sum(r * (i + o) for i, o in self.linears())


@dataclass(frozen=True)
class SeqStats:
    """What FLOPs depend on: each sequence's length and its number of trained positions."""

    lengths: tuple[int, ...]
    trained: tuple[int, ...]

    @property
    def tokens(self) -> int:
        return sum(self.lengths)


def training_flops(s: Shapes, seqs: SeqStats, lora_r: int | None = 16, reference_pass: bool = False) -> float:
    """Model FLOPs of one training pass over `seqs` (lora_r None: full fine-tuning), plus a forward-only
    reference pass when the method needs one."""
    n, d_q = s.n_linear, s.heads * s.head_dim
    pairs = sum(k * (k + 1) // 2 for k in seqs.lengths)
    trained = sum(seqs.trained)
    if lora_r is None:
        body, head = 6 * n * seqs.tokens, 6 * s.vocab * s.hidden * trained
    else:
        body, head = (4 * n + 6 * s.n_lora(lora_r)) * seqs.tokens, 4 * s.vocab * s.hidden * trained
    total = body + head + 12 * d_q * pairs * s.layers
    if reference_pass:
        total += forward_flops(s, seqs)
    return float(total)


def forward_flops(s: Shapes, seqs: SeqStats) -> float:
    """One forward pass without gradients (the reference pass): 2N per token, the head on trained positions,
    4 d_q per causal pair a layer."""
    pairs = sum(k * (k + 1) // 2 for k in seqs.lengths)
    d_q = s.heads * s.head_dim
    return float(2 * s.n_linear * seqs.tokens + 2 * s.vocab * s.hidden * sum(seqs.trained)
                 + 4 * d_q * pairs * s.layers)


def recompute_flops(s: Shapes, seqs: SeqStats) -> float:
    """What gradient checkpointing adds: the body's forward once more (the head is not checkpointed)."""
    pairs = sum(k * (k + 1) // 2 for k in seqs.lengths)
    return float(2 * s.n_linear * seqs.tokens + 4 * s.heads * s.head_dim * pairs * s.layers)


def matmul_rate(m: int, k: int, n: int, dtype: torch.dtype, seconds: float) -> float:
    """Median FLOP/s of [m,k] @ [k,n] over repeats filling about `seconds` (after a warm-up)."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    torch.mm(a, b)
    rates, spent = [], 0.0
    while spent < seconds or len(rates) < 3:
        t0 = time.perf_counter()
        torch.mm(a, b)
        dt = time.perf_counter() - t0
        spent += dt
        rates.append(2 * m * k * n / dt)
    return statistics.median(rates)


def model_matmul_shapes(s: Shapes, tokens: int = 4096) -> list[tuple[int, int, int]]:
    """The model's own matmuls at `tokens` rows: MLP up/down, attention projections, one LM-head chunk."""
    d, ff, kv = s.hidden, s.intermediate, s.kv_heads * s.head_dim
    return [(tokens, d, ff), (tokens, ff, d), (tokens, d, d), (tokens, d, kv), (1024, d, s.vocab)]


def measured_peak(s: Shapes, dtype: torch.dtype = torch.bfloat16, seconds: float = 1.0, tokens: int = 4096) -> dict:
    """Best matmul rate over the model's shapes, in FLOP/s, with the rate of each shape."""
    rates = {f"{m}x{k}x{n}": matmul_rate(m, k, n, dtype, seconds) for m, k, n in model_matmul_shapes(s, tokens)}
    return {"dtype": str(dtype).removeprefix("torch."), "peak_flops": max(rates.values()), "by_shape": rates}


def mfu(flops: float, seconds: float, peak_flops: float) -> float:
    return flops / seconds / peak_flops if seconds > 0 and peak_flops > 0 else 0.0
