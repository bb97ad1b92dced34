"""The prompt each candidate sees: the eval example's prompt with the candidate's modifiers applied.

- `+prompt:FILE` replaces the system message with the file's text; `+labels` appends the list of valid labels
  (from the training data) to the system message; `+docs:K` appends the K passages of --docs most relevant
  to the question. Without any of these the prompt keeps its own system message (or the run's).
- `+fewshot:K` puts the same K seeded training examples before every question, `+rag:K` the K training
  examples most similar to it (the most similar last, next to the question); both as earlier user/assistant
  turns after the system message. Neither ever shows an example whose prompt is in the eval set.
- `knn:K` needs no prompt: its answer is the majority answer of the K most similar training examples.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.formats import prompt_messages, target_messages
from ..data.types import Example, Message
from ..errors import TunesmithError
from .candidates import Candidate, describe_shots, pick_shots, prompt_key, with_shots
from .metrics import normalize
from .retrieval import EmbedFn, Retriever, majority, read_passages

MAX_LABELS = 300  # more distinct answers than this is not label-style data
MAX_LABEL_WORDS = 12
LABELS_INSTRUCTION = "Answer with exactly one of these labels and nothing else:"
DOCS_INSTRUCTION = "Use these passages if they help to answer:"


def query_text(prompt: Sequence[Message]) -> str:
    """What retrieval searches with: the prompt's non-system turns."""
    return "\n".join(m.content for m in prompt if m.role != "system")


def answer_text(example: Example) -> str:
    return "\n".join(m.content for m in target_messages(example) if m.role == "assistant")


def label_set(train: Sequence[Example]) -> list[str]:
    """The distinct answers of label-style training data (sorted); raises when the answers are not labels."""
    labels: dict[str, str] = {}
    for ex in train:
        text = answer_text(ex).strip()
        if text:
            labels.setdefault(normalize(text), text)
    long = [t for t in labels.values() if len(t.split()) > MAX_LABEL_WORDS]
    if not labels or len(labels) > MAX_LABELS or long:
        why = (f"{len(labels)} distinct answers" if len(labels) > MAX_LABELS or not labels
               else f"answers such as {long[0][:60]!r} are longer than {MAX_LABEL_WORDS} words")
        raise TunesmithError(f"+labels needs label-style training data (at most {MAX_LABELS} distinct short "
                             f"answers); found {why}", "use +prompt:FILE with your own instructions instead")
    return sorted(labels.values())


def labels_text(labels: Sequence[str]) -> str:
    return LABELS_INSTRUCTION + "\n" + "\n".join(labels)


@dataclass
class PromptBuilder:
    """Builds every candidate's prompts for one eval set. Retrieval indexes are made once and shared."""

    prompts: list[tuple[Message, ...]]
    train: Sequence[Example] | None = None
    docs: str | Path | None = None
    fewshot_seed: int = 0
    default_system: str | None = None
    embed: EmbedFn | None = None
    _retrievers: dict[tuple[str, str], Retriever] = field(default_factory=dict)
    _pool: list[Example] | None = None
    _passages: list[tuple[str, str]] | None = None
    search_seconds: dict[str, float] = field(default_factory=dict)  # per candidate: its queries' retrieval time

    def build(self, cand: Candidate) -> tuple[list[tuple[Message, ...]], dict[str, Any]]:
        """The candidate's prompts and what was added to them (for results.json)."""
        out, added = list(self.prompts), {}
        if cand.prompt_file or cand.labels or cand.docs:
            systems, added = self._systems(cand)
            out = [_with_system(p, s) for p, s in zip(out, systems, strict=True)]
        if cand.fewshot:
            shots = pick_shots(self._need_train(cand), cand.fewshot, self.fewshot_seed, self.prompts)
            out = [with_shots(p, shots) for p in out]
            added["fewshot"] = describe_shots(shots)
        elif cand.rag:
            pool = self.pool(cand)
            hits = self._search(cand, "train", cand.retriever, cand.rag)
            out = [with_shots(p, [pool[i] for i in reversed(h)]) for p, h in zip(out, hits, strict=True)]
            added["rag"] = [describe_shots([pool[i] for i in h]) for h in hits]
        return out, added

    def knn_answers(self, cand: Candidate) -> list[str]:
        pool = self.pool(cand)
        hits = self._search(cand, "train", cand.retriever, cand.knn)
        return [majority([answer_text(pool[i]) for i in h]) for h in hits]

    def index(self, cand: Candidate) -> None:
        """Build the training examples' index for a knn or +rag candidate now (a one-off, like training)."""
        self.pool(cand)
        self.retriever("train", cand.retriever)

    def _search(self, cand: Candidate, corpus: str, kind: str, k: int) -> list[list[int]]:
        """The k best of `corpus` for every prompt. Building the index is not timed (it is done once, whatever
        the number of queries); the searches are, per candidate: retrieval is part of answering a query."""
        index = self.retriever(corpus, kind)
        started = time.perf_counter()
        hits = index.search([query_text(p) for p in self.prompts], k)
        self.search_seconds[cand.name] = self.search_seconds.get(cand.name, 0.0) + time.perf_counter() - started
        return hits

    def pool(self, cand: Candidate) -> list[Example]:
        """Training examples retrieval may return: none whose prompt is in the eval set."""
        if self._pool is None:
            banned = {prompt_key(p) for p in self.prompts}
            self._pool = [ex for ex in self._need_train(cand)
                          if prompt_key(prompt_messages(ex)) not in banned and answer_text(ex).strip()]
        return self._pool

    def retriever(self, corpus: str, kind: str) -> Retriever:
        if (corpus, kind) not in self._retrievers:
            texts = ([query_text(prompt_messages(ex)) for ex in self._pool or []] if corpus == "train"
                     else [text for _, text in self._passages or []])
            self._retrievers[(corpus, kind)] = Retriever(texts, kind, self.embed)
        return self._retrievers[(corpus, kind)]

    def _need_train(self, cand: Candidate) -> Sequence[Example]:
        if not self.train:
            raise TunesmithError(f"{cand.name} needs training examples, and no training data was given",
                                 "pass --train-data FILE (examples are never taken from the eval data)")
        return self.train

    def _systems(self, cand: Candidate) -> tuple[list[str], dict[str, Any]]:
        added: dict[str, Any] = {}
        if cand.prompt_file:
            base = [_read_prompt(cand.prompt_file)] * len(self.prompts)
            added["prompt_file"] = str(cand.prompt_file)
        else:
            base = [_system_of(p) or self.default_system or "" for p in self.prompts]
        if cand.labels:
            listing = labels_text(label_set(self._need_train(cand)))
            base = [_join(b, listing) for b in base]
            added["labels"] = listing.count("\n")
        if cand.docs:
            if self._passages is None:
                if self.docs is None:
                    raise TunesmithError(f"{cand.name} needs documents to retrieve from", "pass --docs FOLDER")
                self._passages = read_passages(self.docs)
            hits = self._search(cand, "docs", "bm25", cand.docs)
            base = [_join(b, _passages_text([self._passages[i] for i in h])) for b, h in zip(base, hits, strict=True)]
            added["docs"] = [[self._passages[i][0] for i in h] for h in hits]
        return base, added


def _passages_text(passages: Sequence[tuple[str, str]]) -> str:
    return DOCS_INSTRUCTION + "\n\n" + "\n\n".join(f"[{i + 1}] ({name}) {text}"
                                                  for i, (name, text) in enumerate(passages))


def _join(first: str, second: str) -> str:
    return f"{first}\n\n{second}" if first else second


def _system_of(prompt: Sequence[Message]) -> str | None:
    systems = [m.content for m in prompt if m.role == "system"]
    return "\n\n".join(systems) if systems else None


def _with_system(prompt: Sequence[Message], text: str) -> tuple[Message, ...]:
    rest = tuple(m for m in prompt if m.role != "system")
    return ((Message("system", text, train=False),) if text else ()) + rest


def _read_prompt(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise TunesmithError(f"cannot read the prompt file {path}: {exc}", "it must be a UTF-8 text file") from None
    if not text:
        raise TunesmithError(f"the prompt file {path} is empty", "write the system prompt in it")
    return text
