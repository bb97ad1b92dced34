"""Ollama Modelfile: the Go TEMPLATE we write renders exactly what the HF Jinja chat template renders.

The Go templates are executed by `render_go`, a small emulation of the text/template subset they use
(range with $i, if/else if/else, := and =, eq/ne/and/not/len/slice, {{- -}} trimming)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tunesmith.errors import TunesmithError
from tunesmith.export.ollama import detect_family, go_template_for, ollama_model_name, write_modelfile

# ---------------------------------------------------------------- Go text/template emulation (subset)

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


def test_emulator_on_hand_checked_templates():
    assert render_go("a {{- 1 -}} \n b", []) == "a1b"
    t = '{{- range $i, $_ := .Messages }}{{ if eq $i 0 }}[{{ .Role }}]{{ else if eq .Role "x" }}X{{ else }}-{{ end }}{{ end }}'
    assert render_go(t, [{"role": "u", "content": ""}, {"role": "x", "content": ""}, {"role": "y", "content": ""}]) == "[u]X-"
    t = '{{- $s := "" }}{{ range $i, $_ := .Messages }}{{ $s = .Content }}{{ end }}<{{ $s }}>{{ len (slice $.Messages 1) }}'
    assert render_go(t, [{"role": "u", "content": "a"}, {"role": "u", "content": "b"}]) == "<b>1"


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


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


def _hf_render(tokenizer, messages, template=None, bos=None):
    prefill = messages[-1]["role"] == "assistant"
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, bos_token=bos or "",
                                         add_generation_prompt=not prefill, continue_final_message=prefill)
    return text.removeprefix(bos) if bos else text


def _with_template(tokenizer, template):
    clone = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    clone.chat_template = template
    return clone


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chatml_go_template_equals_hf_rendering(tokenizer, messages):
    family, template = go_template_for(tokenizer)
    assert family.name == "chatml" and "You are a helpful assistant." in template  # default system carried over
    assert render_go(template, messages) == _hf_render(tokenizer, messages)


def test_chatml_without_default_system(tokenizer):
    plain = tokenizer.chat_template.split("{% if loop.first")[0] + "{{ '<|im_start|>' + message['role']" + \
        tokenizer.chat_template.split("{{ '<|im_start|>' + message['role']", 1)[1]
    clone = _with_template(tokenizer, plain)
    _, template = go_template_for(clone)
    assert "system" not in template
    for messages in CONVERSATIONS:
        assert render_go(template, messages) == _hf_render(clone, messages)


@pytest.mark.parametrize("jinja,family,systemless", [(LLAMA3_JINJA, "llama3", False), (GEMMA_JINJA, "gemma", True),
                                                     (PHI3_JINJA, "phi3", False), (MISTRAL_JINJA, "mistral", True)])
def test_other_families_equal_hf_rendering(tokenizer, jinja, family, systemless):
    clone = _with_template(tokenizer, jinja)
    found, template = go_template_for(clone)
    assert found.name == family
    for messages in CONVERSATIONS:
        if systemless and messages[0]["role"] == "system":
            continue  # these formats have no system role in HF
        assert render_go(template, messages) == _hf_render(clone, messages, bos="<s>"), messages


def test_unknown_or_missing_template_is_an_error():
    with pytest.raises(TunesmithError, match="not one of the known families"):
        detect_family("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    with pytest.raises(TunesmithError, match="no chat template"):
        detect_family(None)


def test_write_modelfile(tokenizer, tmp_path):
    gguf_file = tmp_path / "export" / "tiny-f16.gguf"
    gguf_file.parent.mkdir()
    gguf_file.write_bytes(b"GGUF placeholder")
    result = write_modelfile(gguf_file, tmp_path / "ollama", tokenizer, name="tiny-chat")
    text = result.modelfile.read_text()
    assert text.splitlines()[1] == "FROM ./model.gguf"
    assert (tmp_path / "ollama" / "model.gguf").read_bytes() == b"GGUF placeholder"
    assert result.stops == ("<|im_end|>",)  # eos is the end-of-turn token here
    assert text.count("PARAMETER stop") == 1 and 'PARAMETER stop "<|im_end|>"' in text
    assert result.command == f"ollama create tiny-chat -f {tmp_path / 'ollama' / 'Modelfile'}"
    template = re.search(r'TEMPLATE """(.*)"""', text, re.S).group(1)
    assert render_go(template, [SYS, U1, A1, U2]) == _hf_render(tokenizer, [SYS, U1, A1, U2])
    with pytest.raises(TunesmithError, match="does not exist"):
        write_modelfile(tmp_path / "missing.gguf", tmp_path / "o2", tokenizer)
    assert isinstance(result.modelfile, Path)


def test_ollama_model_names():
    assert ollama_model_name("My Run 2024/v1") == "my-run-2024-v1"
    assert ollama_model_name("banking77:Q8") == "banking77:q8"
    assert ollama_model_name("???") == "tunesmith-model"
