"""QLoRA: what the 4-bit base costs (measured, checked against the NF4 storage formula), that training
through it computes the right gradients, that nothing is upcast wastefully, and that merging dequantises
instead of re-quantising."""

from __future__ import annotations

import math

import pytest
import torch

from adapter_utils import changed, load_tiny, load_tokenizer, snapshot, token_batch, train_steps
from tunesmith.config import AdapterConfig
from tunesmith.model.adapters import apply_adapter, load_adapter, save_adapter
from tunesmith.model.merge import check_merge_parity, logits_of, merge_adapter
from tunesmith.model.quantize import (
    base_footprint_bytes,
    clear_quantization_marks,
    dequantize_4bit_layers,
    is_4bit_linear,
    keep_4bit_layout,
    nf4_config,
)


def nf4_bytes(n: int) -> int:
    """Storage of n weights in NF4 with double quantisation (bitsandbytes, blocksize 64): packed nibbles,
    one uint8 absmax per 64-block, one fp32 absmax per 256 of those, an fp32 offset, the 16-entry NF4 code
    and the 256-entry code of the absmax quantiser (fp32)."""
    blocks = n // 64
    return n // 2 + blocks + 4 * math.ceil(blocks / 256) + 4 + 16 * 4 + 256 * 4


def footprint_split(model) -> tuple[int, int]:
    """(weights in 4-bit layers, weights elsewhere) of a 4-bit model."""
    quantized = sum(math.prod(m.weight.quant_state.shape) for m in model.modules() if is_4bit_linear(m))
    total = sum(math.prod(m.weight.quant_state.shape) if is_4bit_linear(m) else 0 for m in model.modules())
    other = sum(p.numel() for p in model.parameters() if not hasattr(p, "quant_state"))
    assert quantized == total
    return quantized, other


def check_footprint(q_model, bf16_model) -> dict:
    layers = [m for m in q_model.modules() if is_4bit_linear(m)]
    n_quantized, n_other = footprint_split(q_model)
    expected = sum(nf4_bytes(math.prod(m.weight.quant_state.shape)) for m in layers) + 2 * n_other
    measured = base_footprint_bytes(q_model)
    assert measured == expected
    reference = base_footprint_bytes(bf16_model)
    assert reference == 2 * sum(p.numel() for p in bf16_model.parameters())
    assert reference == 2 * (n_quantized + n_other)
    return {"measured": measured, "bf16": reference, "ratio": measured / reference,
            "linear_ratio": (measured - 2 * n_other) / (2 * n_quantized), "other_share": n_other / (n_quantized + n_other)}


def test_tiny_base_footprint(tiny_dir):
    q = load_tiny(tiny_dir, quantized=True, dtype=torch.bfloat16)
    r = check_footprint(q, load_tiny(tiny_dir, dtype=torch.bfloat16))
    # The 4-bit layers cost ~4.13 bits a weight plus ~1 KiB of code books each (heavy on 2-8K-weight tiny
    # layers: 0.36x here, 0.26x on real ones); embeddings and norms stay bf16 and set a floor on the ratio.
    assert r["linear_ratio"] < 0.37
    assert r["ratio"] == pytest.approx(r["other_share"] + (1 - r["other_share"]) * r["linear_ratio"])
    before = base_footprint_bytes(q)
    apply_adapter(q, AdapterConfig(kind="qlora", r=4))
    assert base_footprint_bytes(q) == before  # adapters are not base; nothing was upcast


def test_qlora_upcasts_nothing_but_the_adapter(tiny_dir):
    model = apply_adapter(load_tiny(tiny_dir, quantized=True, dtype=torch.bfloat16),
                          AdapterConfig(kind="qlora", r=4, use_dora=True))
    dtypes = {}
    for name, p in model.named_parameters():
        kind = "adapter" if "lora_" in name else "4bit" if hasattr(p, "quant_state") else "other"
        dtypes.setdefault(kind, set()).add(p.dtype)
    assert dtypes == {"adapter": {torch.float32}, "4bit": {torch.uint8}, "other": {torch.bfloat16}}
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())


@pytest.mark.skipif(not __import__("bitsandbytes").functional.has_avx512bf16(),
                    reason="bitsandbytes repacks 4-bit weights only on CPUs with AVX512-BF16")
def test_cpu_repacking_is_prevented_and_undone(tiny_dir):
    from transformers import AutoModelForCausalLM

    ids = token_batch(seed=1)
    raw = AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=nf4_config(compute_dtype=torch.float32),
                                               dtype=torch.float32, device_map="cpu")
    before = snapshot(raw, "all")
    logits_of(raw, ids)  # an eval forward: bitsandbytes rewrites the weights in place
    assert changed(before), "expected bitsandbytes to repack weights on this CPU"
    assert keep_4bit_layout(raw) == 14
    assert all(live.shape == old.shape for live, old in before.values())

    kept = load_tiny(tiny_dir, quantized=True)  # keep_4bit_layout before any forward
    before = snapshot(kept, "all")
    logits_of(kept, ids)
    assert changed(before) == []


def test_qlora_gradients_match_a_dequantised_reference(tiny_dir, tmp_path):
    """The 4-bit backward pass gives the gradients of the same model with dequantised fp32 weights."""
    cfg = AdapterConfig(kind="qlora", r=4, use_dora=True)
    model = apply_adapter(load_tiny(tiny_dir, quantized=True), cfg)
    train_steps(model, cfg, steps=1)  # non-zero B, so gradients reach A and earlier layers
    saved = save_adapter(model, tmp_path / "a")
    reference_base = load_tiny(tiny_dir, quantized=True)
    dequantize_4bit_layers(reference_base, torch.float32)
    clear_quantization_marks(reference_base)
    reference = load_adapter(reference_base, saved, trainable=True)
    ids = token_batch(seed=7)
    grads = []
    for m in (model, reference):
        m.train()
        m(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 3 * 14
    for name, g in grads[0].items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(g, grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_qlora_merge_dequantises_instead_of_requantising(tiny_dir, tmp_path):
    cfg = AdapterConfig(kind="qlora", r=4)
    model = apply_adapter(load_tiny(tiny_dir, quantized=True), cfg)
    train_steps(model, cfg, steps=3, lr=1e-3)  # a small delta, as in real fine-tuning
    saved = save_adapter(model, tmp_path / "a")
    ids = token_batch(seed=2)
    reference = logits_of(model, ids)

    ours = check_merge_parity(reference, merge_adapter(load_adapter(load_tiny(tiny_dir, True), saved)), ids, 1e-4)
    naive_model = load_adapter(load_tiny(tiny_dir, True), saved).merge_and_unload()  # PEFT: back into 4-bit
    naive = (logits_of(naive_model, ids) - reference).abs().max().item()
    assert naive > 100 * max(ours, 1e-7)


def test_qlora_with_trained_lm_head(tiny_dir, tmp_path):
    cfg = AdapterConfig(kind="qlora", r=4, modules_to_save=["lm_head"])
    model = apply_adapter(load_tiny(tiny_dir, quantized=True), cfg)
    trainable = snapshot(model, "trainable")
    assert any(".modules_to_save." in n for n in trainable)
    train_steps(model, cfg, steps=2)
    assert changed(trainable) == list(trainable)
    ids = token_batch(seed=4)
    saved = save_adapter(model, tmp_path / "a")
    reloaded = load_adapter(load_tiny(tiny_dir, True), saved)
    assert torch.equal(logits_of(reloaded, ids), logits_of(model, ids))
    merged = merge_adapter(reloaded, dtype=torch.float32)
    check_merge_parity(logits_of(model, ids), merged, ids, 2e-5)
    assert load_tokenizer(tiny_dir).eos_token_id == 2


@pytest.mark.slow
def test_default_model_base_footprint():
    from transformers import AutoModelForCausalLM

    from tunesmith.model.default import default_model_dir

    path = default_model_dir()
    q = AutoModelForCausalLM.from_pretrained(path, quantization_config=nf4_config(), dtype=torch.bfloat16,
                                             device_map="cpu")
    keep_4bit_layout(q)
    r = check_footprint(q, AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16))
    assert r["linear_ratio"] < 0.27  # ~4.13 bits per weight in the 4-bit layers
    # SmolLM2-135M: the tied 49152×576 embedding (21% of weights) stays bf16 in bitsandbytes, so the whole
    # base cannot go below ~0.4× bf16; it measures 0.41.
    assert 0.40 < r["ratio"] < 0.42
    ids = torch.tensor([[1, 504, 3287, 314, 260, 3575, 282, 4649, 47]])
    assert torch.isfinite(logits_of(q, ids)).all()
