"""The tokenizer half of a GGUF file: vocabulary, token types, merges, special ids and chat template.

llama.cpp stores a byte-level BPE tokenizer as `tokenizer.ggml.model = "gpt2"` plus a pre-tokenizer
name (`tokenizer.ggml.pre`) that selects the regex it splits text with before BPE. We name the
pre-tokenizer from the structure of `tokenizer.json`'s `pre_tokenizer` (the regex it actually uses),
not from a hash of a probe string, so a renamed or locally retrained tokenizer is still recognised.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import gguf

from tunesmith.errors import TunesmithError

logger = logging.getLogger(__name__)

# The split regexes of well-known byte-level BPE tokenizers, keyed by llama.cpp's pre-tokenizer name.
# Each is the regex that tokenizer's own tokenizer.json applies (public tokenizer configs).
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLIT_REGEX_PRE_NAMES = {_LLAMA3_REGEX: "llama-bpe", _QWEN2_REGEX: "qwen2"}

# Added tokens that llama.cpp treats as control tokens even when tokenizer.json does not mark them special.
_LOOKS_SPECIAL = ("<pad>", "<mask>")


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TunesmithError(f"{path} is missing",
                             hint="export needs a standalone checkpoint folder with its tokenizer files") from None
    except json.JSONDecodeError as err:
        raise TunesmithError(f"{path} is not valid JSON: {err}") from None


def _pieces(pre: dict[str, Any] | None) -> list[dict[str, Any]]:
    if pre is None:
        return []
    if pre.get("type") == "Sequence":
        return [p for sub in pre.get("pretokenizers", []) for p in _pieces(sub)]
    return [pre]


def pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's `tokenizer.ggml.pre` name for this tokenizer's pre-tokenization, or "default"."""
    pieces = _pieces(tokenizer_json.get("pre_tokenizer"))
    kinds = [p.get("type") for p in pieces]
    splits = [p for p in pieces if p.get("type") == "Split"]
    if len(splits) == 1 and kinds[-1] == "ByteLevel" and not pieces[-1].get("use_regex", True):
        regex = splits[0].get("pattern", {}).get("Regex")
        if regex in SPLIT_REGEX_PRE_NAMES:
            return SPLIT_REGEX_PRE_NAMES[regex]
    if kinds == ["ByteLevel"] and pieces[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and pieces[0].get("individual_digits") and pieces[1].get("use_regex", True):
        return "smollm"  # single digits, then the GPT-2 regex (SmolLM, StarCoder-style)
    logger.warning("unrecognised pre-tokenizer %s: writing tokenizer.ggml.pre = 'default'; llama.cpp may split "
                   "text differently from transformers (check tokenization before serving)", kinds)
    return "default"


def _token_table(tokenizer_json: dict[str, Any], vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and llama.cpp token types (normal/control/user-defined/unused) for ids 0..vocab_size-1."""
    by_id: dict[int, str] = {i: t for t, i in tokenizer_json["model"]["vocab"].items()}
    added = {a["id"]: a for a in tokenizer_json.get("added_tokens", [])}
    by_id.update({i: a["content"] for i, a in added.items()})
    too_big = [i for i in by_id if i >= vocab_size]
    if too_big:
        raise TunesmithError(
            f"the tokenizer has token id {max(too_big)} but config.json says vocab_size = {vocab_size}",
            hint="resize the model's embeddings to the tokenizer (model.resize_token_embeddings) before export")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            text = by_id[i]
            looks_special = text in _LOOKS_SPECIAL or (text.startswith("<|") and text.endswith("|>"))
            tokens.append(text)
            types.append(gguf.TokenType.CONTROL if added[i].get("special") or looks_special
                         else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _adds_bos_eos(hf_dir: Path, special_ids: dict[str, int]) -> tuple[bool, bool]:
    """Whether encoding plain text puts BOS first / EOS last, measured with the tokenizer itself."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    with_specials = tok.encode("hello", add_special_tokens=True).ids
    plain = tok.encode("hello", add_special_tokens=False).ids
    adds_bos = len(with_specials) > len(plain) and with_specials[0] == special_ids.get("bos")
    adds_eos = len(with_specials) > len(plain) and with_specials[-1] == special_ids.get("eos")
    return adds_bos, adds_eos


def add_tokenizer(writer: gguf.GGUFWriter, hf_dir: Path, vocab_size: int) -> None:
    """Write the tokenizer of `hf_dir` (a byte-level BPE tokenizer.json) into `writer`."""
    tokenizer_json = read_json(hf_dir / "tokenizer.json")
    model = tokenizer_json.get("model", {})
    byte_level = any(p.get("type") == "ByteLevel" for p in _pieces(tokenizer_json.get("pre_tokenizer")))
    if model.get("type") != "BPE" or model.get("byte_fallback") or not byte_level:
        kind = ("BPE with byte fallback (SentencePiece style)" if model.get("byte_fallback")
                else f"{model.get('type')} without a ByteLevel pre-tokenizer")
        raise TunesmithError(
            f"{hf_dir / 'tokenizer.json'}: only byte-level BPE tokenizers (GPT-2 style, as in Llama 3, Qwen2, "
            f"SmolLM) can be exported; this one is {kind}",
            hint="convert this model with llama.cpp's convert_hf_to_gguf.py instead")
    tokens, types = _token_table(tokenizer_json, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer_json))
    writer.add_token_list(tokens)
    writer.add_token_types(types)

    special = gguf.SpecialVocab(hf_dir, load_merges=True, n_vocab=vocab_size)
    if special.chat_template is None:
        logger.warning("%s has no chat template; the GGUF will have none and chat servers will guess one", hf_dir)
    adds_bos, adds_eos = _adds_bos_eos(hf_dir, special.special_token_ids)
    special.add_special_token = {"bos": adds_bos, "eos": adds_eos}
    special.add_to_gguf(writer, quiet=True)
