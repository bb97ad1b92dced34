"""Serving what training used: the system message every training example carried is recorded in run.json and
sent by default by generate/chat/open_model and the exports; every export carries a model card the Hub's own
parser reads; `tunesmith push --dry-run` lists exactly what would be uploaded."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

import tunesmith
from go_template import ollama_messages, render_go
from tunesmith.cli import main as cli_main
from tunesmith.data.formats import common_system_prompt
from tunesmith.data.types import Conversation, Message, Preference

SYSTEM = "Classify the customer's banking message. Answer with the intent label only."
LABELS = ["card_arrival", "exchange_rate"]


def _rows(n: int, system: str | None = SYSTEM) -> list[dict]:
    return [{"messages": [*([{"role": "system", "content": system}] if system else []),
                          {"role": "user", "content": f"hello world {i}"},
                          {"role": "assistant", "content": LABELS[i % 2]}]} for i in range(n)]


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def run(tiny_dir, tmp_path_factory):
    """A tiny LoRA run whose every training row carries SYSTEM, evaluated against the base model."""
    tmp = tmp_path_factory.mktemp("serving")
    return tunesmith.train({
        "model": str(tiny_dir), "output_dir": str(tmp / "runs"), "name": "sys", "precision": "fp32", "device": "cpu",
        "data": {"train": _write(tmp / "train.jsonl", _rows(8))}, "adapter": {"kind": "lora", "r": 8},
        "train": {"lr": 1e-2, "max_steps": 3, "micro_batch_size": 4},
        "eval": {"data": _write(tmp / "test.jsonl", _rows(6)), "candidates": ["base", "tuned"], "metrics": ["exact"],
                 "max_new_tokens": 4}}, progress=False)


def _conv(*messages: tuple[str, str]) -> Conversation:
    return Conversation(tuple(Message(role, text) for role, text in messages))


def test_common_system_prompt_by_hand():
    a, b = _conv(("system", "S"), ("user", "x")), _conv(("system", "S"), ("user", "y"))
    bare = _conv(("user", "z"))
    assert common_system_prompt([a, b]) == "S"
    assert common_system_prompt([a, bare]) is None  # one example trained without it
    assert common_system_prompt([a, bare], default="S") == "S"  # data.system_prompt fills the bare one
    assert common_system_prompt([bare], default="D") == "D"
    assert common_system_prompt([a, _conv(("system", "T"), ("user", "x"))]) is None
    assert common_system_prompt([a, bare], default="T") is None  # the bare one gets T, the other has S
    assert common_system_prompt([]) is None and common_system_prompt([bare]) is None
    pair = Preference(prompt=(Message("system", "S"), Message("user", "q")), chosen=(Message("assistant", "a"),),
                      rejected=(Message("assistant", "b"),))
    assert common_system_prompt([pair, a]) == "S"


def test_run_records_the_system_message_and_serving_sends_it(run):
    assert json.loads((run.path / "run.json").read_text())["system_prompt"] == SYSTEM
    model = tunesmith.open_model(run.path, device="cpu", precision="fp32")
    assert model.system_prompt == SYSTEM
    user = [{"role": "user", "content": "hello world 3"}]
    expected = model.tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}, *user],
                                                   add_generation_prompt=True, tokenize=False)
    assert model.generator.prompt_ids(user) == model.tokenizer(expected, add_special_tokens=False)["input_ids"]
    bare = tunesmith.open_model(run.path, device="cpu", precision="fp32", system_prompt="")
    assert bare.system_prompt is None
    template_default = bare.tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    assert SYSTEM not in template_default
    assert bare.generator.prompt_ids(user) == bare.tokenizer(template_default, add_special_tokens=False)["input_ids"]


def test_open_adapters_switches_system_message_with_the_adapter(run, tiny_dir):
    model = tunesmith.open_adapters(str(tiny_dir), {"sys": run.path}, device="cpu", precision="fp32")
    assert model.system_prompt is None  # the plain base answers first
    model.use("sys")
    assert model.system_prompt == SYSTEM
    model.use(None)
    assert model.system_prompt is None


def test_generate_cli_says_which_system_message_it_sends(run, capsys):
    assert cli_main(["generate", str(run.path), "--prompt", "hello", "--max-new-tokens", "2", "--device", "cpu",
                     "--precision", "fp32"]) == 0
    assert SYSTEM in capsys.readouterr().err
    assert cli_main(["generate", str(run.path), "--prompt", "hello", "--max-new-tokens", "2", "--device", "cpu",
                     "--precision", "fp32", "--system", ""]) == 0
    assert SYSTEM not in capsys.readouterr().err


def test_older_runs_fall_back_to_the_config(run, tmp_path):
    from tunesmith.model.runs import run_system_prompt

    old = tmp_path / "old"
    shutil.copytree(run.path, old, ignore=shutil.ignore_patterns("export", "eval"))
    info = json.loads((old / "run.json").read_text())
    del info["system_prompt"]
    (old / "run.json").write_text(json.dumps(info))
    assert run_system_prompt(old) is None  # its config set no data.system_prompt
    (old / "config.yaml").write_text((old / "config.yaml").read_text().replace(
        "system_prompt: null", "system_prompt: From the config."))
    assert run_system_prompt(old) == "From the config."


def test_ollama_export_sets_system_and_gguf_commands_pass_it(run, tmp_path):
    from tunesmith.export.run import export_run

    result = export_run(run.path, "ollama", tmp_path / "ollama")
    text = result.path.read_text()
    served = re.search(r'^SYSTEM """(.*?)"""$', text, re.S | re.M).group(1)
    assert served == SYSTEM
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    user = [{"role": "user", "content": "hello world 3"}]
    tokenizer = tunesmith.open_model(run.path, device="cpu", precision="fp32").tokenizer
    assert render_go(template, ollama_messages(user, served)) == tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, *user], add_generation_prompt=True, tokenize=False)
    gguf = export_run(run.path, "gguf", tmp_path / "gguf")
    assert any("-sys" in c and SYSTEM.split()[0] in c for c in gguf.commands)


# ---------------------------------------------------------------- model cards

def _card(path: Path):
    from huggingface_hub import ModelCard

    return ModelCard.load(path / "README.md")


def test_every_export_has_a_model_card_the_hub_parser_reads(run, tmp_path):
    from tunesmith.export.run import export_run

    scores = json.loads((run.path / "run.json").read_text())["eval"]["scores"]["exact"]
    for fmt, library in [("peft", "peft"), ("merged", "transformers"), ("gguf", None), ("gguf-lora", None)]:
        out = export_run(run.path, fmt, tmp_path / fmt).path
        folder = out if out.is_dir() else out.parent
        card = _card(folder)
        assert card.data.library_name == library, fmt
        assert card.data.pipeline_tag == "text-generation" and card.data.license == "other"  # a local base
        assert {"tunesmith", "sft", "lora"} <= set(card.data.tags)
        assert ("gguf" in card.data.tags) == fmt.startswith("gguf")
        assert card.data.base_model is None  # the tiny base is a local folder, not a Hub id
        text = card.text
        assert "8 training rows from `train.jsonl`" in text and "hello world" not in text  # names, not contents
        assert "r = 8" in text and "lr = 0.01" in text and SYSTEM in text
        for name, s in scores.items():  # the eval table, with intervals
            assert f"| {name} | exact | {100 * s['mean']:.1f}% | {100 * s['lo']:.1f}% – {100 * s['hi']:.1f}% |" in text
    assert "## Serve with vLLM" in (tmp_path / "peft" / "README.md").read_text()  # after the card
    assert "max |logit difference|" in _card(tmp_path / "gguf").text


def test_card_metadata_for_hub_base_and_datasets():
    from tunesmith.export.card import card_metadata

    info = {"model": "default", "method": "dpo", "adapter_kind": "qlora",
            "data": {"train": ["PolyAI/banking77", "no/such/local/file.jsonl"]}}
    meta = card_metadata(info, "gguf")
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"
    assert meta["datasets"] == ["PolyAI/banking77"] and "library_name" not in meta
    assert meta["tags"] == ["tunesmith", "dpo", "qlora", "gguf", "llama.cpp"]
    assert card_metadata({"model": "Qwen/Qwen2.5-0.5B-Instruct"}, "adapter")["base_model"] == "Qwen/Qwen2.5-0.5B-Instruct"


def test_card_reads_a_ladder_when_results_have_one(run, tmp_path):
    from tunesmith.export.card import eval_table

    copy = tmp_path / "run"
    shutil.copytree(run.path, copy, ignore=shutil.ignore_patterns("export"))
    results = json.loads((copy / "eval" / "results.json").read_text())
    results["ladder"] = [{"name": "base", "tuned": False, "mean": 0.25, "lo": 0.1, "hi": 0.5, "usd_per_1k": 0.02},
                         {"name": "tuned", "tuned": True, "mean": 0.75, "lo": 0.5, "hi": 0.9, "usd_per_1k": 0.01}]
    (copy / "eval" / "results.json").write_text(json.dumps(results))
    rows, _, n = eval_table(copy, json.loads((copy / "run.json").read_text()))
    assert [(r["candidate"], r["mean"], r["usd_per_1k"]) for r in rows] == [("base", 0.25, 0.02), ("tuned", 0.75, 0.01)]
    assert n == 6
    (copy / "eval" / "results.json").write_text("{not json")
    rows, _, _ = eval_table(copy, json.loads((copy / "run.json").read_text()))  # falls back to run.json
    assert {r["candidate"] for r in rows} == {"base", "tuned"}


# ---------------------------------------------------------------- push

def test_push_dry_run_lists_exactly_what_would_be_uploaded(run, capsys):
    assert cli_main(["push", str(run.path), "me/tiny-sys", "--dry-run"]) == 0
    printed = capsys.readouterr()
    folder = run.path / "export" / "peft"
    expected = sorted(p for p in folder.rglob("*") if p.is_file())
    listed = re.findall(r"^  (\S+)  \(([\d,]+) bytes\)$", printed.out, re.M)
    assert [(folder / name, int(size.replace(",", ""))) for name, size in listed] == \
        [(p, p.stat().st_size) for p in expected]
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors"} <= {n for n, _ in listed}
    assert "would upload" in printed.out and "https://huggingface.co/me/tiny-sys" in printed.out
    assert "nothing was uploaded" in printed.err


def test_push_refuses_clearly_without_network_or_token(run, monkeypatch, tmp_path, capsys):
    from huggingface_hub import constants

    from tunesmith.errors import TunesmithError
    from tunesmith.export.push import push_run

    shutil.rmtree(run.path / "export", ignore_errors=True)
    with pytest.raises(TunesmithError, match="offline mode is on"):
        push_run(run.path, "me/tiny-sys")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    with pytest.raises(TunesmithError, match="no Hugging Face token"):
        push_run(run.path, "me/tiny-sys")
    assert not (run.path / "export").exists()  # refused before spending time on an export
    assert cli_main(["push", str(run.path), "not a repo id", "--dry-run"]) != 0
    assert "not a Hub repo id" in capsys.readouterr().err


def test_chat_cli_sends_it_too(run, monkeypatch, capsys):
    from tunesmith.api import ChatModel

    replies = iter(["hello world 1", "/reset", "hello world 2", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(replies))
    seen = []
    original = ChatModel.generate
    monkeypatch.setattr(ChatModel, "generate", lambda self, prompts, **kw: seen.append(
        self.generator.prompt_ids(prompts[0])) or original(self, prompts, **kw))
    assert cli_main(["chat", str(run.path), "--max-new-tokens", "2", "--device", "cpu", "--precision", "fp32"]) == 0
    out = capsys.readouterr()
    assert SYSTEM in out.err and out.out.count("model>") == 2
    tokenizer = tunesmith.open_model(run.path, device="cpu", precision="fp32").tokenizer
    for ids, text in zip(seen, ["hello world 1", "hello world 2"], strict=True):  # /reset: system + one turn
        expected = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM},
                                                  {"role": "user", "content": text}],
                                                 add_generation_prompt=True, tokenize=False)
        assert ids == tokenizer(expected, add_special_tokens=False)["input_ids"]
