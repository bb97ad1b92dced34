"""Models and a tokenizer for the GPU run, made on the spot: real architectures with random weights (speed and
memory do not need trained weights, and no weights can travel with the tree), built from the config dicts
below, plus a chat tokenizer: SmolLM2's own when `make gpu-wheels` copied it (gzipped) into .whl/tokenizer, else a
byte-level BPE trained in a second on the repository's example data.

Shapes follow the published configs (SmolLM2-135M-Instruct, Llama-3.2-1B, Llama-3.1-8B); RoPE uses the plain
rotary schedule (the scaling variant changes no FLOPs or memory)."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_TOKENIZER = ROOT / ".whl" / "tokenizer"

SHIPPED = ROOT / "src" / "tunesmith" / "plan" / "architectures"  # the configs `tunesmith plan` ships
KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "head_dim", "vocab_size", "max_position_embeddings", "tie_word_embeddings", "rope_theta")


def shipped(name: str) -> dict:
    """A shipped architecture's config.json, as the keys a LlamaConfig needs here."""
    raw = json.loads((SHIPPED / f"{name}.json").read_text())
    config = {k: raw[k] for k in KEYS if raw.get(k) is not None}
    config.setdefault("head_dim", raw["hidden_size"] // raw["num_attention_heads"])
    return config


CONFIGS: dict[str, dict] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=1024, max_position_embeddings=4096,
                 tie_word_embeddings=True, rope_theta=10000.0),
    "smollm2-135m": shipped("smollm2-135m"),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
                         tie_word_embeddings=True, rope_theta=500000.0),
    "llama-3.1-8b": shipped("llama-3.1-8b"),
}
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def llama_config(name: str, vocab_size: int | None = None):
    from transformers import LlamaConfig

    c = dict(CONFIGS[name])
    c["vocab_size"] = max(c["vocab_size"], vocab_size or 0)
    theta = c.pop("rope_theta")
    return LlamaConfig(**c, rms_norm_eps=1e-5, hidden_act="silu", attention_dropout=0.0, bos_token_id=1,
                       eos_token_id=2, pad_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": theta},
                       initializer_range=0.02)


def build(name: str, device: str = "cpu", dtype: torch.dtype = torch.bfloat16, seed: int = 0,
          vocab_size: int | None = None):
    """A LlamaForCausalLM of config `name` (its vocabulary at least `vocab_size`) with random weights,
    created directly on `device` in `dtype`."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(llama_config(name, vocab_size), dtype=dtype,
                                              attn_implementation="sdpa")
    return model.eval()


def example_texts(limit: int = 4000) -> list[str]:
    rows = [json.loads(line) for line in (ROOT / "examples/banking77/train.jsonl").read_text().splitlines()[:limit]]
    texts = [m["content"] for r in rows for m in r["messages"]]
    with gzip.open(ROOT / "examples/hh-rlhf/harmless-test.jsonl.gz", "rt") as f:
        texts += [json.loads(line)["chosen"] for line in list(f)[:limit]]
    return texts


def tokenizer_dir(out: Path, vocab_size: int = 8192, shipped: bool = True):
    """A folder holding the run's tokenizer (with its chat template): the shipped one if `shipped` and there
    is one, else a new one of `vocab_size`; returns the tokenizer."""
    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    if shipped and (SHIPPED_TOKENIZER / "tokenizer.json.gz").exists():
        for f in SHIPPED_TOKENIZER.iterdir():
            if f.suffix == ".gz":
                with gzip.open(f, "rb") as src, open(out / f.stem, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            else:
                shutil.copy(f, out / f.name)
        return AutoTokenizer.from_pretrained(out)
    return train_tokenizer(out, vocab_size)


def train_tokenizer(out: Path, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(example_texts(800 if vocab_size <= 1024 else 4000),
                            trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<unk>", pad_token="<|im_end|>")
    fast.chat_template = CHATML
    fast.save_pretrained(out)
    return fast


def save_model_dir(name: str, out: Path, tokenizer, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Save a random-weight model of config `name` with the tokenizer: a folder tunesmith and TRL load by path."""
    if (out / "config.json").exists():
        return out
    model = build(name, "cpu" if name in ("tiny", "smollm2-135m") else _device(), dtype, vocab_size=len(tokenizer))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def quantize_in_memory(model: torch.nn.Module, double_quant: bool = True,
                       compute_dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """QLoRA's base without a trip through disk: every linear layer but the head becomes a bitsandbytes NF4
    Linear4bit (what `from_pretrained` with tunesmith's nf4_config makes), then tunesmith stores the embedding
    and head in NF4 as its loader does."""
    import bitsandbytes as bnb

    from tunesmith.model.quantize import keep_4bit_layout, quantize_embeddings_nf4

    head = model.get_output_embeddings()
    for name, module in list(model.named_modules()):
        if type(module) is not torch.nn.Linear or module is head:
            continue
        q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=False, compute_dtype=compute_dtype,
                              compress_statistics=double_quant, quant_type="nf4", quant_storage=torch.uint8,
                              device="meta")
        q.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, blocksize=64,
                                     compress_statistics=double_quant, quant_type="nf4",
                                     quant_storage=torch.uint8).to(module.weight.device)
        model.set_submodule(name, q)
    model.is_loaded_in_4bit = True  # what PEFT reads to wrap Linear4bit layers with its 4-bit LoRA
    keep_4bit_layout(model)
    quantize_embeddings_nf4(model, double_quant, compute_dtype)
    return model
