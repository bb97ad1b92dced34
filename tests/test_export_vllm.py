"""vLLM LoRA serving checks: each vLLM rule is exercised by an adapter that breaks it."""

from __future__ import annotations

import json
import shlex

import pytest
import torch

from tunesmith.errors import ProblemsError, TunesmithError
from tunesmith.export.vllm import (
    adapter_rank,
    check_vllm_lora,
    serving_rank,
    vllm_command,
    write_vllm_readme,
)

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
    ({"rank_pattern": {"q_proj": 16}}, "ignores per-module rank/alpha"),
    ({"alpha_pattern": {"v_proj": 4}}, "ignores per-module rank/alpha"),
])
def test_each_unsupported_feature_is_reported(base_model, tiny_dir, tmp_path, config, expected):
    problems = check_vllm_lora(_adapter(base_model, tiny_dir, tmp_path / "a", **config))
    assert expected in _whats(problems)


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
    assert "vLLM cannot apply LoRA to 'lm_head' of a qwen2 model" in _whats(check_vllm_lora(adapter, architecture="qwen2"))
    # PEFT's default also stores the whole lm_head matrix next to the LoRA pair, which vLLM rejects
    full = _adapter(base_model, tiny_dir, tmp_path / "full", target_modules=["q_proj", "lm_head"])
    assert "not LoRA matrices" in _whats(check_vllm_lora(full))


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
