"""The batch plan: which examples form each micro-batch of each optimizer step, on each rank.

One object answers it for everyone who needs to know — the training loop, the reference pre-pass (which must
score exactly the micro-batches the run will form) and the eval loss. The plan is a pure function of the
example lengths and the settings, so a resumed run, another process or another world size sees the same
batches.

Steps are aligned to epochs: an epoch of P micro-batches gives ceil(P / A) steps, A = grad_accum x world size
micro-batches per step, and when P is not a multiple of A the epoch's last step is shorter instead of reaching
into the next epoch. (The loop normalises a step by the units it really holds, so a short step is an ordinary
smaller batch.) Rank r of a step takes the step's micro-batches r, r + W, r + 2W, ...; the union over ranks is
the step of a single process with grad_accum x world size accumulation.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from .batching import batch_order


@dataclass
class BatchPlan:
    lengths: Sequence[int]
    micro_batch_size: int
    grad_accum: int = 1  # micro-batches per step on each rank
    world_size: int = 1
    seed: int = 0
    group_by_length: bool = True
    epochs: float = 1.0
    max_steps: int | None = None
    _orders: dict[int, list[list[int]]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_config(cls, lengths: Sequence[int], train, world_size: int = 1) -> BatchPlan:
        """The plan of a `train:` section (config.TrainConfig) for examples of these lengths."""
        return cls(list(lengths), train.micro_batch_size, train.grad_accum, world_size, train.seed,
                   train.group_by_length, train.epochs, train.max_steps)

    # ---- sizes --------------------------------------------------------------------------------------
    @property
    def per_step(self) -> int:
        """Micro-batches in a full step, over all ranks."""
        return self.grad_accum * self.world_size

    @property
    def per_epoch(self) -> int:
        """Micro-batches in an epoch."""
        return math.ceil(len(self.lengths) / self.micro_batch_size)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.per_epoch / self.per_step)

    @property
    def total_steps(self) -> int:
        return self.max_steps or max(1, math.ceil(self.steps_per_epoch * self.epochs))

    # ---- which examples ------------------------------------------------------------------------------
    def order(self, epoch: int) -> list[list[int]]:
        """The micro-batches of one epoch (example indices), seeded by (seed, epoch)."""
        if epoch not in self._orders:
            self._orders = {epoch: batch_order(self.lengths, self.micro_batch_size, self.seed, epoch,
                                               self.group_by_length)}
        return self._orders[epoch]

    def step(self, s: int) -> list[list[int]]:
        """Every micro-batch of step s (0-based), over all ranks, in order."""
        epoch, j = divmod(s, self.steps_per_epoch)
        return self.order(epoch)[j * self.per_step:(j + 1) * self.per_step]

    def shard(self, s: int, rank: int = 0) -> list[list[int]]:
        """The micro-batches rank `rank` runs in step s (possibly none in an epoch's short last step)."""
        return self.step(s)[rank::self.world_size]

    def epoch_at(self, steps_done: int) -> float:
        """Epochs completed after `steps_done` steps."""
        if steps_done <= 0:
            return 0.0
        epoch, j = divmod(steps_done - 1, self.steps_per_epoch)
        return epoch + min((j + 1) * self.per_step, self.per_epoch) / self.per_epoch

    def micro_batches(self) -> Iterator[list[int]]:
        """Every micro-batch the run will form, in training order (over all ranks)."""
        for s in range(self.total_steps):
            yield from self.step(s)


def eval_chunks(n: int, size: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """Held-out examples in file order, `size` at a time; rank r takes chunks r, r + W, ..."""
    chunks = [list(range(k, min(k + size, n))) for k in range(0, n, size)]
    return chunks[rank::world_size]
