"""Attention on CPU: tunesmith's matmul attention for rows up to MATMUL_ATTENTION_MAX_ROW tokens, SDPA above,
picked per batch. Every implementation reads the same additive mask exactly."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunesmith.data.batching import collate
from tunesmith.data.render import Renderer
from tunesmith.data.types import Conversation, Message
from tunesmith.methods.logps import sequence_logps
from tunesmith.model.attention import POLICY
from tunesmith.model.device import make_runtime
from tunesmith.model.fused import ATTENTION, MATMUL_ATTENTION_MAX_ROW, register_attention
from tunesmith.model.unwrap import unwrap
from tunesmith.train.recipe import choose_attention


@pytest.mark.parametrize("impl", ["sdpa", "eager", ATTENTION])
def test_packed_equals_alone_for_each_attention(tiny_dir, impl):
    register_attention()
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation=impl).eval()
    r = Renderer(tok, 256)
    seqs = [r.sft(Conversation((Message("user", "hello world " * k), Message("assistant", "card_arrival " * k))))
            for k in range(1, 6)]
    with torch.no_grad():
        packed = sequence_logps(model, collate(seqs, tok.pad_token_id, 200)).logp_sum
        alone = torch.stack([sequence_logps(model, collate([s], tok.pad_token_id)).logp_sum[0] for s in seqs])
    assert collate(seqs, tok.pad_token_id, 200).input_ids.shape[0] < len(seqs)  # really packed
    torch.testing.assert_close(packed, alone, atol=1e-4, rtol=1e-5)


def test_cpu_picks_matmul_attention_per_batch_by_row_length(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    choose_attention(model, make_runtime("cpu", "fp32", threads=1))
    lm = unwrap(model)
    seen = []
    original = lm.model.layers[0].self_attn.forward

    def spy(*args, **kwargs):
        seen.append(lm.config._attn_implementation)
        return original(*args, **kwargs)

    lm.model.layers[0].self_attn.forward = spy
    short = collate([_seq(20)], 2)
    long = collate([_seq(MATMUL_ATTENTION_MAX_ROW + 1)], 2)
    with torch.no_grad():
        sequence_logps(model, short)
        sequence_logps(model, long)
        sequence_logps(model, short)
    assert seen == [ATTENTION, "sdpa", ATTENTION]


def test_fused_off_or_not_cpu_keeps_sdpa(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert choose_attention(model, make_runtime("cpu", "fp32", threads=1), fused=False) == "sdpa"
    assert getattr(unwrap(model), POLICY).describe() == "sdpa"
    assert model.config._attn_implementation == "sdpa"


def test_generation_works_with_the_matmul_attention_set(tiny_dir):
    """After training the model may still have the matmul attention selected; generation with a cache (query
    shorter than keys) goes through SDPA and gives the same tokens as a fresh model."""
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    fresh = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    choose_attention(model, make_runtime("cpu", "fp32", threads=1))
    unwrap(model).config._attn_implementation = ATTENTION
    ids = tok(["hello world how are", "the quick"], return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(model.generate(**ids, **kwargs), fresh.generate(**ids, **kwargs))


def _seq(n):
    from tunesmith.data.render import IGNORE, Tokenized

    ids = tuple(i % 500 + 4 for i in range(n))
    return Tokenized(ids, (IGNORE,) * (n // 2) + ids[n // 2:])
