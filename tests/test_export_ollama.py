"""Ollama Modelfile: the Go TEMPLATE we write renders exactly what the HF Jinja chat template renders.

Here the Go templates are executed by `render_go` (tests/go_template.py), a Python emulation of the
text/template subset they use; `make test-clients` runs them through Go's own text/template too."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from go_template import (
    A1,
    CONVERSATIONS,
    GEMMA_JINJA,
    LLAMA3_JINJA,
    MISTRAL_JINJA,
    PHI3_JINJA,
    SYS,
    U1,
    U2,
    hf_render,
    ollama_messages,
    render_go,
    with_template,
)
from tunesmith.errors import TunesmithError
from tunesmith.export.ollama import detect_family, go_template_for, ollama_model_name, write_modelfile


def test_emulator_on_hand_checked_templates():
    assert render_go("a {{- 1 -}} \n b", []) == "a1b"
    t = '{{- range $i, $_ := .Messages }}{{ if eq $i 0 }}[{{ .Role }}]{{ else if eq .Role "x" }}X{{ else }}-{{ end }}{{ end }}'
    assert render_go(t, [{"role": "u", "content": ""}, {"role": "x", "content": ""}, {"role": "y", "content": ""}]) == "[u]X-"
    t = '{{- $s := "" }}{{ range $i, $_ := .Messages }}{{ $s = .Content }}{{ end }}<{{ $s }}>{{ len (slice $.Messages 1) }}'
    assert render_go(t, [{"role": "u", "content": "a"}, {"role": "u", "content": "b"}]) == "<b>1"


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chatml_go_template_equals_hf_rendering(tokenizer, messages):
    family, template = go_template_for(tokenizer)
    assert family.name == "chatml" and "You are a helpful assistant." in template  # default system carried over
    assert render_go(template, messages) == hf_render(tokenizer, messages)


def test_chatml_without_default_system(tokenizer):
    plain = tokenizer.chat_template.split("{% if loop.first")[0] + "{{ '<|im_start|>' + message['role']" + \
        tokenizer.chat_template.split("{{ '<|im_start|>' + message['role']", 1)[1]
    clone = with_template(tokenizer, plain)
    _, template = go_template_for(clone)
    assert "system" not in template
    for messages in CONVERSATIONS:
        assert render_go(template, messages) == hf_render(clone, messages)


@pytest.mark.parametrize("jinja,family,systemless", [(LLAMA3_JINJA, "llama3", False), (GEMMA_JINJA, "gemma", True),
                                                     (PHI3_JINJA, "phi3", False), (MISTRAL_JINJA, "mistral", True)])
def test_other_families_equal_hf_rendering(tokenizer, jinja, family, systemless):
    clone = with_template(tokenizer, jinja)
    found, template = go_template_for(clone)
    assert found.name == family
    for messages in CONVERSATIONS:
        if systemless and messages[0]["role"] == "system":
            continue  # these formats have no system role in HF
        assert render_go(template, messages) == hf_render(clone, messages, bos="<s>"), messages


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
    assert render_go(template, [SYS, U1, A1, U2]) == hf_render(tokenizer, [SYS, U1, A1, U2])
    with pytest.raises(TunesmithError, match="does not exist"):
        write_modelfile(tmp_path / "missing.gguf", tmp_path / "o2", tokenizer)
    assert isinstance(result.modelfile, Path)


def test_ollama_model_names():
    assert ollama_model_name("My Run 2024/v1") == "my-run-2024-v1"
    assert ollama_model_name("banking77:Q8") == "banking77:q8"
    assert ollama_model_name("???") == "tunesmith-model"


def test_modelfile_system_replaces_the_templates_default(tokenizer, tmp_path):
    """The system message training used goes into SYSTEM; Ollama then sends it in front of every chat that
    brings none, instead of the chat template's own default ("You are a helpful assistant." here)."""
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"GGUF placeholder")
    system = 'Classify the message.\nAnswer "yes" or \'no\'.'
    text = write_modelfile(gguf_file, tmp_path / "o", tokenizer, system=system).modelfile.read_text()
    served = re.search(r'^SYSTEM """(.*?)"""$', text, re.S | re.M).group(1)
    assert served == system
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    for messages in CONVERSATIONS:
        trained = messages if messages[0]["role"] == "system" else [{"role": "system", "content": system}, *messages]
        assert render_go(template, ollama_messages(messages, served)) == hf_render(tokenizer, trained)
    assert "You are a helpful assistant." not in render_go(template, ollama_messages([U1], served))
    assert "SYSTEM" not in write_modelfile(gguf_file, tmp_path / "p", tokenizer).modelfile.read_text()
    with pytest.raises(TunesmithError, match="cannot quote"):
        write_modelfile(gguf_file, tmp_path / "q", tokenizer, system='say """ this')
