"""Golden label-mask tests: exactly the assistant content plus the end-of-turn token is trained."""

import pytest
from transformers import AutoTokenizer

from tunesmith.data.batching import collate
from tunesmith.data.render import IGNORE, Renderer
from tunesmith.data.types import Conversation, Message


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


def trained_text(tok, item):
    return tok.decode([t for t in item.labels if t != IGNORE])


def conv(*pairs):
    return Conversation(tuple(Message(r, c) for r, c in pairs))


def test_single_turn_trains_content_and_end_of_turn_only(tok):
    item = Renderer(tok).sft(conv(("user", "hello world"), ("assistant", "card_arrival")))
    ids = list(item.input_ids)
    expected = tok("card_arrival<|im_end|>", add_special_tokens=False)["input_ids"]
    trained = [t for t in item.labels if t != IGNORE]
    assert trained == expected
    # the trained tokens are contiguous and sit right after the generation prompt
    start = next(i for i, t in enumerate(item.labels) if t != IGNORE)
    prompt = tok.apply_chat_template([{"role": "user", "content": "hello world"}], tokenize=False,
                                     add_generation_prompt=True)
    assert ids[:start] == tok(prompt, add_special_tokens=False)["input_ids"]
    # the newline the template prints after <|im_end|> is not trained
    assert item.labels[-1] == IGNORE and ids[-1] != tok.eos_token_id


def test_every_assistant_turn_trained_or_last_only(tok):
    c = conv(("user", "hi"), ("assistant", "hello"), ("user", "how are you"), ("assistant", "today"))
    both = Renderer(tok).sft(c)
    last = Renderer(tok, train_on="last_assistant").sft(c)
    assert trained_text(tok, both) == "hello<|im_end|>today<|im_end|>"
    assert trained_text(tok, last) == "today<|im_end|>"


def test_pad_equals_eos_and_eos_still_trained(tok):
    assert tok.pad_token_id == tok.eos_token_id
    item = Renderer(tok).sft(conv(("user", "hi"), ("assistant", "hello")))
    batch = collate([item, Renderer(tok).sft(conv(("user", "hi there you"), ("assistant", "hello world")))],
                    pad_id=tok.pad_token_id)
    # the end-of-turn token is a target even though padding uses the same id; padding is never a target
    eos_targets = ((batch.labels == tok.eos_token_id) & (batch.seq_ids >= 0)).sum()
    assert eos_targets == 2
    assert (batch.labels[batch.seq_ids < 0] == IGNORE).all()


def test_truncation_policies_are_counted(tok):
    long = conv(("user", "hello world " * 40), ("assistant", "card_arrival"))
    short = conv(("user", "hi"), ("assistant", "hello"))
    right = Renderer(tok, max_length=40, truncation="right")
    assert right.sft(long) is None  # right-truncation cut off every trained token: dropped and counted
    assert right.stats.truncated == 1 and right.stats.dropped == 1
    left = Renderer(tok, max_length=40, truncation="left")
    kept = left.sft(long)
    assert len(kept) == 40 and trained_text(tok, kept) == "card_arrival<|im_end|>"
    assert left.stats.truncated == 1 and left.stats.dropped == 0
    drop = Renderer(tok, max_length=40, truncation="drop")
    assert drop.sft(long) is None and drop.sft(short) is not None
    assert drop.stats.dropped == 1 and drop.stats.rendered == 2


def first_trained(item):
    return next(i for i, t in enumerate(item.labels) if t != IGNORE)


def test_left_truncation_keeps_one_prompt_for_both_sides_of_a_pair(tok):
    """Completions of different lengths: cutting each side separately would leave them different prompts."""
    from tunesmith.data.types import Preference

    pair = Preference((Message("user", "hello world " * 30),), (Message("assistant", "card_arrival"),),
                      (Message("assistant", "the quick brown fox jumps over the lazy dog " * 2),))
    full = Renderer(tok, max_length=10**6).preference(pair)
    longest = max(len(full.chosen), len(full.rejected))
    renderer = Renderer(tok, max_length=longest - 10, truncation="left")
    cut = renderer.preference(pair)
    assert len(cut.rejected) == longest - 10 and len(cut.chosen) == len(full.chosen) - 10
    # the same prompt on both sides: what full had, less the same 10 leading tokens
    prompt = full.chosen.input_ids[10:first_trained(full.chosen)]
    for side, whole in ((cut.chosen, full.chosen), (cut.rejected, full.rejected)):
        assert side.input_ids[:first_trained(side)] == prompt
        assert trained_text(tok, side) == trained_text(tok, whole)  # the replies are whole
    assert renderer.stats.truncated == 1 and renderer.stats.dropped == 0


def test_left_truncation_drops_a_pair_whose_reply_does_not_fit_and_counts_it(tok):
    from tunesmith.data.types import Preference

    pair = Preference((Message("user", "hi"),), (Message("assistant", "card_arrival"),),
                      (Message("assistant", "hello world " * 40),))
    renderer = Renderer(tok, max_length=40, truncation="left")
    assert renderer.preference(pair) is None
    assert (renderer.stats.rendered, renderer.stats.truncated, renderer.stats.dropped) == (1, 1, 1)
