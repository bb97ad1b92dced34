"""How many CPU threads torch should use. On some machines (virtual CPUs that share a physical core, busy
hosts) torch's default of one thread per core makes every small element-wise op wait on thread hand-offs:
measured here, a training forward of SmolLM2-135M took 9.3 s with 2 threads and 0.8 s with 1. So `threads:
auto` times a short probe of the model's typical ops at 1 thread and at the core count when a run starts,
and keeps the faster. (On the same machine idle, 2 threads trained 1.6x faster than 1.)"""

from __future__ import annotations

import os
import time

import torch

from .device import cpu_has_native_bf16

_CHOSEN: int | None = None


def _probe(threads: int) -> float:
    torch.set_num_threads(threads)
    dtype = torch.bfloat16 if cpu_has_native_bf16() else torch.float32  # the dtype training will use
    a = torch.randn(16, 64, 576, dtype=dtype)
    w = torch.randn(1536, 576, dtype=dtype)
    for _ in range(2):  # warm-up
        (a * a + a).sum()
        a @ w.T
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(10):
            (a * a + a).sum()
            torch.cat([a, a], dim=-1)
            a @ w.T
        best = min(best, time.perf_counter() - t)
    return best


def best_thread_count() -> int:
    """1 or the core count, whichever runs the probe faster right now (about 0.2 s)."""
    cores = max(1, torch.get_num_threads())
    if cores == 1:
        return 1
    before = torch.get_num_threads()
    times = {n: _probe(n) for n in (1, cores)}
    torch.set_num_threads(before)
    return min(times, key=times.get)


def set_threads(setting: str | int = "auto") -> int:
    """Apply `threads:` (auto or a number) to torch, once per process unless a number is given."""
    global _CHOSEN
    if isinstance(setting, int) or (isinstance(setting, str) and setting.isdigit()):
        _CHOSEN = int(setting)
    elif _CHOSEN is None:
        env = os.environ.get("OMP_NUM_THREADS")
        _CHOSEN = int(env) if env and env.isdigit() else best_thread_count()
    torch.set_num_threads(_CHOSEN)
    return _CHOSEN
