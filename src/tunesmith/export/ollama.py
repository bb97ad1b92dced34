"""An Ollama Modelfile for an exported GGUF: the chat template in Ollama's Go-template syntax, and stops.

Ollama does not run the model's Jinja chat template; it needs the same format written as a Go
template over `.Messages`. We recognise the template family from its markers and write the matching
Go template. Each one renders, for a conversation ending in a user turn, exactly what the HF template
renders with `add_generation_prompt=True` (minus a leading BOS, which llama.cpp adds itself), and for
one ending in an assistant turn what it renders with `continue_final_message=True` (prefill).
An unrecognised template is an error (we never guess a chat format); the hint says how to write one.

Known limits, by family: Llama 3 `| trim`s message content and Gemma too (Go templates cannot; content
with outer whitespace differs); Llama 3.1+ templates that stamp a date into the system turn are not
reproduced; Gemma has no system role (a system message is written as a user turn); Mistral's
[INST] format is the v0.1/v0.2 one (system text goes first in the first user turn).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.errors import TunesmithError

logger = logging.getLogger(__name__)

# Shared Go-template preamble: iterate messages, know which is last.
_LOOP = '{{- range $i, $_ := .Messages }}{{- $last := eq (len (slice $.Messages $i)) 1 }}'
_PREFILL = 'and $last (eq .Role "assistant")'
_PROMPT = 'and $last (ne .Role "assistant")'

CHATML = (
    _LOOP
    + '{{- if and (eq $i 0) (ne .Role "system") }}@DEFAULT_SYSTEM@{{ end }}'
    + '<|im_start|>{{ .Role }}\n{{ .Content }}{{ if not (' + _PREFILL + ') }}<|im_end|>\n{{ end }}'
    + '{{- if ' + _PROMPT + ' }}<|im_start|>assistant\n{{ end }}{{- end }}'
)
LLAMA3 = (
    _LOOP
    + '<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}'
    + '{{ if not (' + _PREFILL + ') }}<|eot_id|>{{ end }}'
    + '{{- if ' + _PROMPT + ' }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ end }}{{- end }}'
)
MISTRAL = (
    '{{- $system := "" }}{{- range .Messages }}{{- if eq .Role "system" }}{{- $system = .Content }}{{- end }}'
    '{{- end }}{{- $first := true }}'
    + _LOOP
    + '{{- if eq .Role "user" }}[INST] {{ if and $first $system }}{{ $system }}\n\n{{ end }}{{ .Content }} [/INST]'
    '{{- $first = false }}'
    + '{{- else if eq .Role "assistant" }}{{ .Content }}{{ if not $last }}@EOS@{{ end }}{{- end }}{{- end }}'
)
GEMMA = (
    _LOOP
    + '<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}user{{ end }}\n{{ .Content }}'
    + '{{ if not (' + _PREFILL + ') }}<end_of_turn>\n{{ end }}'
    + '{{- if ' + _PROMPT + ' }}<start_of_turn>model\n{{ end }}{{- end }}'
)
PHI3 = (
    _LOOP
    + '<|{{ .Role }}|>\n{{ .Content }}{{ if not (' + _PREFILL + ') }}<|end|>\n{{ end }}'
    + '{{- if ' + _PROMPT + ' }}<|assistant|>\n{{ end }}{{- end }}'
)


@dataclass(frozen=True)
class ChatFamily:
    name: str
    markers: tuple[str, ...]  # all must appear in the Jinja template
    go_template: str
    end_of_turn: str


# Order matters: the first family whose markers all appear wins.
FAMILIES = (
    ChatFamily("llama3", ("<|start_header_id|>", "<|eot_id|>"), LLAMA3, "<|eot_id|>"),
    ChatFamily("chatml", ("<|im_start|>", "<|im_end|>"), CHATML, "<|im_end|>"),
    ChatFamily("gemma", ("<start_of_turn>", "<end_of_turn>"), GEMMA, "<end_of_turn>"),
    ChatFamily("phi3", ("<|user|>", "<|assistant|>", "<|end|>"), PHI3, "<|end|>"),
    ChatFamily("mistral", ("[INST]", "[/INST]"), MISTRAL, "@EOS@"),
)


@dataclass(frozen=True)
class OllamaModelfile:
    modelfile: Path
    family: str
    stops: tuple[str, ...]
    command: str  # `ollama create NAME -f PATH`


def detect_family(chat_template: str | None) -> ChatFamily:
    if not chat_template:
        raise TunesmithError("the tokenizer has no chat template, so there is no chat format to give Ollama",
                             hint="set tokenizer.chat_template before export, or write the Modelfile TEMPLATE by hand")
    for family in FAMILIES:
        if all(marker in chat_template for marker in family.markers):
            return family
    raise TunesmithError(
        "the chat template is not one of the known families (ChatML/SmolLM/Qwen, Llama 3, Mistral [INST], "
        "Gemma, Phi-3), so no equivalent Ollama TEMPLATE can be written automatically",
        hint="write the Modelfile's TEMPLATE by hand (https://github.com/ollama/ollama/blob/main/docs/template.md) "
             "and compare its output with tokenizer.apply_chat_template")


def _default_system(tokenizer: Any) -> str:
    """The system turn a ChatML template inserts when the conversation has none ("" if it inserts none)."""
    probe = "\x00probe\x00"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": probe}], tokenize=False)
    before = rendered[: rendered.index(probe)]
    start = before.find("<|im_start|>system")
    return before[start: before.rindex("<|im_start|>user")] if start >= 0 else ""


def _go_string(text: str) -> str:
    """`text` as a Go string literal body (the template puts it inside double quotes)."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")


def go_template_for(tokenizer: Any) -> tuple[ChatFamily, str]:
    family = detect_family(getattr(tokenizer, "chat_template", None))
    template = family.go_template
    if family.name == "chatml":
        default = _default_system(tokenizer)
        if "{{" in default or '"""' in default:
            raise TunesmithError("the default system prompt of this chat template contains '{{' or '\"\"\"'",
                                 hint="write the Modelfile TEMPLATE by hand")
        template = template.replace("@DEFAULT_SYSTEM@", default) if default else template.replace(
            '{{- if and (eq $i 0) (ne .Role "system") }}@DEFAULT_SYSTEM@{{ end }}', "")
    if family.name == "mistral":
        template = template.replace("@EOS@", tokenizer.eos_token or "</s>")
    if family.name == "llama3" and "strftime_now" in tokenizer.chat_template:
        logger.warning("this Llama 3 template stamps a date into the system turn; the Ollama template does not")
    return family, template


def stop_tokens(tokenizer: Any, family: ChatFamily) -> tuple[str, ...]:
    """End-of-turn marker of the family, plus the tokenizer's EOS, for those that are single tokens."""
    vocab = tokenizer.get_vocab()
    eos = getattr(tokenizer, "eos_token", None)
    candidates = [eos if family.end_of_turn == "@EOS@" else family.end_of_turn, eos]
    return tuple(dict.fromkeys(t for t in candidates if t and t in vocab))


def _place_gguf(gguf_path: Path, out_dir: Path) -> str:
    """Make the GGUF reachable as ./model.gguf next to the Modelfile (hard link when possible)."""
    target = out_dir / "model.gguf"
    if gguf_path.resolve() != target.resolve():
        target.unlink(missing_ok=True)
        try:
            os.link(gguf_path, target)
        except OSError:
            shutil.copy2(gguf_path, target)
    return "./model.gguf"


def ollama_model_name(name: str) -> str:
    """Ollama model names are lower case letters, digits, '.', '_' and '-' (plus an optional ':tag')."""
    base, _, tag = name.partition(":")
    clean = [re.sub(r"[^a-z0-9._-]+", "-", part.lower()).strip("-") for part in (base, tag)]
    return clean[0] + (f":{clean[1]}" if clean[1] else "") if clean[0] else "tunesmith-model"


def system_line(system: str | None) -> list[str]:
    """The Modelfile's SYSTEM line. Ollama puts it in front of a chat whose first message is not a system message
    (server/routes.go: `if req.Messages[0].Role != "system" && m.System != ""`), so it replaces the chat
    template's own default system turn."""
    if not system:
        return []
    if '"""' in system:
        raise TunesmithError('the system message contains \'"""\', which a Modelfile cannot quote',
                             hint="write the Modelfile's SYSTEM line by hand")
    return [f'SYSTEM """{system}"""']


def write_modelfile(gguf_path: str | Path, out_dir: str | Path, tokenizer: Any, name: str | None = None,
                    system: str | None = None) -> OllamaModelfile:
    """Write out_dir/Modelfile (FROM ./model.gguf, TEMPLATE, SYSTEM, PARAMETER stop ...) and return how to
    create it.

    tokenizer: the HF tokenizer (or its folder) whose chat template the model was trained with.
    system: the system message the model was trained with (every training example carried it); Ollama then
    sends it whenever a chat brings none of its own.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise TunesmithError(f"{gguf_path} does not exist", hint="export the GGUF first (--format gguf)")
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    family, template = go_template_for(tokenizer)
    stops = stop_tokens(tokenizer, family)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"# Written by tunesmith. Chat format: {family.name}.", f"FROM {_place_gguf(gguf_path, out_dir)}",
             f'TEMPLATE """{template}"""', *system_line(system)] + [f'PARAMETER stop "{_go_string(s)}"' for s in stops]
    modelfile = out_dir / "Modelfile"
    modelfile.write_text("\n".join(lines) + "\n", encoding="utf-8")
    name = ollama_model_name(name or out_dir.name)
    return OllamaModelfile(modelfile=modelfile, family=family.name, stops=stops,
                           command=f"ollama create {name} -f {modelfile}")
