"""The data doctor's checks of raw documents (continued pre-training): token and window counts, boilerplate
repeated across documents, and leakage between training and held-out documents. Exact and near-duplicate
documents are found by the doctor's duplicate check, which compares whole texts."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from . import dedup
from .doctor import Finding, LengthStats, _finding, _where, length_stats
from .types import Document

BOILERPLATE_MIN_CHARS = 20  # shorter lines (headings, "Returns:", "See also") repeat by nature
BOILERPLATE_MIN_DOCS = 3
BOILERPLATE_FRACTION = 0.05  # ... and at least this share of the documents
PASSAGE_WORDS = 13  # a verbatim run of 13 words shared with training (GPT-3's contamination test)
PASSAGE_SHARE = 0.2  # a held-out document with at least this share of its 13-grams in training
_WORD = re.compile(r"\w+")


def token_counts(docs: Sequence[Document], tokenizer, max_length: int, overlap: int,
                 cross_document: bool) -> tuple[LengthStats, dict[str, int]]:
    """Document lengths in tokens (separators included) and what training makes of them at max_length."""
    from .documents import render_documents

    lengths, totals = [], {"documents": 0, "windows": 0, "tokens": 0, "trained_tokens": 0}
    for doc in docs:  # one at a time: the lengths are per document
        items, counts = render_documents(tokenizer, [doc], max_length, overlap)
        lengths.append(counts.tokens)
        for key in ("documents", "windows", "tokens", "trained_tokens"):
            totals[key] += getattr(counts, key)
    if cross_document:
        _, counts = render_documents(tokenizer, docs, max_length, overlap, True)
        totals.update(windows=counts.windows, trained_tokens=counts.trained_tokens)
    return length_stats(lengths, max_length), totals


def boilerplate_findings(docs: Sequence[Document]) -> list[Finding]:
    """Lines (of at least 20 characters, compared case-folded with whitespace collapsed) that occur in at least
    3 documents and 5% of them: navigation, licence headers, footers. Trained on every copy, they crowd out
    the text that differs."""
    where: dict[str, list[str]] = {}
    for doc in docs:
        for line in {dedup.normalise_text(x) for x in doc.text.splitlines()}:
            if len(line) >= BOILERPLATE_MIN_CHARS and _WORD.search(line):
                where.setdefault(line, []).append(_where(doc))
    least = max(BOILERPLATE_MIN_DOCS, math.ceil(BOILERPLATE_FRACTION * len(docs)))
    repeated = sorted(((line, w) for line, w in where.items() if len(w) >= least), key=lambda lw: -len(lw[1]))
    if not repeated:
        return []
    rows = [f"{len(w)} documents: {line[:120]!r}" for line, w in repeated]
    return [_finding("warning", "boilerplate", f"{len(repeated)} line(s) repeated across at least {least} "
                     "documents", rows, "strip navigation, headers and footers before training; every copy is "
                     "trained", groups=[w for _, w in repeated])]


def leakage_findings(train: Sequence, held: Sequence) -> list[Finding]:
    """Held-out documents that also occur in training (error), are near copies of a training document, or
    (among the others) share long verbatim passages with training (warnings)."""
    train_docs = [d for d in train if isinstance(d, Document)]
    held_docs = [d for d in held if isinstance(d, Document)]
    keys = {dedup.normalise_text(d.text): d for d in train_docs}
    findings = []
    exact = [f"{_where(d)} = {_where(keys[dedup.normalise_text(d.text)])}" for d in held_docs
             if dedup.normalise_text(d.text) in keys]
    if exact:
        findings.append(_finding("error", "leakage", f"{len(exact)} held-out document(s) also in the training data",
                                 exact, "remove them from one side; otherwise the eval measures memorisation"))
    sets = dedup.drop_common([dedup.shingles(d.text) for d in [*train_docs, *held_docs]])
    n = len(train_docs)
    pairs = dedup.similar_pairs(sets, keep=lambda i, j: (i < n) != (j < n))
    near = sorted({(max(i, j) - n, min(i, j)) for i, j, _ in pairs})
    near = [(e, t) for e, t in near if dedup.normalise_text(held_docs[e].text) not in keys]
    if near:
        findings.append(_finding("warning", "near_leakage", f"{len(near)} held-out/training document pair(s) are "
                                 f"near duplicates (Jaccard >= {dedup.THRESHOLD})",
                                 [f"{_where(held_docs[e])} ~ {_where(train_docs[t])}" for e, t in near],
                                 "check whether these make the held-out perplexity too easy"))
    reported = {e for e, _ in near} | {i for i, d in enumerate(held_docs) if dedup.normalise_text(d.text) in keys}
    findings += _passage_findings(train_docs, [d for i, d in enumerate(held_docs) if i not in reported])
    return findings


def _grams(text: str) -> list[int]:
    words = _WORD.findall(text.casefold())
    return [hash(" ".join(words[i:i + PASSAGE_WORDS])) for i in range(len(words) - PASSAGE_WORDS + 1)]


def _passage_findings(train: Sequence[Document], held: Sequence[Document]) -> list[Finding]:
    seen = {g for d in train for g in _grams(d.text)}
    rows = []
    for d in held:
        grams = _grams(d.text)
        share = sum(g in seen for g in grams) / len(grams) if grams else 0.0
        if share >= PASSAGE_SHARE:
            rows.append(f"{_where(d)}: {share:.0%} of its {PASSAGE_WORDS}-word runs occur in training")
    if not rows:
        return []
    return [_finding("warning", "passage_leakage", f"{len(rows)} held-out document(s) share long verbatim "
                     f"passages with training ({PASSAGE_WORDS}-word runs)", rows,
                     "remove the shared passages from one side, or the held-out perplexity partly measures "
                     "memorisation")]
