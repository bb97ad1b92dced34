"""Both attention implementations tunesmith uses read the same additive block-diagonal mask exactly."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunesmith.data.batching import collate
from tunesmith.data.render import Renderer
from tunesmith.data.types import Conversation, Message
from tunesmith.methods.logps import sequence_logps
from tunesmith.model.device import make_runtime
from tunesmith.train.recipe import EAGER_MAX_ROW, choose_attention


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_equals_alone_for_each_attention(tiny_dir, impl):
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


def test_short_rows_on_cpu_use_eager_long_rows_sdpa(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    rt = make_runtime("cpu", "fp32", threads=1)
    assert choose_attention(model, rt, EAGER_MAX_ROW) == "eager"
    assert model.config._attn_implementation == "eager"
    assert choose_attention(model, rt, EAGER_MAX_ROW + 1) == "sdpa"
    assert model.config._attn_implementation == "sdpa"
