"""Device, precision and process rank come from this one place, so the same loop runs alone or under
torchrun."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str  # bf16 | fp16 | fp32
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def autocast(self):
        dtype = self.autocast_dtype
        if dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=dtype)


def pick_device(requested: str = "auto") -> torch.device:
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def make_runtime(device: str = "auto", precision: str = "bf16", threads: str | int = "auto") -> Runtime:
    dev = pick_device(device)
    if dev.type == "cpu":
        from .allocator import keep_freed_memory
        from .threads import set_threads

        set_threads(threads)
        keep_freed_memory()
    if precision == "fp16" and dev.type == "cpu":
        precision = "bf16"
    if precision == "bf16" and dev.type == "mps":
        precision = "fp16"
    return Runtime(dev, precision, rank=int(os.environ.get("RANK", 0)),
                   world_size=int(os.environ.get("WORLD_SIZE", 1)))
