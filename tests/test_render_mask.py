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
