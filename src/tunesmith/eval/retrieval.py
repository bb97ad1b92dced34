"""Retrieval for the `+rag:K`, `+docs:K` and `knn:K` rungs: BM25 (the `bm25s` library) by default, or cosine
similarity of embeddings. The index holds training examples or document passages, never eval examples."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..errors import TunesmithError

EmbedFn = Callable[[Sequence[str]], np.ndarray]
DOC_SUFFIXES = (".txt", ".md", ".markdown", ".rst")
PASSAGE_WORDS = 120  # passages are paragraphs merged or split to about this many words


def _bm25s():
    try:
        import bm25s
    except ImportError:
        raise TunesmithError("+rag, +docs and knn retrieve with BM25, which needs the bm25s package",
                             'pip install "tunesmith[rag]"') from None
    return bm25s


class Retriever:
    """Nearest texts of a fixed corpus: `search(queries, k)` → per query the corpus indices, best first."""

    def __init__(self, corpus: Sequence[str], kind: str = "bm25", embed: EmbedFn | None = None):
        if not corpus:
            raise TunesmithError("nothing to retrieve from: the retrieval corpus is empty",
                                 "give training data (for +rag and knn) or a --docs folder with text files")
        self.size, self.kind = len(corpus), kind
        if kind == "embed":
            if embed is None:
                raise TunesmithError("the embedding retriever needs an embedding model")
            self.embed = embed
            self.vectors = _unit(embed(corpus))
        else:
            bm25s = _bm25s()
            self.index = bm25s.BM25()
            self.index.index(_words(bm25s, corpus), show_progress=False)

    def search(self, queries: Sequence[str], k: int) -> list[list[int]]:
        k = min(k, self.size)
        if self.kind == "embed":
            sims = _unit(self.embed(queries)) @ self.vectors.T
            return [list(np.argsort(-row, kind="stable")[:k]) for row in sims]
        if not queries:
            return []
        docs, _ = self.index.retrieve(_words(_bm25s(), queries), k=k, show_progress=False, n_threads=1)
        return [[int(i) for i in row] for row in docs]


def _words(bm25s, texts: Sequence[str]) -> list[list[str]]:
    """Lower-cased word tokens without English stop words (a query of stop words only scores 0 everywhere)."""
    return bm25s.tokenize(list(texts), stopwords="en", show_progress=False, return_ids=False)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def majority(labels: Sequence[str]) -> str:
    """The most common label; ties go to the one ranked first (labels are given best match first)."""
    counts = Counter(labels)
    top = max(counts.values())
    return next(label for label in labels if counts[label] == top)


def read_passages(folder: str | Path) -> list[tuple[str, str]]:
    """(file, passage) pairs from every text file under `folder`: paragraphs (blank-line separated) merged
    up to about PASSAGE_WORDS words; longer paragraphs are split."""
    root = Path(folder)
    if not root.is_dir():
        raise TunesmithError(f"--docs {root}: no such folder", "give a folder of .txt/.md files")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in DOC_SUFFIXES)
    if not files:
        raise TunesmithError(f"--docs {root}: no text files ({', '.join(DOC_SUFFIXES)}) inside",
                             "put the documents the model should consult there as plain text or markdown")
    out: list[tuple[str, str]] = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TunesmithError(f"cannot read document {path}: {exc}", "documents must be UTF-8 text") from None
        out += [(str(path.relative_to(root)), chunk) for chunk in _chunks(text)]
    return out


def _chunks(text: str) -> list[str]:
    words_of = [p.split() for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]
    pieces = [w[i:i + PASSAGE_WORDS] for w in words_of for i in range(0, len(w), PASSAGE_WORDS)]
    out: list[list[str]] = []
    for piece in pieces:
        if out and len(out[-1]) + len(piece) <= PASSAGE_WORDS:
            out[-1] = out[-1] + piece
        else:
            out.append(list(piece))
    return [" ".join(p) for p in out]
