"""Continued pre-training: next-token loss on every token of raw documents.

An item is a window of at most `data.max_length` tokens (data/documents.py): `render` gives a document's
windows, and `prepare` makes the run's items of them: all documents' windows, or, with `data.cross_document`,
the windows of the stream of all documents (which attend across document boundaries). Packing puts the windows
of several short documents into one row, kept apart by the block-diagonal attention mask every batch carries.
The loss is the summed NLL of the trained tokens; the loop divides by the trained tokens of the whole
accumulated batch, as for SFT.
"""

from __future__ import annotations

from ..data.documents import stream_items
from ..data.render import Renderer, Tokenized
from ..data.types import Document
from .base import Split
from .sft import SFT


class CPT(SFT):  # SFT's loss, collation and units over document windows
    name = "cpt"
    example_kind = "document"
    needs_reference = False

    def __init__(self) -> None:
        self.stream: tuple[int, int] | None = None  # cross-document: (max_length, overlap), from the renderer

    def render(self, renderer: Renderer, example: Document) -> list[Tokenized]:
        """The document's windows; with cross_document its whole token stream, cut in `prepare`."""
        self.stream = (renderer.max_length, renderer.window_overlap) if renderer.cross_document else None
        return renderer.document(example)

    def prepare(self, items: list[list[Tokenized]], micro_batch_size: int, split: Split
                ) -> tuple[list[Tokenized], str | None]:
        if self.stream is None:
            return [w for windows in items for w in windows], None
        return stream_items([(s.input_ids, s.source) for streams in items for s in streams], *self.stream), None
