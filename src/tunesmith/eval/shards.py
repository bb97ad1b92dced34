"""The processes of a torchrun job answering one eval together.

Every rank runs the same eval, in the same order; what costs compute is split: rank r generates the answers to
prompts r, r + N, r + 2N ... of each local candidate (and scores those for log-prob metrics), and the ranks
exchange the results, so each ends with every answer, in order. What must happen once happens on rank 0 alone
and is sent to the others: the answers kept from an earlier run (--resume), questions to an endpoint (it
charges per query and has its own rate limit), the judge, and every file and line of output.

The ranks exchange JSON over a gloo group of their own (CPU tensors, whatever backend training used), with a
timeout long enough for rank 0 to wait on an endpoint: if a process dies, torchrun stops the others.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from ..train.parallel import all_gather_bytes, world_from_env

T = TypeVar("T")
R = TypeVar("R")
WAIT = datetime.timedelta(hours=12)


class Shards:
    def __init__(self) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():  # `tunesmith eval` started by torchrun, not after training
            dist.init_process_group("gloo", timeout=WAIT)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.group = dist.new_group(backend="gloo", timeout=WAIT)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def split(self, fn: Callable[[list[T]], list[R]], items: Sequence[T], encode: Callable[[R], Any],
              decode: Callable[[Any], R]) -> list[R]:
        """fn over every item, each rank doing items[rank::world]; every rank gets all results in item order."""
        mine = [encode(r) for r in fn(list(items[self.rank::self.world]))]
        parts = [json.loads(b) for b in all_gather_bytes(json.dumps(mine).encode(), torch.device("cpu"), self.group)]
        out: list[R] = [None] * len(items)  # type: ignore[list-item]
        for rank, part in enumerate(parts):
            for k, value in enumerate(part):
                out[rank + k * self.world] = decode(value)
        return out

    def from_main(self, fn: Callable[[], T], encode: Callable[[T], Any] = lambda x: x,
                  decode: Callable[[Any], T] = lambda x: x) -> T:
        """fn() run on rank 0 only; every rank gets its value."""
        import torch.distributed as dist

        data = json.dumps(encode(fn())).encode() if self.main else b""
        size = torch.tensor([len(data)], dtype=torch.int64)
        dist.broadcast(size, 0, group=self.group)
        buffer = (torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.main
                  else torch.zeros(int(size), dtype=torch.uint8))
        dist.broadcast(buffer, 0, group=self.group)
        return decode(json.loads(buffer.numpy().tobytes()))


@functools.cache  # one eval group per process: every eval of the job reuses it
def eval_shards() -> Shards | None:
    """The job's shards when this process is one of several started by torchrun; None for one process."""
    return Shards() if world_from_env()[1] > 1 else None
