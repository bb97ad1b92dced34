"""The optimizer of a run (`train.optimizer`), over the param groups of model/adapters.py:

  adamw             torch's AdamW; on CUDA its fused kernel (one launch for every parameter, instead of a
                    handful of kernels per parameter tensor), elsewhere torch's default implementation
  adamw_8bit        bitsandbytes' blockwise 8-bit AdamW: both moments in 8 bits (2 bytes a weight instead of 8)
  paged_adamw       AdamW with its state in CUDA unified memory, paged out to the host under memory pressure
  paged_adamw_8bit  both (bitsandbytes on CPU runs the paged ones unpaged, with its own warning)
"""

from __future__ import annotations

import torch

from ..errors import TunesmithError

BETAS, EPS = (0.9, 0.999), 1e-8
BNB = {"adamw_8bit": "AdamW8bit", "paged_adamw": "PagedAdamW", "paged_adamw_8bit": "PagedAdamW8bit"}


def optimizer_spec(name: str, device_type: str) -> tuple[str, dict]:
    """(class, keyword arguments beyond lr) for train.optimizer `name` on a device type; "torch.AdamW" or
    "bitsandbytes.<class>"."""
    if name == "adamw":
        return "torch.AdamW", {"betas": BETAS, "eps": EPS, **({"fused": True} if device_type == "cuda" else {})}
    if name in BNB:
        return f"bitsandbytes.{BNB[name]}", {"betas": BETAS, "eps": EPS}
    raise TunesmithError(f"train.optimizer: unknown optimizer '{name}'", f"use one of adamw, {', '.join(BNB)}")


def make_optimizer(groups: list[dict], name: str, lr: float, device_type: str) -> torch.optim.Optimizer:
    cls, kwargs = optimizer_spec(name, device_type)
    if cls == "torch.AdamW":
        return torch.optim.AdamW(groups, lr=lr, **kwargs)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise TunesmithError(f"train.optimizer {name} needs bitsandbytes, which is not installed",
                             "pip install 'tunesmith[qlora]', or use train.optimizer: adamw") from None
    return getattr(bnb.optim, cls.split(".", 1)[1])(groups, lr=lr, **kwargs)


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """The optimizer a RunConfig asks for, over the model's trainable parameters."""
    from ..model.adapters import optimizer_param_groups

    groups = optimizer_param_groups(model, cfg.adapter, cfg.train.lr, cfg.train.weight_decay)
    devices = {p.device.type for g in groups for p in g["params"]}
    return make_optimizer(groups, cfg.train.optimizer, cfg.train.lr, devices.pop() if len(devices) == 1 else "cpu")
