"""Model FLOPs utilisation: the machine's measured matmul peak, and the FLOPs a LoRA step really needs.

Peak: the best sustained rate of large matmuls on the model's own shapes (tokens x hidden x intermediate,
and the LM head), in the training dtype. MFU = model FLOPs of the run / its wall time / that peak.

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

    python bench/mfu.py [--seconds 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Shapes:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @classmethod
    def of(cls, config) -> Shapes:
        return cls(config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                   config.num_attention_heads, config.num_key_value_heads, config.vocab_size)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of the linear layers of one decoder layer (Llama layout)."""
        d, kv, ff = self.hidden, self.kv_heads * self.head_dim, self.intermediate
        return [(d, d), (d, kv), (d, kv), (d, d), (d, ff), (d, ff), (ff, d)]

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
        total += 2 * n * seqs.tokens + 2 * s.vocab * s.hidden * trained + 4 * d_q * pairs * s.layers
    return float(total)


def matmul_rate(m: int, k: int, n: int, dtype: torch.dtype, seconds: float, device: str = "cpu") -> float:
    """Median FLOP/s of [m,k] @ [k,n] over repeats filling about `seconds` (after a warm-up); on CUDA each
    repeat is 10 matmuls timed between synchronisations."""
    a, b = torch.randn(m, k, device=device).to(dtype), torch.randn(k, n, device=device).to(dtype)
    cuda = torch.device(device).type == "cuda"
    reps = 10 if cuda else 1
    torch.mm(a, b)
    rates, spent = [], 0.0
    while spent < seconds or len(rates) < 3:
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        if cuda:
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        spent += dt
        rates.append(2 * m * k * n * reps / dt)
    return statistics.median(rates)


def model_matmul_shapes(s: Shapes, tokens: int = 4096) -> list[tuple[int, int, int]]:
    """The model's own matmuls at `tokens` rows: MLP up/down, attention projections, one LM-head chunk."""
    d, ff, kv = s.hidden, s.intermediate, s.kv_heads * s.head_dim
    return [(tokens, d, ff), (tokens, ff, d), (tokens, d, d), (tokens, d, kv), (1024, d, s.vocab)]


def measured_peak(s: Shapes, dtype: torch.dtype = torch.bfloat16, seconds: float = 1.0,
                  device: str = "cpu") -> dict:
    """Best matmul rate over the model's shapes, in FLOP/s, with the rate of each shape."""
    rates = {f"{m}x{k}x{n}": matmul_rate(m, k, n, dtype, seconds, device) for m, k, n in model_matmul_shapes(s)}
    return {"dtype": str(dtype).removeprefix("torch."), "peak_flops": max(rates.values()), "by_shape": rates}


def mfu(flops: float, seconds: float, peak_flops: float) -> float:
    return flops / seconds / peak_flops if seconds > 0 and peak_flops > 0 else 0.0


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=1.0, help="time per matmul shape")
    p.add_argument("--model", default=None, help="HF model dir (default: tunesmith's default model)")
    args = p.parse_args(argv)
    from transformers import AutoConfig

    if args.model is None:
        from tunesmith.model.default import default_model_dir

        args.model = str(default_model_dir())
    shapes = Shapes.of(AutoConfig.from_pretrained(args.model))
    print(f"linear weights N = {shapes.n_linear / 1e6:.1f} M, LoRA r16 N_A = {shapes.n_lora(16) / 1e6:.2f} M")
    for dtype in (torch.bfloat16, torch.float32):
        peak = measured_peak(shapes, dtype, args.seconds)
        shown = ", ".join(f"{k}: {v / 1e9:.0f}" for k, v in peak["by_shape"].items())
        print(f"{peak['dtype']:>8}: peak {peak['peak_flops'] / 1e9:.0f} GFLOP/s ({shown})")


if __name__ == "__main__":
    main()
