"""Where the loop's batches come from. The loop asks a source for "the micro-batches of step s"; an offline
method's source reads them from the fixed batch plan, an online method's source generates them with the
current policy. Either way a step is a list of collated micro-batches that know their items and split, so
the reference can be asked for exactly those sequences.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..data.batching import Batch
from ..data.plan import BatchPlan, eval_chunks
from ..methods.base import Method, Split


@dataclass
class MicroBatch:
    split: Split
    items: list[Any]  # the rendered items the batch was collated from
    batch: Batch  # on the training device
    weight: float = 1.0  # 0: padding that keeps a rank's collectives in step with the others; counts nothing


class BatchSource(Protocol):
    total_steps: int

    def step(self, s: int) -> list[MicroBatch]:
        """This rank's micro-batches of optimizer step s (0-based)."""

    def epoch_at(self, steps_done: int) -> float:
        """Epochs of data consumed after `steps_done` steps (for logging)."""

    def step_metrics(self) -> dict[str, float]:
        """What making the last step's batches measured (an online source: sampling time and speed)."""

    def state_dict(self) -> dict:
        """JSON-serialisable state a resume needs (empty for a fixed plan)."""

    def load_state_dict(self, state: dict) -> None: ...


class Collator:
    """A method's collation with the run's padding and packing, onto the training device."""

    def __init__(self, method: Method, pad_id: int, pack_length: int | None, device: torch.device):
        self.method, self.pad_id, self.pack_length, self.device = method, pad_id, pack_length, device

    def __call__(self, split: Split, items: list[Any], weight: float = 1.0) -> MicroBatch:
        batch = self.method.collate(items, self.pad_id, self.pack_length).to(self.device)
        return MicroBatch(split, items, batch, weight)


def padded(groups: list[list[int]], n: int, fallback: list[int]) -> list[tuple[list[int], float]]:
    """`groups` with weight 1, then repeats of the last one (or `fallback`) with weight 0 up to n: every rank
    runs the same number of forwards and backwards, which sharded engines need."""
    filler = groups[-1] if groups else fallback
    return [(g, 1.0) for g in groups] + [(filler, 0.0)] * (n - len(groups))


class PlannedSource:
    """The fixed batch plan of an offline method: a pure function of (seed, epoch), so resuming needs no
    state of its own."""

    def __init__(self, plan: BatchPlan, items: Sequence[Any], collator: Collator, rank: int = 0):
        self.plan, self.items, self.collator, self.rank = plan, items, collator, rank
        self.total_steps = plan.total_steps

    def step(self, s: int) -> list[MicroBatch]:
        n = len(self.plan.shard(s, 0))  # rank 0 has the most micro-batches of a step
        groups = padded(self.plan.shard(s, self.rank), n, self.plan.step(s)[0])
        return [self.collator("train", [self.items[i] for i in idx], w) for idx, w in groups]

    def epoch_at(self, steps_done: int) -> float:
        return self.plan.epoch_at(steps_done)

    def step_metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def eval_batches(items: Sequence[Any], micro_batch_size: int, collator: Collator, rank: int = 0,
                 world_size: int = 1) -> Iterator[MicroBatch]:
    """This rank's share of the held-out micro-batches, in file order (padded to rank 0's count)."""
    n = len(eval_chunks(len(items), micro_batch_size, 0, world_size))
    mine = eval_chunks(len(items), micro_batch_size, rank, world_size)
    for idx, w in padded(mine, n, eval_chunks(len(items), micro_batch_size)[0]):
        yield collator("eval", [items[i] for i in idx], w)


def planned_items(plan: BatchPlan, items: Sequence[Any], eval_items: Sequence[Any] | None,
                  micro_batch_size: int) -> dict[str, list[list[Any]]]:
    """The items of every micro-batch the run will form, per split: what a precomputed reference scores."""
    out = {"train": [[items[i] for i in idx] for idx in plan.micro_batches()]}
    if eval_items:
        out["eval"] = [[eval_items[i] for i in idx] for idx in eval_chunks(len(eval_items), micro_batch_size)]
    return out
