"""Continued pre-training: next-token loss on every token of raw documents.

Documents are cut into `data.max_length` windows (data/documents.py); a window is one sequence, so packing
puts the windows of several short documents into one row, kept apart by the block-diagonal attention mask
every batch carries (or, with `data.cross_document`, windows cut from the stream of all documents, which
attend across document boundaries). The loss is the summed NLL of the trained tokens; the loop divides by the
trained tokens of the whole accumulated batch, as for SFT.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..data.batching import Batch, collate
from ..data.render import Renderer, Tokenized
from ..data.types import Document
from .logps import SeqLogps


class CPT:
    name = "cpt"
    example_kind = "document"
    needs_reference = False

    def render(self, renderer: Renderer, example: Document) -> list[Tokenized]:
        """One document's windows. Training renders the whole dataset at once (`render_all`): its items are
        windows, not documents, and cross-document windows span several documents."""
        return renderer.document(example)

    def render_all(self, renderer: Renderer, examples: Sequence[Document]) -> list[Tokenized]:
        return renderer.documents(examples)

    def length(self, item: Tokenized) -> int:
        return len(item)

    def collate(self, items: Sequence[Tokenized], pad_id: int, pack_length: int | None) -> Batch:
        return collate(items, pad_id, pack_length)

    def units(self, batch: Batch) -> int:
        return batch.n_target_tokens

    def loss(self, policy: SeqLogps, reference: SeqLogps | None, batch: Batch
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return -policy.logp_sum.sum(), {}
