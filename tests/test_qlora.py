"""QLoRA: what the 4-bit base costs (measured, checked against the NF4 storage formula), that training
through it computes the right gradients, that nothing is upcast wastefully, and that merging dequantises
instead of re-quantising."""

from __future__ import annotations

import math

import pytest
import torch

from adapter_utils import changed, load_tiny, load_tokenizer, snapshot, token_batch, train_steps
from tunesmith.config import AdapterConfig
from tunesmith.errors import TunesmithError
from tunesmith.model.adapters import apply_adapter, load_adapter, save_adapter
from tunesmith.model.merge import check_merge_parity, logits_of, merge_adapter
from tunesmith.model.quantize import (
    base_footprint_bytes,
    clear_quantization_marks,
    dequantize_4bit_layers,
    has_4bit_layers,
    is_4bit_embedding,
    is_4bit_linear,
    keep_4bit_layout,
    nf4_config,
    quantize_embeddings_nf4,
)


def nf4_bytes(n: int, double_quant: bool = True) -> int:
    """Storage of n weights in NF4 (bitsandbytes, blocksize 64): packed nibbles and the 16-entry NF4 code
    (fp32), plus with double quantisation one uint8 absmax per 64-block, one fp32 absmax per 256 of those,
    an fp32 offset and the 256-entry code of the absmax quantiser (fp32); without it one fp32 absmax a block."""
    blocks = n // 64
    if not double_quant:
        return n // 2 + 4 * blocks + 16 * 4
    return n // 2 + blocks + 4 * math.ceil(blocks / 256) + 4 + 16 * 4 + 256 * 4


def four_bit_weights(model) -> list:
    """The distinct 4-bit weights (a tied embedding and head share one)."""
    unique = {}
    for m in model.modules():
        if is_4bit_linear(m) or is_4bit_embedding(m):
            unique.setdefault(id(m.weight), m.weight)
    return list(unique.values())


def check_footprint(q_model, bf16_model) -> dict:
    weights = four_bit_weights(q_model)
    n_quantized = sum(math.prod(w.quant_state.shape) for w in weights)
    n_other = sum(p.numel() for p in q_model.parameters() if not hasattr(p, "quant_state"))
    expected = sum(nf4_bytes(math.prod(w.quant_state.shape), w.quant_state.nested) for w in weights) + 2 * n_other
    measured = base_footprint_bytes(q_model)
    assert measured == expected
    reference = base_footprint_bytes(bf16_model)
    assert reference == 2 * sum(p.numel() for p in bf16_model.parameters())
    assert reference == 2 * (n_quantized + n_other)
    table = math.prod(bf16_model.get_input_embeddings().weight.shape)
    linear = n_quantized - (table if is_4bit_embedding(q_model.get_input_embeddings()) else 0)
    linear_bytes = sum(nf4_bytes(math.prod(w.quant_state.shape), w.quant_state.nested) for w in weights
                       if w is not q_model.get_input_embeddings().weight)
    return {"measured": measured, "bf16": reference, "ratio": measured / reference, "table": table,
            "linear_ratio": linear_bytes / (2 * linear), "other_share": n_other / (n_quantized + n_other)}


def assert_tied_4bit(model) -> None:
    """Embedding and head are 4-bit and hold one quantised storage: the same Params4bit, quant state,
    packed bytes and scales."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert is_4bit_embedding(emb) and is_4bit_linear(head)
    assert head.weight is emb.weight and head.weight.quant_state is emb.weight.quant_state
    assert head.weight.data_ptr() == emb.weight.data_ptr()
    assert head.weight.quant_state.absmax.data_ptr() == emb.weight.quant_state.absmax.data_ptr()


@pytest.mark.parametrize("double_quant", [True, False])
def test_tiny_base_footprint(tiny_dir, double_quant):
    bf16 = load_tiny(tiny_dir, dtype=torch.bfloat16)
    plain = load_tiny(tiny_dir, quantized=True, dtype=torch.bfloat16, double_quant=double_quant, embeddings=False)
    q = load_tiny(tiny_dir, quantized=True, dtype=torch.bfloat16, double_quant=double_quant)
    assert_tied_4bit(q)
    assert type(plain.get_input_embeddings()) is torch.nn.Embedding
    r_plain, r = check_footprint(plain, bf16), check_footprint(q, bf16)
    # The 4-bit layers cost ~4.13 bits a weight plus ~1 KiB of code books each (heavy on 2-8K-weight tiny
    # layers: 0.36x here, 0.26x on real ones); with bf16 embeddings and norms they set a floor on the ratio.
    assert r_plain["linear_ratio"] < (0.37 if double_quant else 0.39) and r["linear_ratio"] == r_plain["linear_ratio"]
    assert r_plain["ratio"] == pytest.approx(r_plain["other_share"] + (1 - r_plain["other_share"]) * r_plain["linear_ratio"])
    # the tied table is counted once, and costs what NF4 costs: the model shrinks by the bf16 table minus that
    assert r_plain["measured"] - r["measured"] == 2 * r["table"] - nf4_bytes(r["table"], double_quant)
    assert r["ratio"] < r_plain["ratio"] - 0.2  # the table is 30% of this tiny model's weights
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
    """With quantize_embeddings off the embedding and head stay bf16, so the head can be trained in full."""
    cfg = AdapterConfig(kind="qlora", r=4, modules_to_save=["lm_head"], quantize_embeddings=False)
    model = apply_adapter(load_tiny(tiny_dir, quantized=True, embeddings=False), cfg)
    trainable = snapshot(model, "trainable")
    assert any(".modules_to_save." in n for n in trainable)
    train_steps(model, cfg, steps=2)
    assert changed(trainable) == list(trainable)
    ids = token_batch(seed=4)
    saved = save_adapter(model, tmp_path / "a")
    reloaded = load_adapter(load_tiny(tiny_dir, True, embeddings=False), saved)
    assert torch.equal(logits_of(reloaded, ids), logits_of(model, ids))
    merged = merge_adapter(reloaded, dtype=torch.float32)
    check_merge_parity(logits_of(model, ids), merged, ids, 2e-5)
    assert load_tokenizer(tiny_dir).eos_token_id == 2


def test_4bit_embedding_cannot_be_trained_in_full_or_resized(tiny_dir):
    for entry in ("lm_head", "embed_tokens"):
        with pytest.raises(TunesmithError, match=f"'{entry}' is stored in 4-bit") as e:
            apply_adapter(load_tiny(tiny_dir, quantized=True), AdapterConfig(kind="qlora", modules_to_save=[entry]))
        assert "quantize_embeddings: false" in e.value.hint
    model = load_tiny(tiny_dir, quantized=True)
    with pytest.raises(TunesmithError, match="cannot be resized") as e:
        model.resize_token_embeddings(600)
    assert "quantize_embeddings: false" in e.value.hint
    dequantize_4bit_layers(model, torch.float32)
    assert model.resize_token_embeddings(600).weight.shape == (600, 64)  # a float model resizes again


def test_only_plain_embeddings_are_quantised(tiny_dir):
    class Scaled(torch.nn.Embedding):  # like Gemma 3's scaled embedding: more than a table lookup
        def forward(self, ids):
            return super().forward(ids) * 8.0

    model = load_tiny(tiny_dir, quantized=True, embeddings=False)
    old = model.get_input_embeddings()
    model.set_input_embeddings(Scaled(old.num_embeddings, old.embedding_dim))
    with pytest.raises(TunesmithError, match="Scaled") as e:
        quantize_embeddings_nf4(model)
    assert "quantize_embeddings: false" in e.value.hint


@pytest.mark.parametrize("double_quant", [True, False])
def test_embedding_lookup_dequantises_only_the_looked_up_rows(tiny_dir, double_quant, monkeypatch):
    import bitsandbytes.functional as bnbf

    from tunesmith.model.quantize import _dequantize

    model = load_tiny(tiny_dir, quantized=True, dtype=torch.bfloat16, double_quant=double_quant)
    emb = model.get_input_embeddings()
    # 506 rows of one 64-block each: with double quantisation the scales span two second-level blocks,
    # so rows past 256 check that each row gets its own block's second-level scale
    ids = torch.tensor([[5, 300, 505, 300], [0, 255, 256, 400]])
    shapes, real = [], bnbf.dequantize_4bit
    monkeypatch.setattr(bnbf, "dequantize_4bit", lambda A, quant_state=None, *a, **k: (
        shapes.append(tuple(quant_state.shape)), real(A, quant_state, *a, **k))[1])
    out = emb(ids)
    assert shapes == [(2, 4, 64)]  # 8 rows dequantised, not the 506-row table
    monkeypatch.setattr(bnbf, "dequantize_4bit", real)
    full = _dequantize(emb.weight, torch.float32)
    assert out.dtype == torch.bfloat16 and torch.equal(out, full[ids].to(torch.bfloat16))
    emb.compute_dtype = torch.float32
    assert torch.equal(emb(ids), full[ids])
    # and the lookup agrees with the tied 4-bit head: one storage, one set of weights
    head = model.get_output_embeddings()
    x = torch.eye(64)
    torch.testing.assert_close(head(x).float(), full.t().to(torch.bfloat16).float(), rtol=0, atol=0)


def test_4bit_embedding_costs_about_as_much_accuracy_as_the_4bit_linears(tiny_dir):
    """Logits of the fp32 model, the NF4 model with fp32 embedding/head, and the NF4 model with all of them
    4-bit. On this random tiny model NF4 moves logits a lot (RMS ~0.25 of a max ~4, measured); quantising the
    table adds an error no larger than the linear layers' own (measured ~0.6 of it)."""
    ids = token_batch(seed=11, batch=4, length=32)
    ref = logits_of(load_tiny(tiny_dir), ids)
    linear_only = logits_of(load_tiny(tiny_dir, quantized=True, embeddings=False), ids)
    both = logits_of(load_tiny(tiny_dir, quantized=True), ids)

    def rms(x):
        return x.pow(2).mean().sqrt().item()

    assert torch.isfinite(both).all()
    linear_error, extra = rms(linear_only - ref), rms(both - linear_only)
    assert 0.1 < linear_error < 0.4 and 0.2 * linear_error < extra < linear_error
    assert rms(both - ref) < 1.5 * linear_error


@pytest.mark.skipif(not __import__("bitsandbytes").functional.has_avx512bf16(),
                    reason="bitsandbytes repacks 4-bit weights only on CPUs with AVX512-BF16")
def test_repacking_the_4bit_head_is_prevented_and_undone(tmp_path):
    """The tied head's storage is the embedding's: a repacked head would scramble every lookup."""
    from tiny import build_model

    build_model(tmp_path / "m", vocab_size=512)  # bitsandbytes repacks only heads of a multiple of 32 rows
    ids = token_batch(seed=1)
    model = load_tiny(tmp_path / "m", quantized=True)
    assert model.lm_head.support_avx512bf16_for_cpu is False
    expected = logits_of(model, ids)
    model.lm_head.support_avx512bf16_for_cpu = True  # as bitsandbytes builds it
    with torch.no_grad():
        model.eval()
        model.lm_head(torch.randn(1, 64))  # an eval forward repacks the shared storage in place
    with pytest.raises(TunesmithError, match="repacked"):
        logits_of(model, ids)
    assert keep_4bit_layout(model) == 1 and model.lm_head.support_avx512bf16_for_cpu is False
    # the undo re-quantises the bf16-rounded scales: close to, not bit-identical with, the original (0.014 of ~4)
    torch.testing.assert_close(logits_of(model, ids), expected, rtol=0, atol=3e-2)


def test_qlora_bf16_gradients_through_the_4bit_head(tiny_dir, tmp_path):
    """bf16 compute (the CPU training default): every LoRA tensor gets a gradient, and it points where the
    dequantised fp32 model's gradient points."""
    cfg = AdapterConfig(kind="qlora", r=4)
    model = apply_adapter(load_tiny(tiny_dir, quantized=True, dtype=torch.bfloat16), cfg)
    train_steps(model, cfg, steps=1)
    reference_base = load_tiny(tiny_dir, quantized=True, dtype=torch.bfloat16)
    dequantize_4bit_layers(reference_base, torch.float32)
    clear_quantization_marks(reference_base)
    reference_base.float()
    reference = load_adapter(reference_base, save_adapter(model, tmp_path / "a"), trainable=True)
    ids = token_batch(seed=7)
    grads = []
    for m in (model, reference):
        m.train()
        m(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.float().flatten() for n, p in m.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 14
    for name, g in grads[0].items():
        assert torch.isfinite(g).all() and g.abs().max() > 0, name
        assert torch.nn.functional.cosine_similarity(g, grads[1][name], dim=0) > 0.99, name


def test_qlora_merge_reties_the_dequantised_embedding(tiny_dir, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from tunesmith.model.merge import write_merged

    cfg = AdapterConfig(kind="qlora", r=4)
    model = apply_adapter(load_tiny(tiny_dir, quantized=True), cfg)
    train_steps(model, cfg, steps=2)
    ids = token_batch(seed=6)
    trained = logits_of(model, ids)
    merged = merge_adapter(load_adapter(load_tiny(tiny_dir, True), save_adapter(model, tmp_path / "a")))
    assert type(merged.get_input_embeddings()) is torch.nn.Embedding
    assert type(merged.get_output_embeddings()) is torch.nn.Linear
    assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight
    check_merge_parity(trained, merged, ids, 2e-5)
    out = write_merged(merged, load_tokenizer(tiny_dir), tmp_path / "m", dtype="fp32")
    with safe_open(str(next(out.glob("*.safetensors"))), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys  # saved once, tied
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert (logits_of(reloaded, ids) - trained).abs().max() <= 2e-5


def test_untied_head_is_quantised_on_its_own(tmp_path):
    """A model with a separate output head: head and embedding each get their own NF4 weight, both are
    counted, and merging gives back an untied float model."""
    import transformers as tf

    from tunesmith.model.quantize import _dequantize, _quantize_nf4

    torch.manual_seed(0)
    tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                       initializer_range=0.1)).save_pretrained(tmp_path / "untied")
    bf16 = load_tiny(tmp_path / "untied", dtype=torch.bfloat16)
    model = load_tiny(tmp_path / "untied", quantized=True, dtype=torch.bfloat16)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert is_4bit_embedding(emb) and is_4bit_linear(head) and head.weight is not emb.weight
    assert head.weight.data_ptr() != emb.weight.data_ptr()
    own = _quantize_nf4(bf16.lm_head.weight.data, double_quant=True)  # the head quantised by itself
    assert torch.equal(_dequantize(head.weight, torch.float32), _dequantize(own, torch.float32))
    r = check_footprint(model, bf16)
    assert len(four_bit_weights(model)) == 16 and r["ratio"] < 0.35
    cfg = AdapterConfig(kind="qlora", r=4)
    peft_model = apply_adapter(load_tiny(tmp_path / "untied", quantized=True), cfg)  # fp32: exact merge check
    train_steps(peft_model, cfg, steps=2)
    ids = token_batch(seed=3)
    trained = logits_of(peft_model, ids)
    merged = merge_adapter(peft_model, dtype=torch.float32)
    assert merged.lm_head.weight is not merged.model.embed_tokens.weight
    check_merge_parity(trained, merged, ids, 2e-5)


def test_loader_quantises_embeddings_unless_told_not_to(tiny_dir):
    from tunesmith.model.load import load_model_and_tokenizer

    on, _ = load_model_and_tokenizer(str(tiny_dir), precision="fp32", dtype="fp32", quantize_nf4=True)
    assert_tied_4bit(on)
    assert on.get_input_embeddings().compute_dtype == torch.float32
    off, _ = load_model_and_tokenizer(str(tiny_dir), precision="fp32", dtype="fp32", quantize_nf4=True,
                                      quantize_embeddings=False)
    assert type(off.get_input_embeddings()) is torch.nn.Embedding and type(off.lm_head) is torch.nn.Linear
    plain, _ = load_model_and_tokenizer(str(tiny_dir), precision="fp32", quantize_embeddings=True)
    assert not has_4bit_layers(plain)  # only with quantize_nf4


def _banking77_loss(model, tokenizer, conversations) -> float:
    """Mean next-token loss over every token of the conversations, rendered with the chat template."""
    total = count = 0.0
    with torch.no_grad():
        for conv in conversations:
            ids = torch.tensor([tokenizer(tokenizer.apply_chat_template(conv, tokenize=False),
                                          add_special_tokens=False)["input_ids"]])
            logits = logits_of(model, ids)[0, :-1]
            total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    return total / count


@pytest.mark.slow
def test_default_model_base_footprint():
    import json
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from tunesmith.model.default import default_model_dir
    from tunesmith.model.load import load_model_and_tokenizer

    bf16 = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.bfloat16)
    linear_only, tok = load_model_and_tokenizer("default", precision="bf16", dtype="bf16", quantize_nf4=True,
                                                quantize_embeddings=False)
    r_off = check_footprint(linear_only, bf16)
    assert r_off["linear_ratio"] < 0.27  # ~4.13 bits per weight in the 4-bit layers
    # SmolLM2-135M: the tied 49152×576 embedding (21% of weights) left in bf16 keeps the base at 0.415×
    assert 0.40 < r_off["ratio"] < 0.42
    both, _ = load_model_and_tokenizer("default", precision="bf16", dtype="bf16", quantize_nf4=True)
    assert_tied_4bit(both)
    r_on = check_footprint(both, bf16)
    assert r_on["ratio"] < 0.35  # measured 0.259: the table in NF4 too, counted once
    assert r_off["measured"] - r_on["measured"] == 2 * r_on["table"] - nf4_bytes(r_on["table"])

    lines = Path(__file__).parents[1].joinpath("examples/banking77/test.jsonl").read_text().splitlines()
    conversations = [json.loads(line)["messages"] for line in lines[::300]]
    losses = [_banking77_loss(m, tok, conversations) for m in (bf16, linear_only, both)]
    # measured on these 11 conversations: 3.70 (bf16), 4.11 (NF4 linear), 4.33 (NF4 linear + table); on
    # 100 conversations 3.75 / 4.20 / 4.42 (docs/adapters.md)
    linear_cost, table_cost = losses[1] - losses[0], losses[2] - losses[1]
    assert 0.1 < linear_cost < 1.0 and 0 < table_cost < linear_cost


@pytest.mark.parametrize("quantize_embeddings", [None, False])
def test_qlora_run_records_the_choice_and_merges(tiny_dir, tmp_path, quantize_embeddings):
    """`tunesmith train` with kind qlora: the loader quantises the table unless told not to, run.json says
    which, and `merge_run` re-creates that very base (its parity check would fail otherwise)."""
    import json

    import tunesmith
    from tunesmith.model.merge import merge_run

    rows = [{"messages": [{"role": "user", "content": f"hello world {i}"},
                          {"role": "assistant", "content": ["card_arrival", "exchange_rate"][i % 2]}]} for i in range(4)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    adapter = {"kind": "qlora", "r": 4}
    if quantize_embeddings is not None:
        adapter["quantize_embeddings"] = quantize_embeddings
    run = tunesmith.train({"model": str(tiny_dir), "output_dir": str(tmp_path / "runs"), "precision": "fp32",
                           "device": "cpu", "adapter": adapter, "data": {"train": str(tmp_path / "train.jsonl")},
                           "train": {"lr": 1e-2, "max_steps": 2, "micro_batch_size": 4}}, progress=False)
    info = json.loads((run.path / "run.json").read_text())
    assert info["quantize_embeddings"] is (quantize_embeddings is None)
    _, report = merge_run(run.path, dtype="fp32")
    assert report["max_abs_diff"] <= 1e-4 and report["written_top1_agreement"] == 1.0
