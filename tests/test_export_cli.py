"""`tunesmith merge` and `tunesmith export` on a run trained with the tiny model."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import tunesmith
from tunesmith.cli import main as cli_main
from tunesmith.model.runs import load_run


@pytest.fixture(scope="module")
def run(tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    rows = [{"messages": [{"role": "user", "content": f"hello world {i}"},
                          {"role": "assistant", "content": ["card_arrival", "exchange_rate"][i % 2]}]}
            for i in range(8)]
    (tmp / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return tunesmith.train({"model": str(tiny_dir), "output_dir": str(tmp / "runs"), "name": "exp",
                            "precision": "fp32", "device": "cpu", "data": {"train": str(tmp / "train.jsonl")},
                            "adapter": {"kind": "lora", "r": 8},
                            "train": {"lr": 1e-2, "max_steps": 5, "micro_batch_size": 4}}, progress=False)


def test_merge_cli_writes_a_checkpoint_transformers_loads(run, tmp_path):
    out = tmp_path / "merged"
    assert cli_main(["merge", str(run.path), "--dtype", "fp32", "--out", str(out)]) == 0
    ids = torch.tensor([[1, 30, 31, 32, 2]])
    merged = AutoModelForCausalLM.from_pretrained(out)
    adapter_model, _, _ = load_run(run.path, device="cpu", precision="fp32", dtype="fp32")
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapter_model(ids).logits, atol=1e-4, rtol=1e-4)


def test_export_peft_writes_vllm_command(run, tmp_path, capsys):
    out = tmp_path / "peft"
    assert cli_main(["export", str(run.path), "--format", "peft", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "vllm serve" in printed and "--enable-lora" in printed and "--max-lora-rank 8" in printed
    assert "vllm serve" in (out / "README.md").read_text()
    assert (out / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_export_gguf_checks_parity(run, tmp_path, dtype):
    from tunesmith.export.run import export_run

    result = export_run(run.path, "gguf", tmp_path / dtype, dtype=dtype)
    assert result.path.name == "model.gguf" and result.path.exists()
    assert result.checks["logits"]["max_abs_diff"] <= result.checks["logits"]["tolerance"]
    assert result.checks["tokenizer"]
    assert json.loads((tmp_path / dtype / "parity.json").read_text())["logits"]["dtype"] == dtype


def test_export_ollama_writes_modelfile(run, tmp_path, capsys):
    out = tmp_path / "ollama"
    assert cli_main(["export", str(run.path), "--format", "ollama", "--out", str(out)]) == 0
    text = (out / "Modelfile").read_text()
    assert "FROM" in text and "TEMPLATE" in text and 'PARAMETER stop "<|im_end|>"' in text
    assert "ollama create" in capsys.readouterr().out


def test_export_gguf_lora(run, tmp_path):
    from gguf import GGUFReader

    from tunesmith.export.run import export_run

    result = export_run(run.path, "gguf-lora", tmp_path / "lora")
    reader = GGUFReader(str(result.path))
    names = [t.name for t in reader.tensors]
    assert any(n.endswith(".lora_a") for n in names) and any(n.endswith(".lora_b") for n in names)
