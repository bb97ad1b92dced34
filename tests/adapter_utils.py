"""Shared helpers for the adapter / merge / swap / QLoRA tests: load the tiny model as each adapter kind
needs it, train a few steps, snapshot tensors."""

from __future__ import annotations

import torch
from torch import nn

from tunesmith.config import AdapterConfig
from tunesmith.model.adapters import optimizer_param_groups


def load_tiny(tiny_dir, quantized: bool = False, dtype: torch.dtype = torch.float32, double_quant: bool = True,
              embeddings: bool = True):
    """The tiny Llama from disk; NF4 with `dtype` compute when quantized (fp32 keeps comparisons exact), the
    tied embedding/head included unless `embeddings` is false (as the loader does for quantize_embeddings)."""
    from transformers import AutoModelForCausalLM

    from tunesmith.model.quantize import keep_4bit_layout, nf4_config, quantize_embeddings_nf4

    if quantized:
        model = AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=nf4_config(double_quant, dtype),
                                                     dtype=dtype, device_map="cpu")
        keep_4bit_layout(model)  # what the loader does right after loading
        if embeddings:
            quantize_embeddings_nf4(model, double_quant, dtype)
        return model
    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=dtype)


def load_tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


def token_batch(seed: int, batch: int = 2, length: int = 16, vocab: int = 500) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (batch, length), generator=g)


def train_steps(model: nn.Module, cfg: AdapterConfig, steps: int = 3, lr: float = 1e-2, seed: int = 0) -> list[float]:
    """A plain AdamW loop on random token batches (next-token loss); returns the losses."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(optimizer_param_groups(model, cfg, lr=lr, weight_decay=0.0))
    model.train()
    losses = []
    for step in range(steps):
        ids = token_batch(seed * 100 + step)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def snapshot(model: nn.Module, which: str = "all") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (the live parameter, a copy of it now) for "all", "trainable" or "frozen" parameters.
    4-bit weights also snapshot their absmax scales."""
    out = {}
    for name, p in model.named_parameters():
        if which != "all" and p.requires_grad != (which == "trainable"):
            continue
        out[name] = (p, p.detach().clone())
        state = getattr(p, "quant_state", None)
        if state is not None:
            out[name + ".absmax"] = (state.absmax, state.absmax.detach().clone())
    return out


def changed(snap: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list[str]:
    return [name for name, (live, before) in snap.items() if not torch.equal(live.detach(), before)]
