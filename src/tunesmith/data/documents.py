"""Raw documents for continued pre-training: token ids, windows, and the counts.

A document is its text's tokens (after BOS when the tokenizer adds one) followed by the end-of-text token,
which separates documents that share a packed row and teaches the model where a document ends. Every token is
trained. A document longer than `max_length` is cut into windows of `max_length` tokens; consecutive windows
overlap by `overlap` tokens, which are context only in the later window (their labels are IGNORE): each token is
a target exactly once, and with an overlap the first targets of a window still see that much of the text before
them. A window's first token is never a target (nothing in the row precedes it), so with overlap 0 the first
token of each window after the first is not trained; an overlap of 1 or more trains every token but the
document's first. With `cross_document` the documents form one stream, cut into windows the same way, so a window
can hold the end of one document and the start of the next and attention crosses the boundary (classic
pre-training); otherwise each document is windowed alone and packing keeps documents apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import TunesmithError
from .render import IGNORE, Tokenized
from .types import Document, Source

END_OF_TEXT_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "<eos>", "</s>")


@dataclass
class DocumentCounts:
    documents: int = 0
    windows: int = 0
    tokens: int = 0  # document tokens, separators included (an overlap is counted once)
    trained_tokens: int = 0
    dropped: list[str] = field(default_factory=list)  # documents with nothing to train (no text tokens)


def end_of_text_id(tokenizer) -> int:
    """The token that ends a document: the vocabulary's end-of-text special (what pre-training used to
    separate documents) when it has one, else EOS. Chat models often set EOS to their end-of-turn token
    (SmolLM2 and Qwen2.5: <|im_end|>; Llama-3 instruct: <|eot_id|>), which is not a document separator."""
    special = set(tokenizer.all_special_tokens or [])
    special |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    vocab = tokenizer.get_vocab()
    for token in END_OF_TEXT_TOKENS:
        if token in vocab and token in special:
            return vocab[token]
    if tokenizer.eos_token_id is None:
        raise TunesmithError("the tokenizer has no end-of-text or EOS token to separate documents",
                             "use a tokenizer with an EOS token for method: cpt")
    return tokenizer.eos_token_id


def document_ids(tokenizer, text: str, end_id: int, bos: bool) -> list[int]:
    """BOS (when the tokenizer adds one), the text's tokens, the end-of-text token. Special-token strings that
    happen to occur in the text are read as text, not as control tokens."""
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]
    start = [tokenizer.bos_token_id] if bos and tokenizer.bos_token_id is not None else []
    return start + list(ids) + [end_id]


def windows(n: int, max_length: int, overlap: int) -> list[tuple[int, int, int]]:
    """(start, stop, first target) of each window over n tokens: windows of max_length tokens, each after the
    first starting `overlap` tokens before the previous one ended; positions before `first target` are context."""
    if not 0 <= overlap < max_length - 1:
        raise TunesmithError(f"data.window_overlap must be at least 0 and below max_length - 1 ({max_length - 1}), "
                             f"got {overlap}", "e.g. data.window_overlap: 64")
    out, start = [], 0
    while True:
        stop = min(start + max_length, n)
        out.append((start, stop, start + (overlap if start else 0)))
        if stop >= n:
            return out
        start = stop - overlap


def window_items(ids: Sequence[int], max_length: int, overlap: int, source: Source | None) -> list[Tokenized]:
    """One document's (or one stream's) windows, every token a target once (see the module docstring)."""
    ids = list(ids)
    items = []
    for start, stop, first in windows(len(ids), max_length, overlap):
        labels = [IGNORE] * (first - start) + ids[first:stop]
        labels[0] = IGNORE  # the window's first token has nothing before it in the row
        items.append(Tokenized(tuple(ids[start:stop]), tuple(labels), source))
    return items


def stream_items(docs: Sequence[tuple[Sequence[int], Source | None]], max_length: int, overlap: int
                 ) -> list[Tokenized]:
    """The windows of the documents' concatenation (cross-document attention); a window names the document its
    first target belongs to."""
    if not docs:
        return []
    stream = [t for ids, _ in docs for t in ids]
    ends, at = [], 0
    for ids, src in docs:
        at += len(ids)
        ends.append((at, src))
    items, k = [], 0
    for item, (_, _, first) in zip(window_items(stream, max_length, overlap, None),
                                   windows(len(stream), max_length, overlap), strict=True):
        while ends[k][0] <= first:
            k += 1
        items.append(Tokenized(item.input_ids, item.labels, ends[k][1]))
    return items


def stream_counts(n: int, max_length: int, overlap: int) -> tuple[int, int]:
    """(windows, trained tokens) of a stream of n tokens."""
    spans = windows(n, max_length, overlap)
    return len(spans), sum(stop - max(first, start + 1) for start, stop, first in spans)


def render_documents(tokenizer, docs: Sequence[Document], max_length: int, overlap: int = 0,
                     cross_document: bool = False) -> tuple[list[Tokenized], DocumentCounts]:
    """Every document's windows (or, with cross_document, the windows of their concatenation) and the counts."""
    end_id = end_of_text_id(tokenizer)
    bos = adds_bos(tokenizer)
    counts = DocumentCounts(documents=len(docs))
    kept: list[tuple[list[int], Source | None]] = []
    for doc in docs:
        ids = document_ids(tokenizer, doc.text, end_id, bos)
        if len(ids) - bos < 2:  # the separator alone: the text gave no tokens
            counts.dropped.append(str(doc.source) if doc.source else "?")
            continue
        kept.append((ids, doc.source))
    if cross_document:
        items = stream_items(kept, max_length, overlap)
    else:
        items = [w for ids, src in kept for w in window_items(ids, max_length, overlap, src)]
    counts.windows = len(items)
    counts.tokens = sum(len(ids) for ids, _ in kept)
    counts.trained_tokens = sum(x.n_target for x in items)
    return items, counts


def adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos
