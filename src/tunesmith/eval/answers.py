"""Every candidate's answers with what each cost (tokens, time, cut-off), and the on-disk store that lets
`--resume` continue an eval without asking an endpoint (or a local model) again for answers it already gave.

The store is `<out>/answers/<candidate>.jsonl`, one answer per line keyed by a hash of the candidate, the exact
messages it was asked and the token limit. Endpoint answers are appended as they arrive, so an endpoint that
fails half way loses nothing that it answered."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Answer:
    text: str
    prompt_tokens: int | None = None
    new_tokens: int | None = None
    hit_limit: bool = False  # stopped at the token limit: the text may be cut off
    seconds: float = 0.0  # how long the query waited for its answer (a local batch's wall time)
    cached_tokens: int | None = None  # prompt tokens an endpoint's prompt cache served, as it reported
    machine_seconds: float = 0.0  # local: its share of the machine's time (batch time / rows in the batch)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def answer_key(candidate: str, messages: list[dict], max_new_tokens: int) -> str:
    raw = json.dumps([candidate, messages, max_new_tokens], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()[:32]


def _slug(name: str) -> str:
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:8]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[-60:].strip("_") + "-" + digest


class AnswerStore:
    """Answers of one candidate on disk. `resume=False` starts the file afresh."""

    def __init__(self, folder: Path, candidate: str, resume: bool):
        self.path = Path(folder) / f"{_slug(candidate)}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.known: dict[str, Answer] = self._read() if resume and self.path.exists() else {}
        if not resume:
            self.path.write_text("", encoding="utf-8")
        self._lock = threading.Lock()

    def _read(self) -> dict[str, Answer]:
        out = {}
        fields = set(Answer.__dataclass_fields__)
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                out[row["key"]] = Answer(**{k: v for k, v in row.items() if k in fields})
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a crash: that answer is simply asked again
        return out

    def get(self, key: str) -> Answer | None:
        return self.known.get(key)

    def put(self, key: str, answer: Answer) -> None:
        with self._lock:
            self.known[key] = answer
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, **answer.to_dict()}, ensure_ascii=False) + "\n")
