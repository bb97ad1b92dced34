"""The batch source of an online method (GRPO): each step's prompts come from the batch plan, exactly as an
offline method's examples do, and the method turns them into micro-batches by sampling answers from the
current policy (`Method.rollout`, model/sampling.py).

Resume is exact: the sampling generator of sampled batch k is seeded from (seed, k, rank) alone, so a resumed
run draws what the uninterrupted run drew from the same weights. A batch trained on for several steps
(`method_args.iterations`) that a checkpoint interrupts is saved in the `source` checkpoint component (the
method's JSON for its items), since the policy that sampled it is gone by then.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ..data.plan import BatchPlan, eval_chunks
from ..methods.base import Method
from ..model.sampling import Sampler
from .source import Collator, MicroBatch


def sampling_seed(seed: int, *parts: Any) -> int:
    """A generator seed for one sampled batch, from the run's seed and where the batch is."""
    digest = hashlib.sha256(":".join(map(str, (seed, *parts))).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class RolloutSource:
    def __init__(self, method: Method, plan: BatchPlan, items: Sequence[Any], collator: Collator,
                 sampler: Sampler, seed: int, iterations: int = 1, rank: int = 0):
        self.method, self.plan, self.items, self.collator, self.sampler = method, plan, items, collator, sampler
        self.seed, self.iterations, self.rank = seed, iterations, rank
        # optimizer steps: train.max_steps as given, else every sampled batch of the plan `iterations` times
        self.total_steps = plan.max_steps or plan.total_steps * iterations
        self._batch: tuple[int, list[MicroBatch]] | None = None  # (sampled batch index, its micro-batches)
        self._metrics: dict[str, float] = {}
        self._next_step = 0

    def generator(self, *where: Any) -> torch.Generator:
        g = torch.Generator(device=self.sampler.device)
        g.manual_seed(sampling_seed(self.seed, *where, self.rank))
        return g

    def _collate(self, split: str):
        return lambda items: self.collator(split, items).batch

    def step(self, s: int) -> list[MicroBatch]:
        k = s // self.iterations
        self._next_step = s + 1
        self._metrics = {}
        if self._batch is None or self._batch[0] != k:
            prompts = [[(i, self.items[i]) for i in idx] for idx in self.plan.shard(k, self.rank)]
            chunks, self._metrics = self.method.rollout(self.sampler, prompts, self.generator("train", k),
                                                        self._collate("train"))
            self._batch = (k, [self.collator("train", c) for c in chunks])
        return self._batch[1]

    def step_metrics(self) -> dict[str, float]:
        """Sampling metrics of the last step (none on the later iterations of a sampled batch)."""
        return dict(self._metrics)

    def epoch_at(self, steps_done: int) -> float:
        return self.plan.epoch_at(math.ceil(steps_done / self.iterations))

    def eval_batches(self, items: Sequence[Any], micro_batch_size: int, world_size: int = 1) -> Iterator[MicroBatch]:
        """Held-out prompts answered by the current policy, with a fixed generator: evals at different steps
        differ only by the policy."""
        prompts = [[(i, items[i]) for i in idx]
                   for idx in eval_chunks(len(items), micro_batch_size, self.rank, world_size)]
        chunks, _ = self.method.rollout(self.sampler, prompts, self.generator("eval"), self._collate("eval"))
        for c in chunks:
            yield self.collator("eval", c)

    def state_dict(self) -> dict:
        """The sampled batch the next step still trains on, if any (JSON)."""
        if self._batch is None or self._next_step // self.iterations != self._batch[0]:
            return {}
        k, mbs = self._batch
        return {"format": 1, "batch": k, "micro_batches": [self.method.dump_items(mb.items) for mb in mbs]}

    def load_state_dict(self, state: dict) -> None:
        if not state.get("micro_batches"):
            self._batch = None
            return
        mbs = [self.collator("train", self.method.load_items(d, self.items)) for d in state["micro_batches"]]
        self._batch = (state["batch"], mbs)
