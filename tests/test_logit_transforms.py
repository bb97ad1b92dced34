"""tunesmith's chunked log-probs equal the model's own `model(ids).logits.log_softmax` for a tiny model of
every architecture family tunesmith trains — including those whose forward transforms the logits (Gemma-2/3
soft-capping, Granite's logits_scaling, Cohere's logit_scale) — and a forward it cannot reproduce is refused."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tunesmith.data.batching import collate
from tunesmith.data.render import IGNORE, Tokenized
from tunesmith.errors import TunesmithError
from tunesmith.methods.logps import check_head, logit_transform, sequence_logps

SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=128)
FAMILIES = {
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {}, "phi3": {"pad_token_id": 0}, "gemma": {}, "olmo2": {},
    "smollm3": {"pad_token_id": 0},
    "starcoder2": {}, "stablelm": {},
    "gemma2": {"final_logit_softcapping": 2.0}, "gemma3_text": {"final_logit_softcapping": 2.0},
    "granite": {"logits_scaling": 4.0}, "cohere": {"logit_scale": 0.25}, "cohere2": {"logit_scale": 0.25},
    "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 4}, "gpt_neox": {},
}
TRANSFORMED = {"gemma2", "gemma3_text", "granite", "cohere", "cohere2"}


def tiny(model_type: str) -> torch.nn.Module:
    cfg = AutoConfig.for_model(model_type, **{**SMALL, **FAMILIES[model_type]})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # large logits, so that a missing transform would show
        model.get_output_embeddings().weight.mul_(8.0)
    return model


def seqs():
    g = torch.Generator().manual_seed(1)
    out = []
    for n, prompt in ((17, 5), (11, 3), (23, 9)):
        ids = torch.randint(1, 96, (n,), generator=g).tolist()
        out.append(Tokenized(tuple(ids), tuple([IGNORE] * prompt + ids[prompt:])))
    return out


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_sequence_logps_equal_the_models_own_forward(model_type):
    model = tiny(model_type)
    assert (logit_transform(model) is not None) == (model_type in TRANSFORMED)
    batch = collate(seqs(), 0, pack_length=64)  # packed: all three in one row
    with torch.no_grad():
        mine = sequence_logps(model, batch).logp_sum
        theirs = []
        for s in seqs():
            logits = model(input_ids=torch.tensor([s.input_ids])).logits[0, :-1].float()
            lp = logits.log_softmax(-1).gather(-1, torch.tensor(s.input_ids[1:])[:, None]).squeeze(-1)
            theirs.append(lp[torch.tensor(s.labels[1:]) != IGNORE].sum())
    torch.testing.assert_close(mine, torch.stack(theirs), atol=1e-3, rtol=1e-4)
    check_head(model)


def test_a_forward_tunesmith_cannot_reproduce_is_refused():
    model = tiny("llama")
    real = type(model).forward

    def scaled(self, *args, **kwargs):  # a new architecture that multiplies its logits
        out = real(self, *args, **kwargs)
        out.logits = out.logits * 3.0
        return out

    model.forward = scaled.__get__(model)
    with pytest.raises(TunesmithError, match="cannot reproduce the output of 'llama'"):
        check_head(model)
