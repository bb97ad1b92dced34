"""Detect a dataset's format from all of its rows, and parse one row of each format into a canonical example.

A parser raises RowError naming the offending field (e.g. `messages[2].role`), what is wrong and how to fix
it; `tunesmith.data.load` turns those into file:line problems and decides whether to raise or reject.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from ..errors import Problem
from .tools import check_calls, parse_tool_calls, parse_tools
from .types import Conversation, Document, Example, ExampleKind, Message, Preference, Prompt, Source, Unpaired

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "preference", "preference_implicit",
           "hh_rlhf", "kto", "text", "prompt")
KIND_OF_FORMAT: dict[str, ExampleKind] = {
    "messages": "sft", "sharegpt": "sft", "alpaca": "sft", "prompt_completion": "sft",
    "preference": "preference", "preference_implicit": "preference", "hh_rlhf": "preference", "kto": "unpaired",
    "text": "document", "prompt": "prompt",
}
FORMAT_KEYS = ("messages | conversations (sharegpt) | instruction+output (alpaca) | prompt+completion | "
               "prompt+chosen+rejected | chosen+rejected (implicit or hh-rlhf text) | prompt+completion+label (kto) | "
               "text (documents; or .txt/.md files) | prompt alone (online training)")
PROMPT_KEYS = ("prompt", "messages")  # the columns a prompt row's prompt comes from; the others are its fields
SHOWN_SOURCES = 5


# --- row parsers: one per format; each raises RowError naming the offending field ---------------------------

class RowError(Exception):
    def __init__(self, field: str, what: str, hint: str | None = None, code: str = "invalid"):
        super().__init__(f"{field}: {what}")
        self.field, self.what, self.hint, self.code = field, what, hint, code


ROLES = ("system", "user", "assistant", "tool")
ROLE_ALIASES = {"developer": "system"}
ROLE_HINTS = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant", "ai": "assistant",
              "function": "tool", "ipython": "tool"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "model": "assistant", "system": "system", "tool": "tool",
                  "observation": "tool", "function_response": "tool", "function_call": "assistant"}
REPLY_ROLES = ("assistant",)
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def detect_row(row: dict) -> str | None:
    """The format a single row looks like, from its keys (None when it matches none)."""
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "chosen" in row and "rejected" in row:
        if "prompt" in row:
            return "preference"
        return "hh_rlhf" if isinstance(row["chosen"], str) else "preference_implicit"
    if "prompt" in row and "completion" in row:
        return "kto" if "label" in row else "prompt_completion"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row:
        return "prompt"
    if "text" in row:
        return "text"
    return None


def _type_name(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _require(row: dict, key: str) -> Any:
    if key not in row or row[key] is None:
        raise RowError(key, "missing", f"every row of this format needs '{key}'", "missing")
    return row[key]


def _text(value: Any, field: str) -> str:
    """Message content: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(value, list):
        parts = []
        for i, part in enumerate(value):
            is_text = isinstance(part, dict) and part.get("type", "text") == "text"
            if not (is_text and isinstance(part.get("text"), str)):
                raise RowError(f"{field}[{i}]", "only text content parts are supported",
                               'use a string or {"type": "text", "text": "..."}', "type")
            parts.append(part["text"])
        value = "".join(parts)
    if not isinstance(value, str):
        raise RowError(field, f"expected a string, got {_type_name(value)}", code="type")
    if not value.strip():
        raise RowError(field, "is empty or whitespace only", "fill it in or remove the row", "empty")
    return value


def _role(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise RowError(field, f"expected a role string, got {_type_name(value)}", code="type")
    role = ROLE_ALIASES.get(value, value)
    if role not in ROLES:
        hint = f"did you mean '{ROLE_HINTS[value.lower()]}'?" if value.lower() in ROLE_HINTS else None
        raise RowError(field, f"unknown role '{value}'", hint or f"roles are {', '.join(ROLES)}", "role")
    return role


def _weight(item: dict, field: str) -> bool:
    weight = item.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight not in (0, 1):
        raise RowError(f"{field}.weight", f"must be 0 or 1, got {weight!r}",
                       "weight: 0 excludes an assistant turn from the loss", "type")
    return weight == 1


def _message(item: Any, field: str, role_key: str = "role", content_key: str = "content",
             role_map: dict[str, str] | None = None) -> Message:
    if not isinstance(item, dict):
        raise RowError(field, f"expected a message object, got {_type_name(item)}",
                       f'use {{"{role_key}": ..., "{content_key}": ...}}', "type")
    if role_key not in item:
        raise RowError(f"{field}.{role_key}", "missing", code="missing")
    if role_map is None:
        role = _role(item[role_key], f"{field}.{role_key}")
    else:
        raw = item[role_key]
        if not isinstance(raw, str) or raw.lower() not in role_map:
            raise RowError(f"{field}.{role_key}", f"unknown speaker {raw!r}",
                           f"use one of {', '.join(role_map)}", "role")
        role = role_map[raw.lower()]
    calls = parse_tool_calls(item["tool_calls"], f"{field}.tool_calls") if item.get("tool_calls") else ()
    if calls and role != "assistant":
        raise RowError(f"{field}.tool_calls", f"only assistant messages make tool calls, this one is '{role}'",
                       code="tool_call")
    if role == "tool":
        return _tool_result(item, field, content_key)
    if calls and not item.get(content_key):
        content = ""  # a message that only calls tools
    elif item.get(content_key) is None:
        raise RowError(f"{field}.{content_key}", "missing", code="missing")
    else:
        content = _text(item[content_key], f"{field}.{content_key}")
    return Message(role, content, _weight(item, field), tool_calls=calls)  # type: ignore[arg-type]


def _tool_result(item: dict, field: str, content_key: str) -> Message:
    """A tool message: its content (JSON values are kept as their JSON text), and the call it answers."""
    content = item.get(content_key)
    if content is None:
        raise RowError(f"{field}.{content_key}", "missing", "a tool message holds the result of a call", "missing")
    if not isinstance(content, str) and not (isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type", "text") == "text" for p in content)):
        content = json.dumps(content, ensure_ascii=False)
    elif not isinstance(content, str):
        content = _text(content, f"{field}.{content_key}")
    ids = {k: item.get(k) for k in ("tool_call_id", "name")}
    for key, value in ids.items():
        if value is not None and not isinstance(value, str):
            raise RowError(f"{field}.{key}", f"must be a string, got {_type_name(value)}", code="type")
    return Message("tool", content, tool_call_id=ids["tool_call_id"], name=ids["name"])


def _messages(value: Any, field: str, **keys: Any) -> tuple[Message, ...]:
    if not isinstance(value, list):
        raise RowError(field, f"expected a list of messages, got {_type_name(value)}", code="type")
    if not value:
        raise RowError(field, "is empty", code="empty")
    return tuple(_message(item, f"{field}[{i}]", **keys) for i, item in enumerate(value))


def _turns(value: Any, field: str, role: str) -> tuple[Message, ...]:
    """A plain string (one message with `role`) or a list of messages."""
    if isinstance(value, str):
        return (Message(role, _text(value, field)),)  # type: ignore[arg-type]
    if value is None:
        raise RowError(field, "missing", code="missing")
    return _messages(value, field)


def _check_dialogue(messages: tuple[Message, ...], field: str) -> None:
    if not any(m.role == "assistant" for m in messages):
        raise RowError(field, "has no assistant turn", "SFT learns from assistant replies; add one", "no_assistant")
    last = messages[-1]
    if last.role != "assistant":
        raise RowError(f"{field}[{len(messages) - 1}].role", f"last turn is '{last.role}', not assistant",
                       "end every conversation with the assistant reply to learn", "last_not_assistant")
    if not any(m.role == "assistant" and m.train for m in messages):
        raise RowError(field, "every assistant turn has weight 0; nothing to learn", code="no_assistant")


def _check_reply(messages: tuple[Message, ...], field: str, offset: int = 0) -> None:
    for i, m in enumerate(messages, start=offset):
        if m.role not in REPLY_ROLES:
            raise RowError(f"{field}[{i}].role", f"a reply may only hold assistant turns, found '{m.role}'",
                           "put the conversation so far into the prompt", "role")


def _strip_prefix(prompt: tuple[Message, ...], reply: tuple[Message, ...]) -> tuple[Message, ...]:
    """Some datasets repeat the prompt at the start of each reply; keep only the part after it."""
    n = len(prompt)
    if len(reply) > n and [_key(m) for m in reply[:n]] == [_key(m) for m in prompt]:
        return reply[n:]
    return reply


def _key(message: Message) -> tuple[str, str]:
    return message.role, message.text


def _untrained(messages: tuple[Message, ...]) -> tuple[Message, ...]:
    return tuple(replace(m, train=False) if m.role == "assistant" else m for m in messages)


def _with_tools(row: dict, prompt: tuple[Message, ...], field: str,
                replies: Iterable[tuple[str, tuple[Message, ...], int]] = ()) -> tuple[Message, ...]:
    """Check every call and tool result against the row's tool definitions and put those on the first message.
    `replies` are (field, messages, index of the first) that continue `prompt`, each checked after it."""
    tools = parse_tools(row.get("tools"))
    names = [f"{field}[{i}]" for i in range(len(prompt))]
    sequences = [(prompt + reply, names + [f"{name}[{first + i}]" for i in range(len(reply))])
                 for name, reply, first in replies] or [(prompt, names)]
    for messages, where in sequences:
        check_calls(messages, tools, where)
    if not tools:
        return prompt
    return (replace(prompt[0], tools=tools),) + prompt[1:]


def parse_messages(row: dict, src: Source) -> Conversation:
    messages = _messages(_require(row, "messages"), "messages")
    _check_dialogue(messages, "messages")
    return Conversation(_with_tools(row, messages, "messages"), src)


def parse_sharegpt(row: dict, src: Source) -> Conversation:
    turns = _require(row, "conversations")
    if isinstance(turns, list) and turns and isinstance(turns[0], dict) and "from" not in turns[0] \
            and "role" in turns[0]:
        messages = _messages(turns, "conversations")
    else:
        messages = _messages(turns, "conversations", role_key="from", content_key="value",
                             role_map=SHAREGPT_ROLES)
    system = row.get("system")
    if isinstance(system, str) and system.strip() and messages[0].role != "system":
        messages = (Message("system", system),) + messages
    _check_dialogue(messages, "conversations")
    return Conversation(_with_tools(row, messages, "conversations"), src)


def parse_alpaca(row: dict, src: Source) -> Conversation:
    instruction = _text(_require(row, "instruction"), "instruction")
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise RowError("input", f"expected a string, got {_type_name(extra)}", code="type")
    user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    messages = [Message("user", user), Message("assistant", _text(_require(row, "output"), "output"))]
    system = row.get("system")
    if system is not None:
        messages.insert(0, Message("system", _text(system, "system")))
    return Conversation(tuple(messages), src)


def parse_prompt_completion(row: dict, src: Source) -> Conversation:
    prompt = _turns(_require(row, "prompt"), "prompt", "user")
    completion = _strip_prefix(prompt, _turns(_require(row, "completion"), "completion", "assistant"))
    _check_reply(completion, "completion")
    prompt = _with_tools(row, prompt, "prompt", [("completion", completion, 0)])
    return Conversation(_untrained(prompt) + completion, src)


def _pair(prompt: tuple[Message, ...], chosen: tuple[Message, ...], rejected: tuple[Message, ...],
          src: Source, offset: int = 0, row: dict | None = None, prompt_field: str = "prompt") -> Preference:
    _check_reply(chosen, "chosen", offset)
    _check_reply(rejected, "rejected", offset)
    if [_key(m) for m in chosen] == [_key(m) for m in rejected]:
        raise RowError("chosen", "identical to rejected", "a pair must differ; remove the row", "identical")
    prompt = _with_tools(row or {}, prompt, prompt_field, [("chosen", chosen, offset), ("rejected", rejected, offset)])
    return Preference(prompt, chosen, rejected, src)


def parse_preference(row: dict, src: Source) -> Preference:
    prompt = _turns(_require(row, "prompt"), "prompt", "user")
    chosen = _strip_prefix(prompt, _turns(_require(row, "chosen"), "chosen", "assistant"))
    rejected = _strip_prefix(prompt, _turns(_require(row, "rejected"), "rejected", "assistant"))
    return _pair(prompt, chosen, rejected, src, row=row)


def _split_shared_prefix(chosen: tuple[Message, ...], rejected: tuple[Message, ...]) -> Preference:
    if [_key(m) for m in chosen] == [_key(m) for m in rejected]:
        raise RowError("chosen", "identical to rejected", "a pair must differ; remove the row", "identical")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and _key(chosen[shared]) == _key(rejected[shared]):
        shared += 1
    if shared == 0:
        raise RowError("chosen", "chosen and rejected share no leading messages (no common prompt)",
                       "implicit pairs are two full dialogues with the same prompt; otherwise add a prompt field",
                       "no_prefix")
    for name, side in (("chosen", chosen), ("rejected", rejected)):
        if len(side) == shared:
            raise RowError(name, "ends where the shared prompt ends; it has no reply of its own", code="no_prefix")
    return Preference(chosen[:shared], chosen[shared:], rejected[shared:])


def parse_preference_implicit(row: dict, src: Source) -> Preference:
    pair = _split_shared_prefix(_messages(_require(row, "chosen"), "chosen"),
                                _messages(_require(row, "rejected"), "rejected"))
    return _pair(pair.prompt, pair.chosen, pair.rejected, src, len(pair.prompt), row, "chosen")


def hh_messages(text: Any, field: str) -> tuple[Message, ...]:
    """Split Anthropic hh-rlhf text ("\\n\\nHuman: ...\\n\\nAssistant: ...") into user/assistant turns."""
    if not isinstance(text, str):
        raise RowError(field, f"expected hh-rlhf text, got {_type_name(text)}", code="type")
    parts = _HH_TURN.split("\n\n" + text.lstrip() if text.lstrip().startswith(("Human:", "Assistant:")) else text)
    if len(parts) < 3:
        raise RowError(field, "no '\\n\\nHuman:' / '\\n\\nAssistant:' turns found",
                       "hh-rlhf text alternates '\\n\\nHuman: ...' and '\\n\\nAssistant: ...'; "
                       "for a plain reply add a prompt field", "hh_text")
    if parts[0].strip():
        raise RowError(field, "text before the first 'Human:' turn", code="hh_text")
    messages = []
    for i in range(1, len(parts), 2):
        role = "user" if parts[i] == "Human" else "assistant"
        content = parts[i + 1].strip()
        if not content:
            raise RowError(f"{field}[{i // 2}]", f"{parts[i]} turn is empty or whitespace only",
                           "fill it in or remove the row (hh-rlhf turns are counted from 0)", "empty")
        messages.append(Message(role, content))  # type: ignore[arg-type]
    return tuple(messages)


def parse_hh_rlhf(row: dict, src: Source) -> Preference:
    pair = _split_shared_prefix(hh_messages(_require(row, "chosen"), "chosen"),
                                hh_messages(_require(row, "rejected"), "rejected"))
    return _pair(pair.prompt, pair.chosen, pair.rejected, src, len(pair.prompt))


def parse_kto(row: dict, src: Source) -> Unpaired:
    prompt = _turns(_require(row, "prompt"), "prompt", "user")
    completion = _strip_prefix(prompt, _turns(_require(row, "completion"), "completion", "assistant"))
    _check_reply(completion, "completion")
    label = _require(row, "label")
    if not isinstance(label, bool):
        hint = "write the JSON booleans true / false (no quotes, not 1 / 0)"
        if src.file.lower().endswith((".csv", ".csv.gz")):
            hint = "CSV cells are text, so labels cannot be booleans; store KTO data as JSONL or Parquet"
        raise RowError("label", f"must be a boolean, got {_type_name(label)} {label!r}", hint, "label")
    prompt = _with_tools(row, prompt, "prompt", [("completion", completion, 0)])
    return Unpaired(prompt, completion, label, src)


def _reference_column(row: dict) -> str | None:
    value = row.get("reference")
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)  # a JSON object or list is compared as its JSON text


def _asks(messages: tuple[Message, ...], field: str) -> tuple[Message, ...]:
    """A prompt must end with the turn the model answers: a user (or tool) message."""
    last = messages[-1]
    if last.role not in ("user", "tool"):
        raise RowError(f"{field}[{len(messages) - 1}].role", f"the prompt's last turn is '{last.role}', not the user's",
                       "a prompt ends with the user message the model answers", "last_not_user")
    return messages


def parse_prompt(row: dict, src: Source) -> Prompt:
    """A prompt alone (`prompt`: text or messages; or `messages` ending in a user turn) with an optional
    `reference` answer; the row's other columns are kept as fields for reward functions."""
    fields = {k: v for k, v in row.items() if k not in PROMPT_KEYS}
    if "prompt" in row:
        return Prompt(_asks(_turns(_require(row, "prompt"), "prompt", "user"), "prompt"), _reference_column(row),
                      fields, src)
    messages = _messages(_require(row, "messages"), "messages")
    start = _last_target_start(messages)
    if start == 0:
        raise RowError("messages", "has no prompt: it starts with the assistant",
                       "online training needs the user turn(s) the model answers", "no_prompt")
    answer = messages[start:]
    reference = "\n".join(m.content for m in answer) if answer else _reference_column(row)
    return Prompt(_asks(messages[:start], "messages"), reference, fields, src)


def parse_text(row: dict, src: Source) -> Document:
    """A raw document (continued pre-training). The text is kept exactly as written."""
    text = _require(row, "text")
    if not isinstance(text, str):
        raise RowError("text", f"expected a string, got {_type_name(text)}", code="type")
    if not text.strip():
        raise RowError("text", "is empty or whitespace only", "fill it in or remove the document", "empty")
    return Document(text, src)


PARSERS: dict[str, Callable[[dict, Source], Example]] = {
    "messages": parse_messages, "sharegpt": parse_sharegpt, "alpaca": parse_alpaca,
    "prompt_completion": parse_prompt_completion, "preference": parse_preference,
    "preference_implicit": parse_preference_implicit, "hh_rlhf": parse_hh_rlhf, "kto": parse_kto,
    "prompt": parse_prompt,
    "text": parse_text,
}


def parse_as_prompt(row: dict, src: Source, fmt: str) -> Prompt:
    """Any row that has a prompt, as the prompt an online method answers: the `prompt` format itself,
    `messages` ending in a user turn or in the answer, and every other format's prompt with its answer (the
    completion, the final assistant turn, the chosen reply, a desirable KTO completion) as the reference."""
    if fmt in ("prompt", "messages"):
        return parse_prompt(row, src)
    example = PARSERS[fmt](row, src)
    prompt = prompt_messages(example)
    if not prompt:
        raise RowError(fmt, "has no prompt", "online training needs the user turn(s) the model answers",
                       "no_prompt")
    answer = target_messages(example)
    keep = not isinstance(example, Unpaired) or example.label
    reference = "\n".join(m.content for m in answer) if answer and keep else None
    fields = {k: v for k, v in row.items() if k not in PROMPT_KEYS}
    return Prompt(_asks(prompt, "prompt"), reference, fields, src)


# --- the whole dataset -----------------------------------------------------------------------------------

def detect_format(rows: list[tuple[dict, Source]]) -> tuple[str, Problem | None, list[str | None]]:
    """Look at every row: the most common format ("unknown" if none is recognised), a Problem listing which
    rows look like which format when they disagree, and each row's own format."""
    row_formats = [detect_row(row) for row, _ in rows]
    counts = Counter(f for f in row_formats if f is not None)
    if not counts:
        return "unknown", None, row_formats
    chosen = max(counts, key=lambda f: (counts[f], -FORMATS.index(f)))
    if len(counts) == 1:
        return chosen, None, row_formats
    by_format: dict[str, list[Source]] = {}
    for fmt, (_, src) in zip(row_formats, rows, strict=True):
        if fmt is not None:
            by_format.setdefault(fmt, []).append(src)
    listing = "; ".join(f"{fmt}: {len(srcs)} rows ({_sources(srcs)})"
                        for fmt, srcs in sorted(by_format.items(), key=lambda kv: -len(kv[1])))
    where = str(rows[0][1].file) if rows else "data"
    mixed = Problem(where, f"rows look like different formats: {listing}",
                    f"keep one format per dataset or set data.format; with skip_invalid the most common "
                    f"format ({chosen}) is kept and the other rows are rejected")
    return chosen, mixed, row_formats


def _sources(srcs: list[Source]) -> str:
    shown = ", ".join(str(s) for s in srcs[:SHOWN_SOURCES])
    return shown + (f", ... {len(srcs) - SHOWN_SOURCES} more" if len(srcs) > SHOWN_SOURCES else "")


def prompt_messages(example: Example) -> tuple[Message, ...]:
    """The context an example's target answers: for a conversation, everything before its final run of
    assistant turns."""
    if isinstance(example, Conversation):
        return example.messages[: _last_target_start(example.messages)]
    if isinstance(example, Document):
        return ()
    return example.prompt


def target_messages(example: Example) -> tuple[Message, ...]:
    """What the example teaches: the final assistant turn(s), the chosen reply, or the KTO completion."""
    if isinstance(example, Conversation):
        return example.messages[_last_target_start(example.messages):]
    if isinstance(example, Preference):
        return example.chosen
    if isinstance(example, Prompt):
        return (Message("assistant", example.reference),) if example.reference else ()
    if isinstance(example, Document):
        return ()
    return example.completion


def _last_target_start(messages: tuple[Message, ...]) -> int:
    start = len(messages)
    while start > 0 and messages[start - 1].role == "assistant":
        start -= 1
    return start


def messages_text(messages: Iterable[Message]) -> str:
    return "\n".join(f"{m.role}: {m.text}" for m in messages)


def common_system_prompt(examples: Iterable[Example], default: str | None = None) -> str | None:
    """The system message every example starts with, if they all share one; None otherwise (or when there
    are no examples, or documents). `default` is what training adds to an example without one
    (data.system_prompt). Serving defaults to it: the model only learned the task under that message."""
    found: set[str] = set()
    for example in examples:
        if isinstance(example, Document):
            return None
        messages = example.messages if isinstance(example, Conversation) else example.prompt
        first = messages[0] if messages else None
        system = first.content if first is not None and first.role == "system" else default
        if system is None:
            return None
        found.add(system)
        if len(found) > 1:
            return None
    return found.pop() if found else None
