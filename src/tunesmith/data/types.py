"""Canonical example types. Every input format is normalised into one of these; the rest of tunesmith
(rendering, batching, methods, eval) only ever sees these."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union

Role = Literal["system", "user", "assistant", "tool"]


@dataclass(frozen=True)
class Source:
    """Where a row came from: file path and 1-based line (JSONL) or row (CSV/Parquet/JSON array) number."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class Message:
    role: Role
    content: str
    # Which assistant turns are trained is decided at render time; this flag lets a format opt a
    # turn out (e.g. few-shot examples embedded in a conversation).
    train: bool = True

    def as_dict(self) -> dict:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class Conversation:
    """SFT example: a dialogue; assistant turns are the targets."""

    messages: tuple[Message, ...]
    source: Source | None = None


@dataclass(frozen=True)
class Preference:
    """Paired preference example: a shared prompt dialogue, then the chosen and rejected assistant replies."""

    prompt: tuple[Message, ...]
    chosen: tuple[Message, ...]
    rejected: tuple[Message, ...]
    source: Source | None = None


@dataclass(frozen=True)
class Unpaired:
    """KTO example: a prompt dialogue, one completion, and whether it is desirable."""

    prompt: tuple[Message, ...]
    completion: tuple[Message, ...]
    label: bool
    source: Source | None = None


@dataclass(frozen=True)
class Prompt:
    """Online-training (GRPO) example: a prompt the policy answers during training. `reference` is the answer
    the example carries (its completion, final assistant turn, chosen reply or `reference` column), if any;
    `fields` are the row's other columns, for reward functions that read them."""

    prompt: tuple[Message, ...]
    reference: str | None = None
    fields: dict = field(default_factory=dict, hash=False, compare=False)
    source: Source | None = None


Example = Union[Conversation, Preference, Unpaired, Prompt]

ExampleKind = Literal["sft", "preference", "unpaired", "prompt"]


def kind_of(example: Example) -> ExampleKind:
    if isinstance(example, Conversation):
        return "sft"
    if isinstance(example, Preference):
        return "preference"
    if isinstance(example, Prompt):
        return "prompt"
    return "unpaired"


@dataclass
class Dataset:
    """A loaded, normalised dataset plus what loading it found."""

    examples: list[Example]
    format: str
    kind: ExampleKind
    files: list[str] = field(default_factory=list)
    rejected: list[tuple[Source | None, str]] = field(default_factory=list)  # (where, why) for --skip-invalid
