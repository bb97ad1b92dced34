"""Supervised fine-tuning: next-token loss on the trained (assistant) tokens only."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..data.batching import Batch, collate
from ..data.render import Renderer, Tokenized
from ..data.types import Conversation
from .base import MethodBase
from .logps import SeqLogps


class SFT(MethodBase):
    name = "sft"
    example_kind = "sft"
    needs_reference = False

    def render(self, renderer: Renderer, example: Conversation) -> Tokenized | None:
        return renderer.sft(example)

    def length(self, item: Tokenized) -> int:
        return len(item)

    def batch_sequences(self, items: Sequence[Tokenized]) -> list[Tokenized]:
        return list(items)

    def collate(self, items: Sequence[Tokenized], pad_id: int, pack_length: int | None) -> Batch:
        return collate(items, pad_id, pack_length)

    def units(self, batch: Batch) -> int:
        return batch.n_target_tokens

    def loss(self, policy: SeqLogps, reference: SeqLogps | None, batch: Batch
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return -policy.logp_sum.sum(), {}
