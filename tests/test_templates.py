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
                    add_bos: bool, template: str | None, added: tuple[str, ...] = ()):
    """A tiny byte-level BPE with the given specials (and `added` ordinary added tokens, as Qwen2.5 has
    <tool_call>), saved to out_dir and loaded back with AutoTokenizer."""
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
    if added:
        fast.add_tokens(list(added))
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


# --- tool calling: golden renderings and masks of three template families --------------------------------------

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
WEATHER_JSON = json.dumps(WEATHER)
TOOL_ROW = {"tools": [WEATHER], "messages": [
    {"role": "user", "content": "weather in Paris?"},
    {"role": "assistant", "tool_calls": [{"id": "call00001", "type": "function",
                                          "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call00001", "content": '{"temp": 21}'},
    {"role": "assistant", "content": "It is 21 degrees."}]}


@dataclass(frozen=True)
class ToolFamily:
    specials: tuple[str, ...]
    bos: str | None
    eos: str
    pad: str | None
    add_bos: bool
    golden: str  # decoded ids of TOOL_ROW
    trained: tuple[str, ...]  # the text of each trained run (the call turn, the answer), end-of-turn included
    added: tuple[str, ...] = ()


LLAMA31_TOOLS = json.dumps(WEATHER, indent=4)
TOOL_FAMILIES = {
    "qwen2_5_tools": ToolFamily(
        CHATML_SPECIALS, None, "<|im_end|>", "<|endoftext|>", False,
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\nYou are provided with function "
        f"signatures within <tools></tools> XML tags:\n<tools>\n{WEATHER_JSON}\n</tools>\n\nFor each function call, "
        "return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n"
        '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nweather in Paris?<|im_end|>\n<|im_start|>assistant\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
        '<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\nIt is 21 degrees.<|im_end|>\n",
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
         "It is 21 degrees.<|im_end|>"), added=("<tool_call>", "</tool_call>")),
    "llama3_1_tools": ToolFamily(
        ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
         "<|eom_id|>", "<|python_tag|>"), "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>", True,
        "<|begin_of_text|>" + LLAMA_HEAD.format("system") + "Environment: ipython\nCutting Knowledge Date: December "
        "2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>" + LLAMA_HEAD.format("user") + "Given the following functions, "
        "please respond with a JSON for a function call with its proper arguments that best answers the given "
        'prompt.\n\nRespond in the format {"name": function name, "parameters": dictionary of argument name and its '
        f'value}}.Do not use variables.\n\n{LLAMA31_TOOLS}\n\nweather in Paris?<|eot_id|>'
        + LLAMA_HEAD.format("assistant") + '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'
        + LLAMA_HEAD.format("ipython") + '"{\\"temp\\": 21}"<|eot_id|>' + LLAMA_HEAD.format("assistant")
        + "It is 21 degrees.<|eot_id|>",
        ('{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>', "It is 21 degrees.<|eot_id|>")),
    "mistral_v3_tools": ToolFamily(
        ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]",
         "[TOOL_RESULTS]", "[/TOOL_RESULTS]"), "<s>", "</s>", None, True,
        f"<s>[AVAILABLE_TOOLS] [{WEATHER_JSON}][/AVAILABLE_TOOLS][INST] weather in Paris?[/INST]"
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call00001"}]</s>'
        '[TOOL_RESULTS] {"content": {"temp": 21}, "call_id": "call00001"}[/TOOL_RESULTS] It is 21 degrees.</s>',
        ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call00001"}]</s>',
         " It is 21 degrees.</s>")),
}


@pytest.fixture(scope="module")
def tool_tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tool_templates")
    return {name: build_tokenizer(root / name, f.specials, f.bos, f.eos, f.pad, f.add_bos,
                                  (TEMPLATES / f"{name}.jinja").read_text(), f.added)
            for name, f in TOOL_FAMILIES.items()}


def tool_conversation():
    from tunesmith.data.formats import parse_messages
    from tunesmith.data.types import Source

    return parse_messages(json.loads(json.dumps(TOOL_ROW)), Source("tools.jsonl", 1))


def decode(tok, token_ids) -> str:
    return tok.decode(list(token_ids), skip_special_tokens=False)


@pytest.mark.parametrize("name", list(TOOL_FAMILIES))
def test_tool_calls_render_golden_and_only_calls_and_text_train(tool_tokenizers, name):
    tok, family = tool_tokenizers[name], TOOL_FAMILIES[name]
    item = Renderer(tok).sft(tool_conversation())
    assert decode(tok, item.input_ids) == family.golden
    runs = trained_runs(item)
    assert [decode(tok, r) for r in runs] == list(family.trained)
    # token for token: each run is exactly the tokenization of its text (the call syntax included), and the tool
    # definitions and the tool result are never trained
    eot = tok.convert_tokens_to_ids(family.eos)
    assert runs == [ids(tok, text.removesuffix(family.eos)) + [eot] for text in family.trained]
    assert item.input_ids.count(tok.bos_token_id) <= 1 and (tok.bos_token_id is None
                                                             or item.input_ids[0] == tok.bos_token_id)


@pytest.mark.parametrize("name", list(TOOL_FAMILIES))
def test_a_tool_conversation_prompt_carries_the_tools_to_generation(tool_tokenizers, name):
    """The eval prompt of the call turn (and of the answer after the result) is what training saw before it."""
    from tunesmith.data.formats import prompt_messages

    tok = tool_tokenizers[name]
    conv = tool_conversation()
    item = Renderer(tok).sft(conv)
    answer_start = [i for i, x in enumerate(item.labels) if x != IGNORE and item.labels[i - 1] == IGNORE][1]
    prompt = Renderer(tok).prompt_ids(prompt_messages(conv))
    assert list(item.input_ids[:answer_start]) == prompt
    first_call = Renderer(tok).prompt_ids(conv.messages[:1])
    assert "get_weather" in decode(tok, first_call)  # the tool definitions reach the first prompt too


def test_a_template_without_tool_support_is_a_clear_error(tmp_path):
    tok = build_tokenizer(tmp_path / "plain", CHATML_SPECIALS, None, "<|im_end|>", "<|endoftext|>", False,
                          (TEMPLATES / "qwen2_5.jinja").read_text())  # the tool branches left out
    with pytest.raises(TunesmithError) as err:
        Renderer(tok).sft(tool_conversation())
    assert "does not render tool definitions: 'get_weather'" in err.value.message and "Qwen2.5" in err.value.hint
    # a template that shows the definitions but drops the calls
    shows_tools = ("{% for t in tools %}{{ t.function.name }}\n{% endfor %}" + (TEMPLATES / "qwen2_5.jinja").read_text()
                   .replace("(message.role == \"assistant\" and not message.tool_calls)", "message.role == \"assistant\""))
    tok = build_tokenizer(tmp_path / "no_calls", CHATML_SPECIALS, None, "<|im_end|>", "<|endoftext|>", False,
                          shows_tools)
    with pytest.raises(TunesmithError, match=r"does not render the tool calls of messages\[1\]"):
        Renderer(tok).sft(tool_conversation())
