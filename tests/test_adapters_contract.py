"""The adapter contract, one row per adapter kind: train → save → reload (PEFT and tunesmith) → merge →
write → reload with transformers, and the base never moves. Plus targets, optimiser groups, summaries,
config cross-checks and loading errors."""

from __future__ import annotations

import json

import pytest
import torch

from adapter_utils import changed, load_tiny, load_tokenizer, snapshot, token_batch, train_steps
from tunesmith.config import AdapterConfig, parse_config
from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.model.adapters import (
    apply_adapter,
    format_summary,
    load_adapter,
    optimizer_param_groups,
    resolve_targets,
    save_adapter,
    trainable_summary,
)
from tunesmith.model.merge import check_merge_parity, logits_of, merge_adapter, write_merged

HIDDEN, INTER, KV, LAYERS = 64, 128, 32, 2  # tests/tiny.py: 4 heads of 16, 2 kv heads

CONTRACT = {
    "lora": AdapterConfig(kind="lora", r=4, alpha=8),
    "rslora": AdapterConfig(kind="rslora", r=4, alpha=8),
    "dora": AdapterConfig(kind="dora", r=4, alpha=8),
    "qlora": AdapterConfig(kind="qlora", r=4, alpha=8),
    "qlora+dora": AdapterConfig(kind="qlora", r=4, alpha=8, use_dora=True),
    "qlora-bf16-embeddings": AdapterConfig(kind="qlora", r=4, alpha=8, quantize_embeddings=False),
    "full": AdapterConfig(kind="full"),
}


@pytest.mark.parametrize("name", list(CONTRACT))
def test_adapter_contract(name, tiny_dir, tmp_path):
    cfg = CONTRACT[name]
    quantized = cfg.kind == "qlora"
    ids = token_batch(seed=99)
    model = load_tiny(tiny_dir, quantized, embeddings=cfg.embeddings_in_4bit)
    if quantized:  # the tied embedding/head: one 4-bit table, or the bf16 (here fp32) one bitsandbytes leaves
        assert type(model.get_input_embeddings()).__name__ == ("NF4Embedding" if cfg.embeddings_in_4bit
                                                               else "Embedding")
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    base_logits = logits_of(model, ids)
    base = snapshot(model, "all")

    model = apply_adapter(model, cfg)
    trainable = snapshot(model, "trainable")
    assert trainable
    losses = train_steps(model, cfg, steps=3)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert changed(trainable) == list(trainable), "every trainable tensor must change in 3 steps"
    if cfg.kind == "full":
        assert changed(base) == list(base)
    else:
        assert changed(base) == [], "adapter training must leave the base weights bit-identical"
        assert all(p.abs().max() > 0 for n, p in model.named_parameters() if ".lora_B." in n)
    trained = logits_of(model, ids)
    assert (trained - base_logits).abs().max() > 1e-3, "training must change the model's outputs"

    out = save_adapter(model, tmp_path / "adapter")
    if cfg.kind == "full":
        assert (out / "config.json").exists() and list(out.glob("model*.safetensors"))
        merged = model
    else:
        assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json",
                                                         "adapter_model.safetensors"]
        from peft import PeftModel

        plain = PeftModel.from_pretrained(load_tiny(tiny_dir, quantized, embeddings=cfg.embeddings_in_4bit), str(out))
        assert torch.equal(logits_of(plain, ids), trained)
        ours = load_adapter(load_tiny(tiny_dir, quantized, embeddings=cfg.embeddings_in_4bit), out)
        assert torch.equal(logits_of(ours, ids), trained)
        assert not any(p.requires_grad for p in ours.parameters())
        merged = merge_adapter(ours, dtype=torch.float32)
        assert type(merged).__name__ == "LlamaForCausalLM"
        diff = check_merge_parity(trained, merged, ids, tol=2e-5)
        assert diff <= 2e-5

    written = write_merged(merged, load_tokenizer(tiny_dir), tmp_path / "merged", dtype="fp32")
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(written, dtype=torch.float32)
    assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight  # still tied
    assert torch.equal(logits_of(reloaded, ids), logits_of(merged, ids))
    assert (logits_of(reloaded, ids) - trained).abs().max() <= 2e-5


# ---------------------------------------------------------------- targets

def _tiny_arch(kind: str):
    import transformers as tf

    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  pad_token_id=0, bos_token_id=0, eos_token_id=0)
    cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
           "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM), "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM),
           "phi": (tf.PhiConfig, tf.PhiForCausalLM), "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM)}[kind]
    extra = {"head_dim": 8} if kind == "gemma" else {}
    return cls[1](cls[0](**common, **extra))


ATTENTION = {"q_proj", "k_proj", "v_proj", "o_proj"}
MLP = {"gate_proj", "up_proj", "down_proj"}
EXPECTED = {
    "llama": (ATTENTION, MLP), "mistral": (ATTENTION, MLP), "qwen2": (ATTENTION, MLP), "gemma": (ATTENTION, MLP),
    "phi": ({"q_proj", "k_proj", "v_proj", "dense"}, {"fc1", "fc2"}),
    "phi3": ({"qkv_proj", "o_proj"}, {"gate_up_proj", "down_proj"}),
}


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_target_presets_per_architecture(arch):
    model = _tiny_arch(arch)
    attention, mlp = EXPECTED[arch]
    leaves = {p: [n.split(".")[-1] for n in resolve_targets(model, p)] for p in ("attention", "mlp", "all-linear")}
    assert set(leaves["attention"]) == attention
    assert set(leaves["mlp"]) == mlp
    assert sorted(leaves["all-linear"]) == sorted(attention | mlp)  # one layer: each name once, no lm_head


def test_all_linear_excludes_untied_head_and_explicit_names_resolve(tiny_dir):
    import transformers as tf

    untied = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=4,
                                                tie_word_embeddings=False))
    names = resolve_targets(untied, "all-linear")
    assert len(names) == 14 and not any("lm_head" in n for n in names)
    picked = resolve_targets(untied, ["q_proj", "model.layers.1.mlp.down_proj"])
    assert picked == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
                      "model.layers.1.mlp.down_proj"]
    with pytest.raises(TunesmithError, match="adapter.target") as e:
        resolve_targets(untied, ["q_proj", "qkv"])
    assert "qkv" in str(e.value) and "down_proj" in e.value.hint
    with pytest.raises(TunesmithError, match="unknown preset"):
        resolve_targets(untied, "attn-only")


def test_explicit_target_trains_only_those_layers(tiny_dir):
    model = apply_adapter(load_tiny(tiny_dir), AdapterConfig(r=2, target=["v_proj"]))
    wrapped = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert wrapped == {f"base_model.model.model.layers.{i}.self_attn.v_proj" for i in range(LAYERS)}


@pytest.mark.parametrize("kind", ["lora", "qlora", "full"])
def test_gradient_checkpointing_gives_the_same_gradients(kind, tiny_dir):
    from tunesmith.model.adapters import enable_gradient_checkpointing

    ids = token_batch(seed=8)
    grads = []
    for checkpointing in (False, True):
        cfg = AdapterConfig(kind=kind, r=4) if kind != "full" else AdapterConfig(kind="full")
        torch.manual_seed(0)  # the same adapter weights in both models; B non-zero so A gets gradients
        model = apply_adapter(load_tiny(tiny_dir, quantized=kind == "qlora"), cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora_B." in name:
                    p.normal_(0, 0.05)
        if checkpointing:
            enable_gradient_checkpointing(model)
            assert sum(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()) >= 1
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert grads[1][name] is not None and g.abs().max() > 0, name
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7, msg=name)


# ---------------------------------------------------------------- optimiser groups and summary

def test_optimizer_groups_lora_plus_and_no_decay(tiny_dir):
    cfg = AdapterConfig(kind="dora", r=4, lora_plus_ratio=16)
    model = apply_adapter(load_tiny(tiny_dir), cfg)
    groups = {g["name"]: g for g in optimizer_param_groups(model, cfg, lr=1e-3, weight_decay=0.1)}
    names = {id(p): n for n, p in model.named_parameters()}
    in_group = {k: {names[id(p)] for p in g["params"]} for k, g in groups.items()}
    assert groups["lora_B"]["lr"] == pytest.approx(16e-3) and groups["lora_B"]["weight_decay"] == 0.1
    assert all(".lora_B." in n for n in in_group["lora_B"]) and len(in_group["lora_B"]) == 7 * LAYERS
    assert all("lora_magnitude_vector" in n for n in in_group["no_decay"]) and len(in_group["no_decay"]) == 14
    assert groups["decay"]["lr"] == 1e-3 and all(".lora_A." in n for n in in_group["decay"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(trainable) == sorted(n for g in in_group.values() for n in g)  # each exactly once

    torch.optim.AdamW(optimizer_param_groups(model, cfg, lr=1e-3, weight_decay=0.1))  # accepted by torch


def test_optimizer_groups_full_keeps_norms_out_of_decay(tiny_dir):
    cfg = AdapterConfig(kind="full", lora_plus_ratio=None)
    model = apply_adapter(load_tiny(tiny_dir), cfg)
    groups = {g["name"]: g for g in optimizer_param_groups(model, cfg, lr=1e-3, weight_decay=0.1)}
    assert set(groups) == {"decay", "no_decay"}
    assert len(groups["no_decay"]["params"]) == 2 * LAYERS + 1  # two norms per layer + final norm
    assert all(p.ndim == 1 for p in groups["no_decay"]["params"])
    assert sum(p.numel() for g in groups.values() for p in g["params"]) == sum(
        p.numel() for p in model.parameters())


def test_trainable_summary_matches_hand_count(tiny_dir):
    r = 4
    vocab = json.loads((tiny_dir / "tiny.json").read_text())["vocab"]
    # (in, out) of q, k, v, o, gate, up, down
    shapes = [(HIDDEN, HIDDEN), (HIDDEN, KV), (HIDDEN, KV), (HIDDEN, HIDDEN), (HIDDEN, INTER), (HIDDEN, INTER),
              (INTER, HIDDEN)]
    lora_a = LAYERS * sum(r * i for i, _ in shapes)
    lora_b = LAYERS * sum(r * o for _, o in shapes)
    base = vocab * HIDDEN + LAYERS * (sum(i * o for i, o in shapes) + 2 * HIDDEN) + HIDDEN
    for quantized, kind in ((False, "lora"), (True, "qlora")):
        model = apply_adapter(load_tiny(tiny_dir, quantized), AdapterConfig(kind=kind, r=r))
        s = trainable_summary(model)
        assert s["by_kind"] == {"lora_A": lora_a, "lora_B": lora_b}
        assert s["trainable"] == lora_a + lora_b and s["total"] == base + lora_a + lora_b
        assert s["percent"] == pytest.approx(100 * (lora_a + lora_b) / (base + lora_a + lora_b))
    text = format_summary(s)
    assert f"{lora_a + lora_b:,} of {base + lora_a + lora_b:,}" in text and f"lora_B {lora_b:,}" in text


# ---------------------------------------------------------------- PiSSA / OLoRA and continuing

@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_olora_adapters_are_saved_for_the_original_base(init, tiny_dir, tmp_path):
    cfg = AdapterConfig(kind="lora", r=4, init=init)
    model = apply_adapter(load_tiny(tiny_dir), cfg)
    train_steps(model, cfg, steps=3, lr=1e-3)
    ids = token_batch(seed=5)
    trained = logits_of(model, ids)
    out = save_adapter(model, tmp_path / "a")
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["init_lora_weights"] is True  # converted to rank-2r plain LoRA
    reloaded = load_adapter(load_tiny(tiny_dir), out)  # a fresh, unmodified base
    assert (logits_of(reloaded, ids) - trained).abs().max() < 1e-4


def test_from_adapter_continues_training(tiny_dir, tmp_path):
    cfg = AdapterConfig(kind="rslora", r=4)
    first = apply_adapter(load_tiny(tiny_dir), cfg)
    train_steps(first, cfg, steps=2)
    ids = token_batch(seed=3)
    saved = save_adapter(first, tmp_path / "sft")
    cont_cfg = AdapterConfig(kind="rslora", r=4, from_adapter=str(saved))
    second = apply_adapter(load_tiny(tiny_dir), cont_cfg)
    assert torch.equal(logits_of(second, ids), logits_of(first, ids))
    before = snapshot(second, "trainable")
    assert len(before) == 2 * 7 * LAYERS
    train_steps(second, cont_cfg, steps=2, seed=1)
    assert changed(before) == list(before)


# ---------------------------------------------------------------- errors

def test_load_adapter_errors(tiny_dir, tmp_path):
    with pytest.raises(TunesmithError, match="not found"):
        load_adapter(load_tiny(tiny_dir), tmp_path / "missing")
    bin_only = tmp_path / "bin"
    bin_only.mkdir()
    (bin_only / "adapter_config.json").write_text("{}")
    (bin_only / "adapter_model.bin").write_bytes(b"\x80")
    with pytest.raises(TunesmithError, match="adapter_model.safetensors") as e:
        load_adapter(load_tiny(tiny_dir), bin_only)
    assert "pickle" in e.value.hint
    with pytest.raises(TunesmithError, match="full model checkpoint"):
        load_adapter(load_tiny(tiny_dir), tiny_dir)

    import transformers as tf

    cfg = AdapterConfig(r=2)
    narrow = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    save_adapter(apply_adapter(narrow, cfg), tmp_path / "narrow")
    with pytest.raises(TunesmithError, match="does not fit this base model"):
        load_adapter(load_tiny(tiny_dir), tmp_path / "narrow")


def test_apply_adapter_rejects_mismatched_bases(tiny_dir):
    with pytest.raises(TunesmithError, match="needs a base loaded in 4-bit"):
        apply_adapter(load_tiny(tiny_dir), AdapterConfig(kind="qlora"))
    with pytest.raises(TunesmithError, match="adapter.kind is lora"):
        apply_adapter(load_tiny(tiny_dir, quantized=True), AdapterConfig(kind="lora"))
    with pytest.raises(TunesmithError, match="full cannot train a 4-bit base"):
        apply_adapter(load_tiny(tiny_dir, quantized=True), AdapterConfig(kind="full"))
    with pytest.raises(TunesmithError, match="'o_proj' is quantised"):
        apply_adapter(load_tiny(tiny_dir, quantized=True), AdapterConfig(kind="qlora", modules_to_save=["o_proj"]))
    with pytest.raises(TunesmithError, match="no module named 'head'"):
        apply_adapter(load_tiny(tiny_dir), AdapterConfig(kind="lora", modules_to_save=["head"]))


BAD_COMBINATIONS = [
    ({"kind": "full", "use_dora": True}, "adapter.use_dora"),
    ({"kind": "full", "use_rslora": True}, "adapter.use_rslora"),
    ({"kind": "full", "modules_to_save": ["lm_head"]}, "adapter.modules_to_save"),
    ({"kind": "full", "dropout": 0.1}, "adapter.dropout"),
    ({"kind": "full", "target": "attention"}, "adapter.target"),
    ({"kind": "full", "from_adapter": "runs/sft/adapter"}, "adapter.from_adapter"),
    ({"kind": "full", "lora_plus_ratio": 16}, "adapter.lora_plus_ratio"),
    ({"kind": "full", "init": "pissa"}, "adapter.init"),
    ({"kind": "qlora", "init": "olora"}, "adapter.init"),
    ({"kind": "lora", "init": "pissa", "from_adapter": "runs/sft/adapter"}, "adapter.init"),
    ({"kind": "dora", "init": "pissa"}, "adapter.init"),
    ({"kind": "qlora", "use_dora": True, "init": "olora"}, "adapter.init"),
    ({"kind": "qlora", "modules_to_save": ["lm_head", "model.layers.0.mlp.down_proj"]}, "adapter.modules_to_save"),
    ({"kind": "qlora", "modules_to_save": ["lm_head"]}, "adapter.modules_to_save"),  # 4-bit by default
    ({"kind": "qlora", "modules_to_save": ["model.embed_tokens"], "quantize_embeddings": True},
     "adapter.modules_to_save"),
    ({"kind": "lora", "quantize_embeddings": True}, "adapter.quantize_embeddings"),
    ({"kind": "full", "quantize_embeddings": False}, "adapter.quantize_embeddings"),
]


@pytest.mark.parametrize("adapter,key", BAD_COMBINATIONS)
def test_config_rejects_incompatible_adapter_settings(adapter, key):
    with pytest.raises(ConfigError) as e:
        parse_config({"data": {"train": "train.jsonl"}, "adapter": adapter})
    assert key in [p.where for p in e.value.problems]


@pytest.mark.parametrize("adapter", [{"kind": "qlora", "use_dora": True}, {"kind": "qlora", "use_rslora": True},
                                     {"kind": "qlora", "modules_to_save": ["lm_head"], "quantize_embeddings": False},
                                     {"kind": "qlora", "quantize_embeddings": False}, {"kind": "full"},
                                     {"kind": "lora", "init": "olora", "lora_plus_ratio": 16}])
def test_config_accepts_supported_combinations(adapter):
    cfg = parse_config({"data": {"train": "train.jsonl"}, "adapter": adapter})
    assert cfg.adapter.kind == adapter["kind"]
    assert cfg.adapter.embeddings_in_4bit == (adapter["kind"] == "qlora" and "quantize_embeddings" not in adapter)


def test_quantize_embeddings_errors_name_the_key_and_the_fix():
    with pytest.raises(ConfigError) as e:
        parse_config({"data": {"train": "t.jsonl"}, "adapter": {"kind": "qlora", "modules_to_save": ["lm_head"]}})
    (problem,) = e.value.problems
    assert "'lm_head' is stored in 4-bit" in problem.what and "quantize_embeddings: false" in problem.hint
    with pytest.raises(ConfigError) as e:
        parse_config({"data": {"train": "t.jsonl"}, "adapter": {"kind": "dora", "quantize_embeddings": False}})
    (problem,) = e.value.problems
    assert problem.where == "adapter.quantize_embeddings" and "qlora only" in problem.what


def test_quantize_embeddings_survives_the_written_config():
    """run folders keep config.yaml; reading it back must give the same choice (unset stays unset = on)."""
    import yaml

    from tunesmith.config import dump_config

    for adapter in ({"kind": "qlora"}, {"kind": "qlora", "quantize_embeddings": False}, {"kind": "lora"}):
        cfg = parse_config({"data": {"train": "t.jsonl"}, "adapter": adapter})
        again = parse_config(yaml.safe_load(dump_config(cfg)))
        assert again.adapter.embeddings_in_4bit == cfg.adapter.embeddings_in_4bit
