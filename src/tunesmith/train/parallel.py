"""The parallel seam: everything that differs between one process and several lives here — joining the
process group, wrapping the model, which share of the batch plan a rank runs, and the reductions that make a
step's maths independent of the number of processes (units and metric sums over all ranks, the global
gradient norm, one verdict on a non-finite step). The loop calls these and never asks how many processes
there are.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch

from ..errors import TunesmithError


class SingleProcess:
    """One process: every reduction is the identity."""

    engine = "none"
    rank = 0
    world_size = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def accumulating(self, model: torch.nn.Module, last: bool):
        """The context of one micro-batch's backward; gradients are synchronised on the last one only."""
        return contextlib.nullcontext()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over all ranks."""
        return list(values)

    def clip(self, params: list[torch.nn.Parameter], max_norm: float | None) -> float:
        """Clip to `max_norm` by the global gradient norm (over every rank's shard); returns the norm."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return 0.0
        if max_norm is not None:
            return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))

    def all_finite(self, *values: float) -> bool:
        """True when every rank saw only finite values (so every rank takes or skips the step together)."""
        return all(math.isfinite(v) for v in values)

    def gather(self, values: list) -> list:
        """Every rank's list, concatenated in rank order (JSON-like values)."""
        return list(values)

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


def setup_parallel(requested: str = "auto") -> SingleProcess:
    """The engine for this process: single-process unless started by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise TunesmithError(f"started as one of {world} processes (torchrun), but this tunesmith build trains "
                             "in one process only; every rank would train alone on all the data",
                             "run `tunesmith train CONFIG` without torchrun")
    return SingleProcess()
