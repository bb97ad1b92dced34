"""Base models load from safetensors only: a model whose weights are only pickle files (*.bin) is refused with a
clear error, unless the user opts in with `allow_pickle_weights: true` (or --allow-pickle-weights)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import tunesmith
from tunesmith.cli import main as cli_main
from tunesmith.errors import ConfigError, ModelLoadError
from tunesmith.model.load import load_model_and_tokenizer


@pytest.fixture(scope="module")
def bin_dir(tiny_dir, tmp_path_factory):
    """The tiny model with its weights as a pickled state dict (pytorch_model.bin) and no safetensors."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("bin") / "tiny-bin"
    shutil.copytree(tiny_dir, out)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    (out / "model.safetensors").unlink()
    torch.save(model.state_dict(), out / "pytorch_model.bin")
    return out


def test_pickle_only_model_is_refused_unless_allowed(bin_dir, tiny_dir):
    with pytest.raises(ModelLoadError, match="only pickle files") as err:
        load_model_and_tokenizer(str(bin_dir))
    assert "pytorch_model.bin" in err.value.message and "allow_pickle_weights: true" in err.value.hint
    model, _ = load_model_and_tokenizer(str(bin_dir), allow_pickle_weights=True)
    reference, _ = load_model_and_tokenizer(str(tiny_dir))
    ids = torch.tensor([[1, 30, 31, 32]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)


def test_training_on_a_pickle_base_needs_the_config_key(bin_dir, tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"hello {i}"}, {"role": "assistant", "content": "card_arrival"}]}
            for i in range(4)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    config = {"model": str(bin_dir), "output_dir": str(tmp_path / "runs"), "name": "bin", "precision": "fp32",
              "device": "cpu", "data": {"train": str(tmp_path / "train.jsonl")},
              "train": {"max_steps": 1, "micro_batch_size": 4}}
    with pytest.raises(ModelLoadError, match="only pickle files"):
        tunesmith.train(config, progress=False)
    run = tunesmith.train({**config, "allow_pickle_weights": True}, progress=False)
    model = tunesmith.open_model(run.path, device="cpu", precision="fp32")  # reopened as training loaded it
    assert model.generate([[{"role": "user", "content": "hello"}]], max_new_tokens=2)
    from tunesmith.model.merge import merge_run

    merged, report = merge_run(run.path, tmp_path / "merged", dtype="fp32")
    assert (merged / "model.safetensors").exists() and report["max_abs_diff"] <= report["tol"]
    with pytest.raises(ConfigError, match="allow_pickle_weights"):
        tunesmith.parse_config({**config, "allow_pickle_weights": "maybe"})


def test_generate_cli_refuses_and_names_the_flag(bin_dir, capsys):
    assert cli_main(["generate", str(bin_dir), "--prompt", "hi", "--device", "cpu", "--precision", "fp32"]) != 0
    assert "--allow-pickle-weights" in capsys.readouterr().err
    assert cli_main(["generate", str(bin_dir), "--prompt", "hi", "--device", "cpu", "--precision", "fp32",
                     "--max-new-tokens", "2", "--allow-pickle-weights"]) == 0
