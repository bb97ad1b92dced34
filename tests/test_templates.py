"""Golden label masks across chat-template families.

Each family's chat template is a fixture file written to behave like the public one (tests/fixtures/templates),
paired with a tiny local byte-level BPE tokenizer carrying that family's special tokens and BOS/EOS/pad settings.
For every family: the full rendering is checked against a hand-written string, exactly one BOS starts a row,
and the trained ids are exactly each assistant reply plus the family's end-of-turn token, nothing after it.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import tunesmith
from tunesmith.data.batching import collate
from tunesmith.data.render import DEFAULT_TEMPLATE, IGNORE, Renderer, end_of_turn_ids
from tunesmith.data.types import Conversation, Message, Preference
from tunesmith.errors import TunesmithError

TEMPLATES = Path(__file__).parent / "fixtures" / "templates"

# Llama-3 / Qwen2 pre-tokenizer split: a run of newlines is one piece whatever follows it, which is what makes
# "prompt ending in \n\n" a token prefix of "prompt\n\nanswer".
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
         r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CORPUS = ["hello world how are you today", "hi there fine thanks", "the quick brown fox jumps over the lazy dog",
          "system user assistant model you are a helpful assistant", "abcdefghijklmnopqrstuvwxyz 0123456789"]


@dataclass(frozen=True)
class Family:
    name: str
    specials: tuple[str, ...]
    bos: str | None
    eos: str
    pad: str | None
    end_of_turn: str
    add_bos: bool  # the tokenizer itself adds BOS (add_special_tokens=True)
    golden: str  # decoded input ids of TWO_TURNS
    prompt: str  # decoded ids of the generation prompt for [user "hi there"]
    answer_prefix: str = ""  # what the template prints between the generation prompt and the reply
    dedicated_bos: bool = False  # BOS appears exactly once at the start of every row


CHATML_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
QWEN_SYSTEM = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
CHATML_TURNS = ("<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
                "<|im_start|>user\nhow are you<|im_end|>\n<|im_start|>assistant\nfine thanks<|im_end|>\n")
CHATML_PROMPT = "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n"
LLAMA_HEAD = "<|start_header_id|>{}<|end_header_id|>\n\n"

FAMILIES = {
    "chatml_smollm2": Family(
        "chatml_smollm2", CHATML_SPECIALS, "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|im_end|>", False,
        SMOL_SYSTEM + CHATML_TURNS, SMOL_SYSTEM + CHATML_PROMPT),
    "qwen2_5": Family(
        "qwen2_5", CHATML_SPECIALS, None, "<|im_end|>", "<|endoftext|>", "<|im_end|>", False,
        QWEN_SYSTEM + CHATML_TURNS, QWEN_SYSTEM + CHATML_PROMPT),
    "llama3": Family(
        "llama3", ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        "<|begin_of_text|>", "<|end_of_text|>", "<|end_of_text|>", "<|eot_id|>", True,
        "<|begin_of_text|>" + LLAMA_HEAD.format("user") + "hi there<|eot_id|>" + LLAMA_HEAD.format("assistant")
        + "hello<|eot_id|>" + LLAMA_HEAD.format("user") + "how are you<|eot_id|>" + LLAMA_HEAD.format("assistant")
        + "fine thanks<|eot_id|>",
        "<|begin_of_text|>" + LLAMA_HEAD.format("user") + "hi there<|eot_id|>" + LLAMA_HEAD.format("assistant"),
        dedicated_bos=True),
    "mistral": Family(
        "mistral", ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"), "<s>", "</s>", None, "</s>", True,
        "<s>[INST] hi there [/INST] hello</s>[INST] how are you [/INST] fine thanks</s>",
        "<s>[INST] hi there [/INST]", answer_prefix=" ", dedicated_bos=True),
    "gemma": Family(
        "gemma", ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"), "<bos>", "<eos>", "<pad>",
        "<end_of_turn>", True,
        "<bos><start_of_turn>user\nhi there<end_of_turn>\n<start_of_turn>model\nhello<end_of_turn>\n"
        "<start_of_turn>user\nhow are you<end_of_turn>\n<start_of_turn>model\nfine thanks<end_of_turn>\n",
        "<bos><start_of_turn>user\nhi there<end_of_turn>\n<start_of_turn>model\n", dedicated_bos=True),
    "phi3": Family(
        "phi3", ("<unk>", "<s>", "</s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        "<s>", "<|endoftext|>", "<|endoftext|>", "<|end|>", True,
        "<s><|user|>\nhi there<|end|>\n<|assistant|>\nhello<|end|>\n<|user|>\nhow are you<|end|>\n"
        "<|assistant|>\nfine thanks<|end|>\n<|endoftext|>",
        "<s><|user|>\nhi there<|end|>\n<|assistant|>\n", dedicated_bos=True),
}

TWO_TURNS = (("user", "hi there"), ("assistant", "hello"), ("user", "how are you"), ("assistant", "fine thanks"))


def build_tokenizer(out_dir: Path, specials: tuple[str, ...], bos: str | None, eos: str | None, pad: str | None,
                    add_bos: bool, template: str | None):
    """A tiny byte-level BPE with the given specials, saved to out_dir and loaded back with AutoTokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    if add_bos:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, bos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad)
    if template is not None:
        fast.chat_template = template
    fast.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("templates")
    out = {}
    for name, f in FAMILIES.items():
        template = (TEMPLATES / f"{name}.jinja").read_text()
        out[name] = build_tokenizer(root / name, f.specials, f.bos, f.eos, f.pad, f.add_bos, template)
    strip = (TEMPLATES / "reasoning_strip.jinja").read_text()
    out["reasoning_strip"] = build_tokenizer(root / "reasoning_strip", CHATML_SPECIALS, None, "<|im_end|>",
                                             "<|endoftext|>", False, strip)
    return out


def conv(*pairs) -> Conversation:
    return Conversation(tuple(Message(r, c) for r, c in pairs))


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def trained_runs(item) -> list[list[int]]:
    """The trained ids as maximal runs of consecutive trained positions."""
    runs: list[list[int]] = []
    previous = IGNORE
    for label in item.labels:
        if label != IGNORE:
            if previous == IGNORE:
                runs.append([])
            runs[-1].append(label)
        previous = label
    return runs


def reply(tok, family: Family, content: str) -> list[int]:
    return ids(tok, family.answer_prefix + content) + [tok.convert_tokens_to_ids(family.end_of_turn)]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_rendering_and_trained_tokens_are_golden(tokenizers, name):
    tok, family = tokenizers[name], FAMILIES[name]
    item = Renderer(tok).sft(conv(*TWO_TURNS))
    assert tok.decode(item.input_ids) == family.golden
    assert trained_runs(item) == [reply(tok, family, "hello"), reply(tok, family, "fine thanks")]
    eot = tok.convert_tokens_to_ids(family.end_of_turn)
    last = max(i for i, x in enumerate(item.labels) if x != IGNORE)
    assert item.input_ids[last] == eot and all(x == IGNORE for x in item.labels[last + 1:])
    # the trained span starts right after what generation is prompted with
    prompt = Renderer(tok).prompt_ids([{"role": "user", "content": "hi there"}])
    assert tok.decode(prompt) == family.prompt
    first = next(i for i, x in enumerate(item.labels) if x != IGNORE)
    assert list(item.input_ids[:first]) == prompt
    if family.dedicated_bos:
        for row in (item.input_ids, prompt):
            assert row[0] == tok.bos_token_id and list(row).count(tok.bos_token_id) == 1


@pytest.mark.parametrize("name", list(FAMILIES))
def test_last_assistant_trains_only_the_final_reply(tokenizers, name):
    tok, family = tokenizers[name], FAMILIES[name]
    item = Renderer(tok, train_on="last_assistant").sft(conv(*TWO_TURNS))
    assert trained_runs(item) == [reply(tok, family, "fine thanks")]
    assert tok.decode(item.input_ids) == family.golden


@pytest.mark.parametrize("name", list(FAMILIES))
def test_end_of_turn_trained_even_when_padding_uses_the_same_id(tokenizers, name):
    tok, family = tokenizers[name], FAMILIES[name]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id  # as model loading does
    eot = tok.convert_tokens_to_ids(family.end_of_turn)
    assert eot in end_of_turn_ids(tok)
    renderer = Renderer(tok)
    items = [renderer.sft(conv(*TWO_TURNS)), renderer.sft(conv(("user", "hi"), ("assistant", "hello")))]
    batch = collate(items, pad_id=pad_id)
    real = batch.seq_ids >= 0
    assert int(((batch.labels == eot) & real).sum()) == 3  # two turns + one turn
    assert (batch.labels[~real] == IGNORE).all() and int((~real).sum()) > 0
    assert (batch.input_ids[~real] == pad_id).all()


def test_families_where_pad_equals_the_trained_end_of_turn(tokenizers):
    """The cases the test above matters most for: pad id == the trained end-of-turn id."""
    same = [n for n, f in FAMILIES.items() if (f.pad or f.eos) == f.end_of_turn]
    assert same == ["chatml_smollm2", "mistral"]


@pytest.mark.parametrize("name", ["gemma", "mistral"])
def test_system_message_folded_into_first_user_turn_for_templates_without_one(tokenizers, name):
    tok, family = tokenizers[name], FAMILIES[name]
    with pytest.raises(Exception, match="ystem|roles"):  # the template itself refuses a system message
        tok.apply_chat_template([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                                tokenize=False)
    renderer = Renderer(tok)
    with pytest.warns(UserWarning, match="no system role"):
        item = renderer.sft(conv(("system", "be brief"), *TWO_TURNS))
    assert tok.decode(item.input_ids) == family.golden.replace("hi there", "be brief\n\nhi there", 1)
    assert trained_runs(item) == [reply(tok, family, "hello"), reply(tok, family, "fine thanks")]
    prompt = renderer.prompt_ids([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}])
    assert tok.decode(prompt) == family.prompt.replace("hi there", "be brief\n\nhi there", 1)
    with_prompt = Renderer(tok, system_prompt="be brief")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert with_prompt.sft(conv(*TWO_TURNS)).input_ids == item.input_ids


def test_preference_pair_trains_each_reply_and_end_of_turn(tokenizers):
    tok, family = tokenizers["phi3"], FAMILIES["phi3"]
    pair = Renderer(tok).preference(Preference((Message("user", "hi there"),), (Message("assistant", "hello"),),
                                               (Message("assistant", "fine thanks"),)))
    assert trained_runs(pair.chosen) == [reply(tok, family, "hello")]
    assert trained_runs(pair.rejected) == [reply(tok, family, "fine thanks")]
    assert tok.decode(pair.chosen.input_ids).endswith("hello<|end|>\n<|endoftext|>")


def test_template_that_is_not_prefix_consistent_is_named(tokenizers):
    tok = tokenizers["reasoning_strip"]
    thinking = conv(("user", "hi"), ("assistant", "<think>count</think>hello"), ("user", "how are you"),
                    ("assistant", "<think>ok</think>fine thanks"))
    with pytest.raises(TunesmithError) as err:
        Renderer(tok).sft(thinking)
    assert "not prefix-consistent" in err.value.message and "reasoning_strip" in err.value.message
    assert "at messages[1] (assistant)" in err.value.message and "train_on: last_assistant" in err.value.hint
    # the hint's way out works: only the final turn, which no later turn re-renders
    last = Renderer(tok, train_on="last_assistant").sft(thinking)
    assert trained_runs(last) == [ids(tok, "<think>ok</think>fine thanks<|im_end|>")]
    # and conversations the template renders consistently are fine under all_assistant
    plain = Renderer(tok).sft(conv(*TWO_TURNS))
    assert [tok.decode(r) for r in trained_runs(plain)] == ["hello<|im_end|>", "fine thanks<|im_end|>"]


def test_base_model_without_template_gets_the_default_and_a_warning(tmp_path):
    tok = build_tokenizer(tmp_path / "base", ("<|endoftext|>",), "<|endoftext|>", "<|endoftext|>", None, False, None)
    assert not tok.chat_template
    with pytest.warns(UserWarning, match="no chat template"):
        renderer = Renderer(tok)
    assert tok.chat_template == DEFAULT_TEMPLATE
    item = renderer.sft(conv(("system", "be brief"), *TWO_TURNS))
    assert tok.decode(item.input_ids) == ("be brief\n\n### User:\nhi there\n\n### Assistant:\nhello<|endoftext|>\n\n"
                                          "### User:\nhow are you\n\n### Assistant:\nfine thanks<|endoftext|>\n\n")
    eos = tok.eos_token_id
    assert trained_runs(item) == [ids(tok, "hello") + [eos], ids(tok, "fine thanks") + [eos]]
    assert tok.decode(renderer.prompt_ids([{"role": "user", "content": "hi"}])) == "### User:\nhi\n\n### Assistant:\n"


def test_no_template_and_no_eos_is_a_clear_error(tmp_path):
    tok = build_tokenizer(tmp_path / "bare", ("<unk>",), None, None, None, False, None)
    with pytest.raises(TunesmithError, match="no chat template and no EOS token"):
        Renderer(tok)


LABELS = ["card_arrival", "exchange_rate", "top_up_failed", "card_linking"]


@pytest.fixture(scope="module")
def stop_model_dir(tmp_path_factory):
    """The tiny ChatML model (pad == eos == <|im_end|>) with a non-zero EOS embedding. tests/tiny.py's config sets
    pad_token_id, so a randomly initialised model has an all-zero EOS row (nn.Embedding padding_idx) and, with tied
    embeddings, a constant EOS logit that LoRA cannot move; pretrained models have a learned EOS row."""
    from tiny import build_model, build_tokenizer

    root = tmp_path_factory.mktemp("stop_model")
    tok = build_tokenizer(root)
    model = build_model(None, vocab_size=len(tok))
    torch.manual_seed(1)
    with torch.no_grad():
        model.get_input_embeddings().weight[tok.eos_token_id].normal_(0, 0.1)
    model.save_pretrained(root)
    tok.save_pretrained(root)
    return root


@pytest.fixture
def one_thread():
    """Tiny models train fastest on one thread, especially on a shared, busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def greedy_new_tokens(chat, prompt: str, max_new: int) -> list[int]:
    tok = chat.tokenizer
    prompt_ids = chat.generator.prompt_ids([{"role": "user", "content": prompt}])
    with torch.no_grad():
        out = chat.model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new, do_sample=False,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return out[0, len(prompt_ids):].tolist()


def test_tiny_model_with_pad_equal_to_eos_learns_to_stop(stop_model_dir, tmp_path, one_thread):
    """pad == eos == <|im_end|>: EOS is still a target, so after training greedy generation stops by itself."""
    prompts = ["what is my card balance", "when will the transfer arrive", "hello world", "the quick brown fox"]
    rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": LABELS[i]}]}
            for i, p in enumerate(prompts)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    max_new = 16
    base = tunesmith.open_model(stop_model_dir, device="cpu", precision="fp32")
    assert base.tokenizer.pad_token_id == base.tokenizer.eos_token_id
    assert base.tokenizer.eos_token_id not in greedy_new_tokens(base, prompts[0], max_new)  # it cannot stop yet
    run = tunesmith.train({"model": str(stop_model_dir), "output_dir": str(tmp_path / "runs"), "name": "stop",
                           "precision": "fp32", "device": "cpu", "data": {"train": str(data)},
                           "train": {"lr": 1e-2, "max_steps": 60, "micro_batch_size": 4, "warmup_ratio": 0.0}},
                          progress=False)
    chat = tunesmith.open_model(run.path, device="cpu", precision="fp32")
    tok = chat.tokenizer
    for i, prompt in enumerate(prompts):
        new = greedy_new_tokens(chat, prompt, max_new)
        assert new == ids(tok, LABELS[i]) + [tok.eos_token_id], tok.decode(new)
        assert len(new) < max_new
