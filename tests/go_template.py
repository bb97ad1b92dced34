"""Ollama template test helpers: a Python emulation of the subset of Go's text/template that tunesmith's Ollama
templates use (range with $i, if/else if/else, := and =, eq/ne/and/not/len/slice, {{- -}} trimming), Ollama's
rule for the Modelfile's SYSTEM, and the Jinja reference templates and conversations both the emulated test
(test_export_ollama.py) and the Go one (test_export_clients.py, `make test-clients`) compare against."""

from __future__ import annotations

import re

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)
_TOKEN = re.compile(r'\(|\)|"(?:\\.|[^"\\])*"|:?=|[^\s()]+')


def _lex(template: str) -> list[tuple[str, str]]:
    parts, pos = [], 0
    for m in _ACTION.finditer(template):
        text = template[pos:m.start()]
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        parts.append(("text", text))
        parts.append(("action", m.group(2)))
        pos = m.end()
        if m.group(3):
            rest = template[pos:]
            pos += len(rest) - len(rest.lstrip(" \t\r\n"))
    parts.append(("text", template[pos:]))
    return parts


def _parse_until(parts, i):
    nodes = []
    while i < len(parts):
        kind, body = parts[i]
        word = body.split(" ", 1)[0] if kind == "action" else None
        if word in ("end", "else"):
            return nodes, i
        if word in ("if", "range"):
            node, i = _parse_block(parts, i)
            nodes.append(node)
            continue
        nodes.append((kind, body))
        i += 1
    return nodes, i


def _parse_block(parts, i):
    """parts[i] is `if X` / `range X` / (synthetic) `if X` from an `else if`; returns (node, index after end)."""
    body = parts[i][1]
    word = body.split(" ", 1)[0]
    then, j = _parse_until(parts, i + 1)
    other: list = []
    if parts[j][1].startswith("else if "):
        nested, k = _parse_block(parts[:j] + [("action", parts[j][1][5:])] + parts[j + 1:], j)
        return (word, body[len(word) + 1:], then, [nested]), k
    if parts[j][1] == "else":
        other, j = _parse_until(parts, j + 1)
    return (word, body[len(word) + 1:], then, other), j + 1


class _Scope:
    def __init__(self, root):
        self.frames = [{"$": root}]

    def get(self, name):
        for frame in reversed(self.frames):
            if name in frame:
                return frame[name]
        raise KeyError(name)

    def set(self, name, value):
        for frame in reversed(self.frames):
            if name in frame:
                frame[name] = value
                return
        raise KeyError(name)


def _truthy(value) -> bool:
    return bool(value)


_FUNCS = {
    "eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "not": lambda a: not _truthy(a),
    "len": len, "slice": lambda seq, start: seq[start:],
    "and": lambda *xs: next((x for x in xs if not _truthy(x)), xs[-1]),
    "or": lambda *xs: next((x for x in xs if _truthy(x)), xs[-1]),
}


def _value(token, dot, scope):
    if token.startswith('"'):
        return bytes(token[1:-1], "utf-8").decode("unicode_escape")
    if token.isdigit():
        return int(token)
    if token in ("true", "false"):
        return token == "true"
    if token.startswith("$"):
        head, *fields = token.split(".")
        value = scope.get(head or "$")
    elif token.startswith("."):
        value, fields = dot, token.split(".")[1:]
    else:
        raise ValueError(f"unknown token {token!r}")
    for f in fields:
        value = value[f]
    return value


def _eval(tokens, dot, scope):
    def command(ts):
        args, i = [], 0
        while i < len(ts):
            if ts[i] == "(":
                depth, j = 1, i + 1
                while depth:
                    depth += {"(": 1, ")": -1}.get(ts[j], 0)
                    j += 1
                args.append(("value", command(ts[i + 1:j - 1])))
                i = j
            else:
                args.append(("token", ts[i]))
                i += 1
        if args[0][0] == "token" and args[0][1] in _FUNCS:
            return _FUNCS[args[0][1]](*[a if k == "value" else _value(a, dot, scope) for k, a in args[1:]])
        assert len(args) == 1, ts
        kind, a = args[0]
        return a if kind == "value" else _value(a, dot, scope)

    return command(tokens)


def _run(nodes, dot, scope, out):
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "action":
            tokens = _TOKEN.findall(node[1])
            if len(tokens) > 2 and tokens[1] in (":=", "="):
                value = _eval(tokens[2:], dot, scope)
                scope.frames[-1].__setitem__(tokens[0], value) if tokens[1] == ":=" else scope.set(tokens[0], value)
            else:
                out.append(str(_eval(tokens, dot, scope)))
        elif node[0] == "if":
            scope.frames.append({})
            _run(node[2] if _truthy(_eval(_TOKEN.findall(node[1]), dot, scope)) else node[3], dot, scope, out)
            scope.frames.pop()
        else:  # range EXPR, or range $i, $_ := EXPR
            names, _, expr = node[1].rpartition(":=")
            index_var, elem_var = [n.strip() for n in names.split(",")] if names else ("", "")
            for index, element in enumerate(_eval(_TOKEN.findall(expr), dot, scope)):
                scope.frames.append({index_var: index, elem_var: element} if names else {})
                _run(node[2], element, scope, out)
                scope.frames.pop()


def render_go(template: str, messages: list[dict]) -> str:
    data = {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
    nodes, _ = _parse_until(_lex(template), 0)
    out: list[str] = []
    _run(nodes, data, _Scope(data), out)
    return "".join(out)


def ollama_messages(messages: list[dict], system: str | None) -> list[dict]:
    """The messages Ollama's chat handler gives the template: the Modelfile's SYSTEM goes first when the chat's
    first message is not a system message (server/routes.go, ChatHandler)."""
    if system and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system}, *messages]
    return list(messages)


# ---------------------------------------------------------------- HF references

LLAMA3_JINJA = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
MISTRAL_JINJA = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('roles must alternate') }}{% endif %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
GEMMA_JINJA = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content']"
    " | trim + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
PHI3_JINJA = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + "
    "'<|end|>\\n' }}{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n' + message['content'] + '<|end|>\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)

SYS = {"role": "system", "content": "Answer briefly.\nUse English."}
U1 = {"role": "user", "content": "What is 2+2? Say \"four\"."}
A1 = {"role": "assistant", "content": "four"}
U2 = {"role": "user", "content": "And {{ 3+3 }} in words, café?"}
A2 = {"role": "assistant", "content": "six, I"}  # a prefill the model continues
CONVERSATIONS = [[U1], [U1, A1, U2], [SYS, U1, A1, U2], [U1, A1, U2, A2], [SYS, U1, A1, U2, A2]]


def hf_render(tokenizer, messages, template=None, bos=None):
    prefill = messages[-1]["role"] == "assistant"
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, bos_token=bos or "",
                                         add_generation_prompt=not prefill, continue_final_message=prefill)
    return text.removeprefix(bos) if bos else text


def with_template(tokenizer, template):
    clone = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    clone.chat_template = template
    return clone
