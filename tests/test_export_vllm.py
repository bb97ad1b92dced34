"""vLLM LoRA serving checks (rules read from vLLM 0.33.0's source): each rule is exercised by an adapter that
breaks it, and what vLLM accepts (rank/alpha patterns, copies of the base embedding) is not flagged."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch

from tunesmith.errors import ProblemsError, TunesmithError
from tunesmith.export.vllm import (
    adapter_rank,
    check_vllm_lora,
    serving_rank,
    tool_call_parser,
    vllm_command,
    write_vllm_readme,
)

TEMPLATES = Path(__file__).parent / "fixtures" / "templates"
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def base_model(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)


def _adapter(base_model, tiny_dir, out, save_embedding_layers="auto", **config):
    import copy

    from peft import LoraConfig, get_peft_model

    options = {"r": 8, "lora_alpha": 16, "target_modules": ALL_LINEAR} | config
    model = get_peft_model(copy.deepcopy(base_model), LoraConfig(**options))
    model.save_pretrained(out, save_embedding_layers=save_embedding_layers)
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = str(tiny_dir)  # a local base: its model_type is read from it
    (out / "adapter_config.json").write_text(json.dumps(adapter_config))
    return out


def _whats(problems):
    return " | ".join(f"{p.where}: {p.what}" for p in problems)


def test_plain_lora_is_servable(base_model, tiny_dir, tmp_path):
    adapter = _adapter(base_model, tiny_dir, tmp_path / "ok")
    assert check_vllm_lora(adapter) == []
    assert check_vllm_lora(adapter, max_lora_rank=8) == []
    assert adapter_rank(adapter) == 8


@pytest.mark.parametrize("config,expected", [
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "lora_only"}, "bias='lora_only'"),
    ({"lora_bias": True}, "LoRA bias (lora_bias)"),
    ({"layer_replication": [[0, 2]]}, "layer_replication"),
])
def test_each_unsupported_feature_is_reported(base_model, tiny_dir, tmp_path, config, expected):
    problems = check_vllm_lora(_adapter(base_model, tiny_dir, tmp_path / "a", **config))
    assert expected in _whats(problems)


def test_inits_that_change_the_base_are_refused(base_model, tiny_dir, tmp_path):
    adapter = _adapter(base_model, tiny_dir, tmp_path / "a")
    config = json.loads((adapter / "adapter_config.json").read_text())
    for init, refused in [("pissa", True), ("olora", True), ("loftq", True), ("gaussian", False), (True, False)]:
        (adapter / "adapter_config.json").write_text(json.dumps(config | {"init_lora_weights": init}))
        assert ("changes the base weights" in _whats(check_vllm_lora(adapter))) is refused, init


def test_trainable_tokens_are_refused(base_model, tiny_dir, tmp_path):
    problems = _whats(check_vllm_lora(_adapter(base_model, tiny_dir, tmp_path / "a", target_modules=["q_proj"],
                                               trainable_token_indices=[3, 4])))
    assert "trainable-token deltas" in problems and "not LoRA matrices" in problems


def test_rank_and_alpha_patterns_are_served(base_model, tiny_dir, tmp_path):
    adapter = _adapter(base_model, tiny_dir, tmp_path / "a", rank_pattern={"q_proj": 16}, alpha_pattern={"v_proj": 4})
    assert check_vllm_lora(adapter, max_lora_rank=16) == []
    assert adapter_rank(adapter) == 16  # the largest rank decides --max-lora-rank
    assert "rank 16 is above --max-lora-rank 8" in _whats(check_vllm_lora(adapter, max_lora_rank=8))


def test_dora_and_saved_modules_also_flag_their_extra_tensors(base_model, tiny_dir, tmp_path):
    problems = check_vllm_lora(_adapter(base_model, tiny_dir, tmp_path / "a", use_dora=True))
    assert "not LoRA matrices" in _whats(problems)


def test_rank_limits(base_model, tiny_dir, tmp_path):
    adapter = _adapter(base_model, tiny_dir, tmp_path / "r16", r=16)
    assert "rank 16 is above --max-lora-rank 8" in _whats(check_vllm_lora(adapter, max_lora_rank=8))
    assert check_vllm_lora(adapter, max_lora_rank=8)[0].hint == "serve with --max-lora-rank 16"
    assert "not a value vLLM accepts" in _whats(check_vllm_lora(adapter, max_lora_rank=24))
    assert [serving_rank(r) for r in (1, 4, 8, 9, 64, 300, 512)] == [1, 8, 8, 16, 64, 320, 512]
    with pytest.raises(TunesmithError, match="512"):
        serving_rank(513)


def test_embedding_targets_depend_on_architecture(base_model, tiny_dir, tmp_path):
    adapter = _adapter(base_model, tiny_dir, tmp_path / "head", target_modules=["q_proj", "lm_head"],
                       save_embedding_layers=False)
    assert check_vllm_lora(adapter) == []  # the base is llama: lm_head LoRA is supported
    for arch in ("qwen2", "mistral"):  # their vLLM classes declare no embedding modules
        assert f"vLLM cannot apply LoRA to 'lm_head' of a {arch} model" in _whats(
            check_vllm_lora(adapter, architecture=arch))
    # PEFT's default also stores a copy of the base lm_head (`lm_head.base_layer.weight`); vLLM skips it
    full = _adapter(base_model, tiny_dir, tmp_path / "full", target_modules=["q_proj", "lm_head"])
    from safetensors import safe_open

    with safe_open(str(full / "adapter_model.safetensors"), "pt") as f:
        assert "base_model.model.lm_head.base_layer.weight" in f.keys()
    assert check_vllm_lora(full) == []


def test_missing_files(tmp_path):
    assert "is missing" in _whats(check_vllm_lora(tmp_path))


def test_command_and_readme(base_model, tiny_dir, tmp_path):
    adapter = _adapter(base_model, tiny_dir, tmp_path / "my adapter")
    command = vllm_command("HuggingFaceTB/SmolLM2-135M-Instruct", "banking", adapter, 8)
    assert shlex.split(command) == ["vllm", "serve", "HuggingFaceTB/SmolLM2-135M-Instruct", "--enable-lora",
                                    "--lora-modules", f"banking={adapter.resolve()}", "--max-lora-rank", "8"]
    peft_card = (adapter / "README.md").read_text()
    readme = write_vllm_readme(adapter, "HuggingFaceTB/SmolLM2-135M-Instruct", "banking")
    write_vllm_readme(adapter, "HuggingFaceTB/SmolLM2-135M-Instruct", "banking")  # idempotent
    text = readme.read_text()
    assert text.startswith(peft_card.rstrip("\n")) and text.count("## Serve with vLLM") == 1
    assert command in text and '"model": "banking"' in text

    bad = _adapter(base_model, tiny_dir, tmp_path / "dora", use_dora=True)
    with pytest.raises(ProblemsError, match="DoRA"):
        write_vllm_readme(bad, "base", "x")


def test_readme_tells_to_send_the_training_system_message(base_model, tiny_dir, tmp_path):
    adapter = _adapter(base_model, tiny_dir, tmp_path / "a")
    system = "Classify the customer's message. Answer with the label only: \"x\" or 'y'."
    text = write_vllm_readme(adapter, "base", "banking", system_prompt=system).read_text()
    assert "send it as the first message" in text and system in text
    curl = text.split("```bash\ncurl", 1)[1].split("```", 1)[0]
    body = shlex.split("curl" + curl.replace("\\\n", " "))[-1]  # what the shell passes to -d
    assert json.loads(body)["messages"] == [{"role": "system", "content": system},
                                            {"role": "user", "content": "Hello"}]
    plain = write_vllm_readme(adapter, "base", "banking").read_text()
    assert "first message" not in plain and json.loads(
        shlex.split("curl" + plain.split("```bash\ncurl", 1)[1].split("```", 1)[0].replace("\\\n", " "))[-1]
    )["messages"] == [{"role": "user", "content": "Hello"}]


@pytest.mark.parametrize("template,parser", [
    ("qwen2_5_tools.jinja", "hermes"), ("mistral_v3_tools.jinja", "mistral"), ("llama3_1_tools.jinja", "llama3_json"),
    ("qwen2_5.jinja", None), ("llama3.jinja", None), ("mistral.jinja", None), ("chatml_smollm2.jinja", None),
])
def test_tool_call_parser_follows_the_templates_call_syntax(template, parser):
    assert tool_call_parser((TEMPLATES / template).read_text()) == parser


def test_readme_and_command_name_the_tool_parser_of_the_saved_template(base_model, tiny_dir, tmp_path):
    from tunesmith.export.vllm import saved_chat_template

    adapter = _adapter(base_model, tiny_dir, tmp_path / "tools")
    assert saved_chat_template(adapter) is None
    assert "--tool-call-parser" not in write_vllm_readme(adapter, "base", "calls").read_text()
    (adapter / "chat_template.jinja").write_text((TEMPLATES / "qwen2_5_tools.jinja").read_text())
    text = write_vllm_readme(adapter, "base", "calls").read_text()
    command = text.split("```bash\n", 1)[1].split("\n```", 1)[0]
    assert shlex.split(command)[-3:] == ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    assert text.count("--tool-call-parser hermes") == 2  # the command and the note that explains it
    (adapter / "chat_template.jinja").unlink()
    (adapter / "tokenizer_config.json").write_text(json.dumps({"chat_template": (
        TEMPLATES / "llama3_1_tools.jinja").read_text()}))
    assert saved_chat_template(adapter) is not None and "--tool-call-parser llama3_json" in write_vllm_readme(
        adapter, "base", "calls").read_text()
