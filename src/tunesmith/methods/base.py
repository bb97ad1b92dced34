"""The one interface every training method implements, and the defaults most methods share.

The loop and the reference pass use a method only through the members declared in `Method`; nothing outside
`methods/` asks a method for anything else or branches on its name. Per micro-batch:

    items   = [method.render(renderer, ex) ...]           rendered once, before training
    batch   = method.collate(items, pad_id, pack_length)  sequence i of the batch is batch_sequences(items)[i]
    policy  = method.policy_logps(model, batch, chunk)
    ref     = reference("train" | "eval", items, batch)   only when method.needs_reference
    loss, metrics = method.loss(policy, ref, batch)       summed over method.units(batch)

The loop divides every micro-batch's loss by the units of the whole accumulated (global) batch. An online
method (`online`, e.g. GRPO) renders prompts, and its items for the batches above come from `rollout`: the
step's prompts answered by the current policy (train/rollout.py calls it; `dump_items` / `load_items` keep a
sampled batch in a checkpoint while it is still being trained on).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from ..data.batching import Batch
from ..data.render import Renderer, Tokenized
from ..data.types import Example, ExampleKind
from .logps import SeqLogps, sequence_logps

Split = Literal["train", "eval"]


@runtime_checkable
class Method(Protocol):
    name: str
    example_kind: ExampleKind
    needs_reference: bool
    online: bool  # its batches are sampled from the policy during training (train/rollout.py)

    def render(self, renderer: Renderer, example: Example) -> Any | None:
        """Tokenize one canonical example (None when the truncation policy drops it)."""

    def length(self, item: Any) -> int:
        """Tokens an item puts into a batch (for length grouping and throughput)."""

    def prepare(self, items: list[Any], micro_batch_size: int, split: Split) -> tuple[list[Any], str | None]:
        """The rendered items the run will use, and a note for the console when some were left out."""

    def batch_sequences(self, items: Sequence[Any]) -> list[Tokenized]:
        """Every sequence `collate(items)` puts into its batch, in seq-id order. The reference pass scores
        exactly these, so a method whose sequences depend on the micro-batch (KTO) needs no special case."""

    def collate(self, items: Sequence[Any], pad_id: int, pack_length: int | None) -> Batch:
        """Build one micro-batch from rendered items."""

    def units(self, batch: Batch) -> int:
        """What the loss is averaged over (target tokens for SFT, pairs for preference methods)."""

    def policy_logps(self, model: torch.nn.Module, batch: Batch, chunk: int) -> SeqLogps:
        """The policy's log-probs the loss needs."""

    def loss(self, policy: SeqLogps, reference: SeqLogps | None, batch: Batch
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Summed loss over the batch's units, and per-batch metric sums (divided by units when logged)."""

    def diagnose(self, history: Sequence[dict]) -> list[str]:
        """Warnings about a finished stage, read from its logged metrics (e.g. likelihood displacement)."""

    def plan_items(self, items: Sequence[Any]) -> list[Any]:
        """What a micro-batch of these rendered items holds in training, at its largest, for planning memory
        and time (an online method: each prompt with its answers at their longest; else the items)."""

    def rollout(self, sampler: Any, prompts: list[list[Any]], generator: torch.Generator,
                collate: Callable[[list[Any]], Batch]) -> tuple[list[list[Any]], dict[str, float]]:
        """Online methods: the micro-batches (lists of items `collate` takes) of one step, made by sampling
        answers to the step's prompt items (`prompts`, per planned micro-batch) with `sampler`
        (model.sampling.Sampler) and `generator`; and the step's sampling metrics."""

    def dump_items(self, items: Sequence[Any]) -> list:
        """Online methods: JSON for a sampled micro-batch's items (a checkpoint taken mid-way through it)."""

    def load_items(self, data: list, prompts: Sequence[Any]) -> list[Any]:
        """Online methods: the items `dump_items` wrote (`prompts`: the run's rendered prompt items)."""


class MethodBase:
    """Defaults: every rendered item is kept, policy log-probs are per-sequence sums, batches are planned."""

    name = "base"
    example_kind: ExampleKind = "sft"
    needs_reference = False
    online = False

    def prepare(self, items: list[Any], micro_batch_size: int, split: Split) -> tuple[list[Any], str | None]:
        return items, None

    def policy_logps(self, model: torch.nn.Module, batch: Batch, chunk: int) -> SeqLogps:
        return sequence_logps(model, batch, chunk)

    def diagnose(self, history: Sequence[dict]) -> list[str]:
        return []

    def plan_items(self, items: Sequence[Any]) -> list[Any]:
        return list(items)

    def rollout(self, sampler, prompts, generator, collate):
        raise TypeError(f"{self.name} trains on a fixed batch plan; only online methods sample their batches")

    def dump_items(self, items: Sequence[Any]) -> list:
        raise TypeError(f"{self.name} trains on a fixed batch plan; its batches need no checkpoint")

    def load_items(self, data: list, prompts: Sequence[Any]) -> list[Any]:
        raise TypeError(f"{self.name} trains on a fixed batch plan; its batches need no checkpoint")
