"""Tiny local models and tokenizers for tests: no network, built in well under a second."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]

CORPUS = [
    "hello world how are you today",
    "the quick brown fox jumps over the lazy dog",
    "what is my card balance and when will the transfer arrive",
    "card_arrival card_linking exchange_rate top_up_failed refund_not_showing_up",
    "system user assistant tool you are a helpful assistant",
    "0123456789 {} [] : , . ? ! ' \" - _ / + = < > | \\ ( ) ; * & % $ # @",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "Human: Assistant: please tell me a joke. Sure, here is one.",
]


def build_tokenizer(out_dir: str | Path, chat_template: str | None = CHATML, vocab_size: int = 512,
                    pad_is_eos: bool = True, add_bos: bool = False):
    """A byte-level BPE tokenizer with ChatML specials, saved to out_dir and returned."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>" if add_bos else None, eos_token="<|im_end|>",
        unk_token="<unk>", pad_token="<|im_end|>" if pad_is_eos else "<|endoftext|>",
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def build_model(out_dir: str | Path | None = None, vocab_size: int = 512, hidden: int = 64, layers: int = 2,
                heads: int = 4, kv_heads: int = 2, seed: int = 0, tokenizer=None):
    """A 2-layer Llama-config model with random weights; saved (with tokenizer) when out_dir is given."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=2, pad_token_id=None,
        attn_implementation="sdpa", initializer_range=0.1,
    )
    model = LlamaForCausalLM(cfg)
    if out_dir is not None:
        out_dir = Path(out_dir)
        model.save_pretrained(out_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
    return model


def tiny_model_dir(root: str | Path) -> Path:
    """Build (once per root) a saved tiny model + tokenizer directory that tunesmith can load by path."""
    root = Path(root)
    marker = root / "tiny.json"
    if not marker.exists():
        tok = build_tokenizer(root)
        build_model(root, vocab_size=len(tok), tokenizer=tok)
        marker.write_text(json.dumps({"vocab": len(tok)}))
    return root
