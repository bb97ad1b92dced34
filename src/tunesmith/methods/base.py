"""The one interface every training method implements. The loop asks a method to turn rendered examples
into a batch, gets policy (and reference) log-probs from `logps.sequence_logps`, and asks the method for the
loss; everything else — accumulation, clipping, scheduling, logging — is the same for every method."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from ..data.batching import Batch
from ..data.render import Renderer
from ..data.types import Example, ExampleKind
from .logps import SeqLogps


class Method(Protocol):
    name: str
    example_kind: ExampleKind
    needs_reference: bool

    def render(self, renderer: Renderer, example: Example) -> Any | None:
        """Tokenize one canonical example (None when the truncation policy drops it)."""

    def length(self, item: Any) -> int:
        """Tokens an item puts into a batch (for length grouping and throughput)."""

    def collate(self, items: Sequence[Any], pad_id: int, pack_length: int | None) -> Batch:
        """Build one micro-batch from rendered items."""

    def units(self, batch: Batch) -> int:
        """What the loss is averaged over (target tokens for SFT, pairs for preference methods). The loop
        sums this over a whole accumulated batch so accumulation never changes the maths."""

    def loss(self, policy: SeqLogps, reference: SeqLogps | None, batch: Batch
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Summed loss over the batch's units, and per-batch metric sums (divided by units when logged)."""
