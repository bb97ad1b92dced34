"""Canonical example types. Every input format is normalised into one of these; the rest of tunesmith
(rendering, batching, methods, eval) only ever sees these."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal, Union

Role = Literal["system", "user", "assistant", "tool"]


@dataclass(frozen=True)
class Source:
    """Where a row came from: file path and 1-based line (JSONL) or row (CSV/Parquet/JSON array) number."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class ToolCall:
    """One function call an assistant message makes (OpenAI shape: id, type function, name, JSON arguments)."""

    name: str
    arguments: dict[str, Any] = field(hash=False)
    id: str | None = None

    def as_dict(self) -> dict:
        out: dict[str, Any] = {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return {"id": self.id, **out} if self.id is not None else out

    @property
    def text(self) -> str:
        """The call in one canonical written form (Hermes / Qwen2.5 syntax), for comparing and showing calls."""
        return "<tool_call>" + json.dumps({"name": self.name, "arguments": self.arguments}, ensure_ascii=False) \
            + "</tool_call>"


@dataclass(frozen=True)
class Message:
    role: Role
    content: str
    # Which assistant turns are trained is decided at render time; this flag lets a format opt a
    # turn out (e.g. few-shot examples embedded in a conversation).
    train: bool = True
    tool_calls: tuple[ToolCall, ...] = ()  # assistant messages: the calls it makes (content may then be "")
    tool_call_id: str | None = None  # tool messages: the call this is the result of
    name: str | None = None  # tool messages: the function that produced the result
    # The tool definitions (JSON-schema functions) a conversation offers. Parsers put them on the conversation's
    # first message, so that every prefix of a conversation (the context of each turn, an eval prompt, a few-shot
    # prompt) carries them to the chat template without a separate argument.
    tools: tuple[dict, ...] = field(default=(), hash=False)

    def as_dict(self) -> dict:
        """The message as chat templates read it. Keys a message does not use are left out: templates test
        `'tool_calls' in message` or `message.tool_calls is defined`."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [c.as_dict() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out

    @property
    def text(self) -> str:
        """Content and calls as one text (what duplicate checks compare and eval references hold)."""
        parts = [self.content] if self.content else []
        return "\n".join(parts + [c.text for c in self.tool_calls])


@dataclass(frozen=True)
class Conversation:
    """SFT example: a dialogue; assistant turns are the targets."""

    messages: tuple[Message, ...]
    source: Source | None = None

    @property
    def tools(self) -> tuple[dict, ...]:
        return conversation_tools(self.messages)


def conversation_tools(messages) -> tuple[dict, ...]:
    """The tool definitions the messages carry, in order, each function once (by name)."""
    seen: dict[str, dict] = {}
    for m in messages:
        for tool in m.tools:
            seen.setdefault(tool_name(tool), tool)
    return tuple(seen.values())


def tool_name(tool: dict) -> str:
    """A (parsed) tool definition's function name: {"type": "function", "function": {"name": ...}}."""
    return str(tool["function"]["name"])


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



@dataclass(frozen=True)
class Document:
    """Continued pre-training example: raw text, every token of which is trained."""

    text: str
    source: Source | None = None


Example = Union[Conversation, Preference, Unpaired, Document, Prompt]

ExampleKind = Literal["sft", "preference", "unpaired", "document", "prompt"]


def kind_of(example: Example) -> ExampleKind:
    if isinstance(example, Conversation):
        return "sft"
    if isinstance(example, Preference):
        return "preference"
    if isinstance(example, Prompt):
        return "prompt"
    if isinstance(example, Document):
        return "document"
    return "unpaired"


@dataclass
class Dataset:
    """A loaded, normalised dataset plus what loading it found."""

    examples: list[Example]
    format: str
    kind: ExampleKind
    files: list[str] = field(default_factory=list)
    rejected: list[tuple[Source | None, str]] = field(default_factory=list)  # (where, why) for --skip-invalid
