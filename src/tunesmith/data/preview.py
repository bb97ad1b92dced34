"""What a model learns from each example: the rendered text cut into trained and untrained spans.

`preview_spans` is pure; `example_views` renders an example the way training does (same Renderer) and names
each rendered sequence, so `tunesmith data preview` can show a preference pair's two sides or a KTO label.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .documents import window_items
from .render import IGNORE, Renderer, Tokenized
from .types import Conversation, Document, Example, Preference

WINDOWS_SHOWN = 3  # windows of a long document shown by `data preview`

Span = tuple[str, bool]  # (text, trained)


def preview_spans(tokenizer, tokenized: Tokenized) -> list[Span]:
    """The rendered text of `tokenized` as maximal runs of trained / untrained tokens, in order.

    Each run's text is the difference between decoding the ids up to its end and up to its start, so a word
    split across a boundary or a tokenizer that drops a leading space when decoding a piece alone still reads
    exactly as the whole does; where that difference is not well defined (a boundary inside a multi-byte
    character) the run is decoded on its own."""
    ids, labels = list(tokenized.input_ids), tokenized.labels
    if not ids:
        return []
    bounds = [0] + [k for k in range(1, len(ids)) if (labels[k] != IGNORE) != (labels[k - 1] != IGNORE)]
    bounds.append(len(ids))
    texts = [_decode(tokenizer, ids[:b]) for b in bounds]
    spans: list[Span] = []
    for k in range(len(bounds) - 1):
        start, stop = bounds[k], bounds[k + 1]
        whole, before = texts[k + 1], texts[k]
        text = whole[len(before):] if whole.startswith(before) else _decode(tokenizer, ids[start:stop])
        spans.append((text, labels[start] != IGNORE))
    return spans


def marked(spans: Sequence[Span], open_mark: str = "[[", close_mark: str = "]]") -> str:
    """Plain text with trained spans between markers, for output that is not a colour terminal."""
    return "".join(f"{open_mark}{text}{close_mark}" if trained else text for text, trained in spans)


@dataclass(frozen=True)
class View:
    """One rendered sequence of an example: a title ("chosen", "completion (desirable)", "" for SFT) and the
    tokenized sequence, None when rendering dropped it (nothing left to train, or truncation: drop)."""

    title: str
    tokenized: Tokenized | None


def example_views(renderer: Renderer, example: Example) -> tuple[list[View], bool]:
    """Render `example` as training does. Returns its sequences and whether truncation cut any of them. A
    document shows its first windows (the rest are counted by `data check`); a window's first tokens that
    repeat the previous window (data.window_overlap) are context, not trained."""
    truncated_before = renderer.stats.truncated
    if isinstance(example, Document):
        windows = renderer.document(example)
        if renderer.cross_document and windows:  # its own stream; in training the windows run on into the next
            windows = window_items(windows[0].input_ids, renderer.max_length, renderer.window_overlap,
                                   example.source)
        views = [View(f"window {k + 1}/{len(windows)}", w) for k, w in enumerate(windows[:WINDOWS_SHOWN])]
        return views, False
    if isinstance(example, Conversation):
        views = [View("", renderer.sft(example))]
    elif isinstance(example, Preference):
        pair = renderer.preference(example)
        views = [View("chosen", pair.chosen), View("rejected", pair.rejected)] if pair else [View("pair", None)]
    else:
        out = renderer.unpaired(example)
        label = "desirable" if example.label else "undesirable"
        views = [View(f"completion ({label})", None if out is None else out.completion)]
    return views, renderer.stats.truncated > truncated_before


def _decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)
