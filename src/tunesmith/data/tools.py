"""Tool calling: tool definitions, the calls assistant messages make, and the checks between them.

A row offers `tools` (OpenAI shape: `{"type": "function", "function": {"name", "description", "parameters"}}`,
where `parameters` is a JSON Schema). Assistant messages make `tool_calls` (`{"id", "type": "function",
"function": {"name", "arguments"}}`, arguments a JSON object or its JSON text) and `tool` messages carry the
results (`tool_call_id`). Every problem is a RowError naming the field, so that `data check` and training
refuse the same rows. `parse_calls` reads calls back out of generated text, for the `tool_call` metric.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from .types import Message, ToolCall

TOOL_CODES = {
    "tool_definition": "invalid tool definitions", "tool_call": "malformed tool calls",
    "tool_unknown": "calls of functions the row's tools do not define",
    "tool_arguments": "call arguments that are not a JSON object",
    "tool_schema": "call arguments that do not validate against the tool's parameters",
    "tool_result": "tool results without a matching call",
}


def _error(field: str, what: str, hint: str | None, code: str) -> Exception:
    from .formats import RowError  # formats imports this module

    return RowError(field, what, hint, code)


# --- tool definitions ---------------------------------------------------------------------------------------

def parse_tools(value: Any, field: str = "tools") -> tuple[dict, ...]:
    """A row's tool definitions, each normalised to {"type": "function", "function": {...}}. Accepts the list,
    or its JSON text (as some datasets store it), and bare function objects ({"name", "parameters"})."""
    if value is None:
        return ()
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise _error(field, f"is text but not JSON ({e.msg} at column {e.colno})",
                         "give a list of tool definitions, or its JSON text", "tool_definition") from None
    if not isinstance(value, list):
        raise _error(field, "expected a list of tool definitions", 'e.g. [{"type": "function", "function": '
                     '{"name": "get_weather", "parameters": {...}}}]', "tool_definition")
    tools: list[dict] = []
    for i, tool in enumerate(value):
        tools.append(_tool(tool, f"{field}[{i}]"))
    names = [t["function"]["name"] for t in tools]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise _error(field, f"defines {', '.join(map(repr, repeated))} more than once", "give each function "
                     "one definition", "tool_definition")
    return tuple(tools)


def _tool(tool: Any, field: str) -> dict:
    if not isinstance(tool, dict):
        raise _error(field, "expected a tool definition object", None, "tool_definition")
    if "function" in tool:
        if tool.get("type", "function") != "function":
            raise _error(f"{field}.type", f"unsupported tool type {tool.get('type')!r}", 'use "function"',
                         "tool_definition")
        function, where = tool["function"], f"{field}.function"
    else:
        function, where = tool, field
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"].strip():
        raise _error(f"{where}.name", "missing or not a string", "every tool needs a function name",
                     "tool_definition")
    parameters = function.get("parameters")
    if parameters is not None:
        _check_schema(parameters, f"{where}.parameters")
    return {"type": "function", "function": dict(function)}


def _check_schema(schema: Any, field: str) -> None:
    import jsonschema

    if not isinstance(schema, dict):
        raise _error(field, "must be a JSON Schema object", '{"type": "object", "properties": {...}}',
                     "tool_definition")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.exceptions.SchemaError as e:
        where = "/".join(str(p) for p in e.path) or "(root)"
        raise _error(field, f"is not a valid JSON Schema at {where}: {e.message}", None, "tool_definition") from None


# --- calls in messages ----------------------------------------------------------------------------------------

def parse_tool_calls(value: Any, field: str) -> tuple[ToolCall, ...]:
    if not isinstance(value, list):
        raise _error(field, "expected a list of calls", '[{"id": "call_1", "type": "function", "function": '
                     '{"name": ..., "arguments": "{...}"}}]', "tool_call")
    return tuple(_call(call, f"{field}[{i}]") for i, call in enumerate(value))


def _call(call: Any, field: str) -> ToolCall:
    if not isinstance(call, dict):
        raise _error(field, "expected a call object", None, "tool_call")
    if call.get("type", "function") != "function":
        raise _error(f"{field}.type", f"unsupported call type {call.get('type')!r}", 'use "function"', "tool_call")
    function, where = (call["function"], f"{field}.function") if "function" in call else (call, field)
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise _error(f"{where}.name", "missing or not a string", None, "tool_call")
    call_id = call.get("id")
    if call_id is not None and not isinstance(call_id, str):
        raise _error(f"{field}.id", "must be a string", None, "tool_call")
    return ToolCall(function["name"], _arguments(function.get("arguments", {}), f"{where}.arguments"), call_id)


def _arguments(value: Any, field: str) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as e:
            raise _error(field, f"not valid JSON ({e.msg} at column {e.colno})",
                         "arguments are a JSON object or its JSON text, e.g. \"{\\\"city\\\": \\\"Paris\\\"}\"",
                         "tool_arguments") from None
    if not isinstance(value, dict):
        raise _error(field, f"must be a JSON object, got {type(value).__name__}", None, "tool_arguments")
    return value


# --- a whole conversation ---------------------------------------------------------------------------------------

def check_calls(messages: Sequence[Message], tools: Sequence[dict], names: Sequence[str]) -> None:
    """Every call names a defined function with arguments that validate against its parameters, and every
    tool result answers a call made before it (by `tool_call_id`, or else the oldest unanswered call).
    `names[i]` is the field of message i in errors. Conversations without structured calls or tools (tool
    results written as plain turns, as older datasets do) are not checked."""
    import jsonschema

    if not tools and not any(m.tool_calls for m in messages):
        return
    defined = {t["function"]["name"]: t["function"] for t in tools}
    pending: list[ToolCall] = []
    for m, name in zip(messages, names, strict=True):
        for j, call in enumerate(m.tool_calls):
            where = f"{name}.tool_calls[{j}]"
            if call.name not in defined:
                known = ", ".join(defined) or "none (the row has no tools list)"
                raise _error(f"{where}.function.name", f"calls '{call.name}', which the row's tools do not define",
                             f"defined functions: {known}", "tool_unknown")
            schema = defined[call.name].get("parameters")
            if schema is not None:
                validator = jsonschema.validators.validator_for(schema)(schema)
                error = jsonschema.exceptions.best_match(validator.iter_errors(call.arguments))
                if error is not None:
                    path = "/".join(str(p) for p in error.absolute_path) or "(arguments)"
                    raise _error(f"{where}.function.arguments", f"do not match the parameters of '{call.name}' at "
                                 f"{path}: {error.message}", "fix the arguments or the tool's schema", "tool_schema")
            pending.append(call)
        if m.role == "tool":
            _answer(pending, m, name)


def _answer(pending: list[ToolCall], result: Message, field: str) -> None:
    if result.tool_call_id is not None:
        match = next((c for c in pending if c.id == result.tool_call_id), None)
        if match is None:
            raise _error(f"{field}.tool_call_id", f"'{result.tool_call_id}' answers no earlier unanswered call",
                         "each tool result follows the assistant message whose call it answers", "tool_result")
    elif pending:
        match = pending[0]
    else:
        raise _error(field, "a tool result without a call before it",
                     "put the assistant message with the tool_calls before its results", "tool_result")
    if result.name is not None and result.name != match.name:
        raise _error(f"{field}.name", f"'{result.name}' but the call it answers is '{match.name}'", None,
                     "tool_result")
    pending.remove(match)


# --- calls in generated text -------------------------------------------------------------------------------------

_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_PREFIXES = ("[TOOL_CALLS]", "<|python_tag|>")


def parse_calls(text: str) -> list[tuple[str, Any]] | None:
    """The (name, arguments) calls written in `text`, in the syntax of the common chat templates:
    `<tool_call>{...}</tool_call>` blocks (Hermes, Qwen2.5), or the whole text as one JSON call object or a
    JSON list of them, optionally after `[TOOL_CALLS]` (Mistral) or `<|python_tag|>` (Llama-3.1), with the
    arguments under "arguments" or "parameters" (Llama-3.1). [] when the text holds no call; None when it
    looks like a call but does not parse."""
    tagged = _TAGGED.findall(text)
    if tagged:
        calls = [_json_call(block) for block in tagged]
        return None if any(c is None for c in calls) else calls  # type: ignore[return-value]
    body = text.strip()
    for prefix in _PREFIXES:
        if body.startswith(prefix):
            body = body[len(prefix):].strip()
    if not body.startswith(("{", "[")):
        return None if "<tool_call>" in text else []
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = [_call_object(item) for item in items]
    if not calls or any(c is None for c in calls):
        return None if isinstance(value, list) or _looks_like_call(value) else []
    return calls  # type: ignore[return-value]


def _json_call(block: str) -> tuple[str, Any] | None:
    try:
        return _call_object(json.loads(block))
    except json.JSONDecodeError:
        return None


def _looks_like_call(value: Any) -> bool:
    return isinstance(value, dict) and "name" in value


def _call_object(value: Any) -> tuple[str, Any] | None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    return value["name"], arguments
