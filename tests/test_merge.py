"""Merging: parity checks that fail when they should, standalone checkpoints with the right stop tokens,
and `merge_run` over a run folder."""

from __future__ import annotations

import json

import pytest
import torch

from adapter_utils import load_tiny, load_tokenizer, token_batch, train_steps
from tunesmith.config import AdapterConfig
from tunesmith.errors import TunesmithError
from tunesmith.model.adapters import apply_adapter, save_adapter
from tunesmith.model.merge import (
    check_merge_parity,
    end_of_turn_ids,
    logits_of,
    merge_adapter,
    merge_run,
    write_merged,
)


def test_parity_check_fails_on_difference_and_nonfinite(tiny_dir):
    ids = token_batch(seed=0)
    model = load_tiny(tiny_dir)
    reference = logits_of(model, ids)
    assert check_merge_parity(reference, model, ids, tol=0.0) == 0.0
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] += 0.5
    with pytest.raises(TunesmithError, match="differs from the adapter model"):
        check_merge_parity(reference, model, ids, tol=1e-6)
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight[0, 0] = float("nan")
    with pytest.raises(TunesmithError, match="merged model produces NaN"):
        check_merge_parity(reference, model, ids, tol=1e9)
    with pytest.raises(TunesmithError, match="adapter model produces NaN"):
        check_merge_parity(model, load_tiny(tiny_dir), ids, tol=1e9)


def test_merge_of_a_plain_model_is_a_no_op(tiny_dir):
    model = load_tiny(tiny_dir)
    assert merge_adapter(model) is model


def test_write_merged_stop_tokens_template_and_dtype(tiny_dir, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = load_tokenizer(tiny_dir)
    # A base whose eos is the document end while chat turns end in <|im_end|> (as in Qwen2 base models).
    tok.eos_token = "<|endoftext|>"
    assert end_of_turn_ids(tok) == [0, 2]
    model = load_tiny(tiny_dir)
    out = write_merged(model, tok, tmp_path / "m", dtype="bf16")
    gen = GenerationConfig.from_pretrained(out)
    assert gen.eos_token_id == [0, 2] and gen.pad_token_id == 2
    assert AutoTokenizer.from_pretrained(out).chat_template == tok.chat_template
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    files = list(out.glob("*.safetensors"))
    assert files and not list(out.glob("*.bin"))
    with safe_open(str(files[0]), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    ids = token_batch(seed=1)
    assert torch.equal(logits_of(reloaded.to(torch.bfloat16), ids), logits_of(model, ids))


def test_write_merged_refuses_unmerged_and_bad_dtype(tiny_dir, tmp_path):
    tok = load_tokenizer(tiny_dir)
    with pytest.raises(TunesmithError, match="unknown dtype 'int8'"):
        write_merged(load_tiny(tiny_dir), tok, tmp_path / "a", dtype="int8")
    adapter = apply_adapter(load_tiny(tiny_dir), AdapterConfig(r=2))
    with pytest.raises(TunesmithError, match="unmerged adapter"):
        write_merged(adapter, tok, tmp_path / "b")
    with pytest.raises(TunesmithError, match="4-bit model"):
        write_merged(load_tiny(tiny_dir, quantized=True), tok, tmp_path / "c")


def make_run(tiny_dir, root, kind: str, precision: str = "fp32", double_quant: bool = True,
             embeddings: bool | None = None):
    """A run folder as tunesmith train leaves it: run.json, config.yaml, adapter/ (+ tokenizer).
    `embeddings` is the QLoRA quantize_embeddings setting as run.json records it; None: a run folder from
    before the option existed (nothing recorded, and its embedding/head were left in bf16)."""
    cfg = AdapterConfig(kind=kind, r=4, double_quant=double_quant) if kind != "full" else AdapterConfig(kind="full")
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    model = load_tiny(tiny_dir, quantized=kind == "qlora", dtype=dtype, double_quant=double_quant,
                      embeddings=bool(embeddings))
    model = apply_adapter(model, cfg)
    train_steps(model, cfg, steps=2, lr=1e-2)
    root.mkdir()
    save_adapter(model, root / "adapter")
    load_tokenizer(tiny_dir).save_pretrained(root / "adapter")
    run = {"model": str(tiny_dir), "adapter_kind": kind, "precision": precision}
    if embeddings is not None:
        run["quantize_embeddings"] = embeddings
    (root / "run.json").write_text(json.dumps(run))
    (root / "config.yaml").write_text(f"model: {tiny_dir}\nprecision: {precision}\n"
                                      f"adapter: {{kind: {kind}, double_quant: {str(double_quant).lower()}}}\n")
    return model


@pytest.mark.parametrize("kind,double_quant,embeddings", [
    ("lora", True, False), ("qlora", True, True), ("qlora", False, True), ("qlora", True, False), ("qlora", True, None),
    ("full", True, False)])
def test_merge_run(kind, double_quant, embeddings, tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from tunesmith.model.merge import sample_input_ids

    trained = make_run(tiny_dir, tmp_path / "run", kind, double_quant=double_quant, embeddings=embeddings)
    out, report = merge_run(tmp_path / "run", dtype="fp32")
    assert out == tmp_path / "run" / "merged"
    assert report["merged"] == (kind != "full") and report["max_abs_diff"] <= report["tol"]
    assert report["written_dtype"] == "fp32" and report["written_top1_agreement"] == 1.0
    ids = sample_input_ids(load_tokenizer(tiny_dir))
    assert report["checked_tokens"] == ids.numel() > 20
    merged = AutoModelForCausalLM.from_pretrained(out)
    # the merged model is the trained one (for QLoRA: only if the base is re-quantised the same way)
    assert (logits_of(merged, ids) - logits_of(trained, ids)).abs().max() < 2e-5
    assert report["written_max_abs_diff"] < 2e-5


def test_merge_run_qlora_bf16_base(tiny_dir, tmp_path):
    """A QLoRA run on a bf16 base: the merge must quantise from bf16 again to get the same NF4 weights."""
    from transformers import AutoModelForCausalLM

    from tunesmith.model.merge import _upcast_unquantised, sample_input_ids
    from tunesmith.model.quantize import is_4bit_linear

    trained = make_run(tiny_dir, tmp_path / "run", "qlora", precision="bf16", embeddings=True)
    out, report = merge_run(tmp_path / "run", dtype="fp32")
    assert report["max_abs_diff"] <= report["tol"]
    # Evaluate the trained model in fp32 too; then only the NF4 weights could differ, and they must not.
    _upcast_unquantised(trained)
    for m in trained.modules():
        if is_4bit_linear(m):
            m.compute_dtype = torch.float32
    ids = sample_input_ids(load_tokenizer(tiny_dir))
    assert (logits_of(AutoModelForCausalLM.from_pretrained(out), ids) - logits_of(trained, ids)).abs().max() < 2e-5


def test_merge_run_bf16_and_out_dir(tiny_dir, tmp_path):
    make_run(tiny_dir, tmp_path / "run", "lora")
    out, report = merge_run(tmp_path / "run", out_dir=tmp_path / "elsewhere", dtype="bf16")
    assert out == tmp_path / "elsewhere" and (out / "generation_config.json").exists()
    assert report["max_abs_diff"] <= report["tol"]
    # bf16 weights round each logit by ~2^-8 relative; the tiny model's logits are O(1).
    assert 0 < report["written_max_abs_diff"] < 0.05


def test_merge_run_errors(tiny_dir, tmp_path):
    with pytest.raises(TunesmithError, match="run.json not found"):
        merge_run(tmp_path)
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(TunesmithError, match="not valid JSON"):
        merge_run(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"model": str(tiny_dir)}))
    with pytest.raises(TunesmithError, match="no 'adapter_kind' key"):
        merge_run(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"model": str(tiny_dir), "adapter_kind": "lora"}))
    with pytest.raises(TunesmithError, match="adapter directory not found"):
        merge_run(tmp_path)
