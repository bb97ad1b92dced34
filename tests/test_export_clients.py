"""The exports run by the programs that serve them: llama.cpp (llama-cpp-python) decodes an exported GGUF with
the same greedy tokens as transformers, and Go's own text/template renders the Ollama TEMPLATE exactly as the
model's Jinja chat template. `make test-clients` installs both clients (and sets TUNESMITH_CLIENT_TESTS=1,
which turns a missing client into a failure instead of a skip) and runs this file."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from go_template import ollama_messages

REQUIRED = os.environ.get("TUNESMITH_CLIENT_TESTS") == "1"


def _client(module: str):
    if REQUIRED:
        return importlib.import_module(module)
    return pytest.importorskip(module, reason="a client test: `make test-clients` installs it")


def _greedy_hf(model, ids: list[int], steps: int, stop: set[int]) -> list[int]:
    out = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            out.append(int(model(torch.tensor([out])).logits[0, -1].argmax()))
            if out[-1] in stop:
                break
    return out[len(ids):]


def _greedy_llama_cpp(llm, ids: list[int], steps: int, stop: set[int]) -> list[int]:
    got: list[int] = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        got.append(int(token))
        if len(got) == steps or got[-1] in stop:
            break
    return got


# ---------------------------------------------------------------- llama.cpp

def test_llama_cpp_greedy_matches_on_the_test_model(tiny_dir, tmp_path):
    llama_cpp = _client("llama_cpp")
    from transformers import AutoModelForCausalLM

    from tunesmith.export.gguf import export_gguf
    from tunesmith.export.parity import sample_input_ids

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    model.config.tie_word_embeddings = False  # a separate output matrix, as in test_export_gguf's sharp model
    model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone() * 1.5)
    model.save_pretrained(tmp_path / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny_dir / name).exists():
            (tmp_path / "hf" / name).write_bytes((tiny_dir / name).read_bytes())
    path = export_gguf(tmp_path / "hf", tmp_path / "m.gguf", dtype="f32")
    ids = sample_input_ids(tmp_path / "hf")[0].tolist()[:32]
    expected = _greedy_hf(model.eval(), ids, 6, set())
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, verbose=False)
    assert _greedy_llama_cpp(llm, ids, 6, set()) == expected


PROMPTS = ["I still haven't received my new card, when will it arrive?", "What exchange rate will I get?",
           "My top-up failed, why?", "Why was I charged a fee for a cash withdrawal?",
           "How do I link my card to the app?"]


@pytest.fixture(scope="module")
def banking_run(tmp_path_factory):
    """The default model after a few real LoRA SFT steps on banking77 (every row carries one system line)."""
    _client("llama_cpp")
    import tunesmith

    examples = Path(__file__).resolve().parents[1] / "examples" / "banking77"
    tmp = tmp_path_factory.mktemp("banking")
    return tunesmith.train({
        "name": "banking-clients", "output_dir": str(tmp / "runs"), "model": "default", "precision": "fp32",
        "device": "cpu", "data": {"train": str(examples / "train.jsonl"), "max_examples": 96, "max_length": 96},
        "adapter": {"kind": "lora", "r": 8, "alpha": 16},
        "train": {"lr": 2e-3, "max_steps": 12, "micro_batch_size": 8, "warmup_ratio": 0.0}}, progress=False)


@pytest.fixture(scope="module")
def banking_gguf(banking_run, tmp_path_factory) -> Path:
    """The run exported to GGUF in f32, so llama.cpp holds exactly the merged checkpoint's weights."""
    from tunesmith.export.run import export_run

    return export_run(banking_run.path, "gguf", tmp_path_factory.mktemp("gguf"), dtype="f32").path


@pytest.mark.slow
def test_llama_cpp_decodes_a_fine_tuned_default_model_like_transformers(banking_run, banking_gguf, tmp_path):
    """The run exported to GGUF (f32, so both sides hold the same weights) gives the same greedy tokens in
    llama.cpp as the merged checkpoint in transformers, prompt by prompt, and the fine-tune is in the file: the
    base model answers differently."""
    llama_cpp = _client("llama_cpp")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.model.default import default_model_dir
    from tunesmith.model.merge import merge_run
    from tunesmith.model.runs import run_system_prompt

    merged_dir, _ = merge_run(banking_run.path, tmp_path / "merged", dtype="fp32")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    system = run_system_prompt(banking_run.path)
    assert system and system.startswith("Classify the customer's banking message")
    llm = llama_cpp.Llama(model_path=str(banking_gguf), n_ctx=512, verbose=False)
    stop = {tokenizer.eos_token_id}
    changed = 0
    for prompt in PROMPTS:
        text = tokenizer.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": prompt}],
                                             add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, prompt  # llama.cpp's own tokenizer
        expected = _greedy_hf(merged, ids, 12, stop)
        assert _greedy_llama_cpp(llm, ids, 12, stop) == expected, prompt
        changed += _greedy_hf(base, ids, 12, stop) != expected
    assert changed >= 1


@pytest.mark.slow
def test_llama_cpp_chat_serving_answers_like_tunesmith(banking_run, banking_gguf):
    """llama.cpp's own chat path (the chat template stored in the GGUF, its tokenizer, its sampler at
    temperature 0) answers each message as `tunesmith generate` does, given the training system message."""
    llama_cpp = _client("llama_cpp")
    import tunesmith

    model = tunesmith.open_model(banking_run.path, device="cpu", precision="fp32")
    expected = model.generate([[{"role": "user", "content": p}] for p in PROMPTS], max_new_tokens=12)
    llm = llama_cpp.Llama(model_path=str(banking_gguf), n_ctx=512, verbose=False)
    for prompt, want in zip(PROMPTS, expected, strict=True):
        reply = llm.create_chat_completion(
            messages=[{"role": "system", "content": model.system_prompt}, {"role": "user", "content": prompt}],
            max_tokens=12, temperature=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0)
        assert reply["choices"][0]["message"]["content"].strip() == want.strip(), prompt


# ---------------------------------------------------------------- Go's text/template (Ollama's template engine)

GO_MAIN = r'''package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string
	Content string
}

type Case struct {
	Template string
	Messages []Message
}

func main() {
	var cases []Case
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	out := []string{}
	for _, c := range cases {
		t := template.Must(template.New("").Parse(c.Template))
		var b strings.Builder
		if err := t.Execute(&b, map[string]any{"Messages": c.Messages}); err != nil {
			panic(err)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
'''


@pytest.fixture(scope="module")
def render_with_go(tmp_path_factory):
    """render(cases) -> list of strings: each (template, messages) executed by Go's text/template, the engine
    Ollama runs a Modelfile's TEMPLATE with (over .Messages with Role and Content)."""
    go = _client("go")
    binary = Path(importlib.util.find_spec(go.__name__).origin).parent / "bin" / "go"
    src = tmp_path_factory.mktemp("gotemplate")
    (src / "main.go").write_text(GO_MAIN)
    (src / "go.mod").write_text("module tunesmith/gotemplate\n\ngo 1.21\n")
    env = {**os.environ, "GOTOOLCHAIN": "local", "GOPROXY": "off", "GOFLAGS": "-mod=mod",
           "GOPATH": str(src / "gopath"), "GOCACHE": os.environ.get("GOCACHE", str(src / "gocache"))}
    subprocess.run([str(binary), "build", "-o", str(src / "render"), "."], cwd=src, env=env, check=True,
                   capture_output=True, timeout=600)

    def render(cases: list[tuple[str, list[dict]]]) -> list[str]:
        payload = [{"Template": t, "Messages": [{"Role": m["role"], "Content": m["content"]} for m in msgs]}
                   for t, msgs in cases]
        done = subprocess.run([str(src / "render")], input=json.dumps(payload), capture_output=True, text=True,
                              check=True, timeout=60)
        return json.loads(done.stdout)

    return render


def test_go_executes_every_ollama_template_like_the_jinja_template(render_with_go, tiny_dir):
    from transformers import AutoTokenizer

    from go_template import (
        CONVERSATIONS,
        GEMMA_JINJA,
        LLAMA3_JINJA,
        MISTRAL_JINJA,
        PHI3_JINJA,
        SYS,
        hf_render,
        with_template,
    )
    from tunesmith.export.ollama import go_template_for

    chatml = AutoTokenizer.from_pretrained(tiny_dir)
    cases, expected = [], []
    for jinja, systemless in [(None, False), (LLAMA3_JINJA, False), (GEMMA_JINJA, True), (PHI3_JINJA, False),
                              (MISTRAL_JINJA, True)]:
        tokenizer = chatml if jinja is None else with_template(chatml, jinja)
        _, template = go_template_for(tokenizer)
        for messages in CONVERSATIONS:
            if systemless and messages[0]["role"] == "system":
                continue
            cases.append((template, messages))
            expected.append(hf_render(tokenizer, messages, bos=None if jinja is None else "<s>"))
    # the Modelfile's SYSTEM, put first by Ollama when the chat has no system message of its own
    _, template = go_template_for(chatml)
    for messages in CONVERSATIONS:
        cases.append((template, ollama_messages(messages, "Trained under this.")))
        trained = messages if messages[0]["role"] == "system" else [
            {"role": "system", "content": "Trained under this."}, *messages]
        expected.append(hf_render(chatml, trained))
    assert render_with_go(cases) == expected
    assert SYS["content"] in expected[2]  # the cases do carry system turns
