"""The transformers model under the wrappers training puts around it, and what those wrappers hold."""

from __future__ import annotations

import torch


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under PEFT / DDP / FSDP / compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def reshard(module: object) -> None:
    """Drop the full weights FSDP2 gathered and kept (its root keeps them after a forward, to reuse them in
    the backward). After a forward without gradients (a reference or eval pass), or after swapping shard
    values, the next forward must gather afresh, or it computes with the old copy and no gradient."""
    for m in module.modules() if isinstance(module, torch.nn.Module) else ():
        if type(m).__name__.startswith("FSDP") and hasattr(m, "reshard"):
            m.reshard()
