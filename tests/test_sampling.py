"""The rollout sampler: log-probs from the generating pass equal a teacher-forced forward of the same tokens
(fp32), prompts are run once per group, finished rows leave the batch without changing anything, draws
come only from the generator given, and top-k / top-p follow transformers' warpers."""

import pytest
import torch

from tunesmith.data.batching import collate
from tunesmith.data.render import IGNORE, Tokenized
from tunesmith.methods.logps import token_logps
from tunesmith.model import adapters
from tunesmith.model.load import load_model_and_tokenizer
from tunesmith.model.sampling import Sampler, SamplingSettings, draw, filter_logits

PROMPTS = ["hello world how are you", "the quick brown fox jumps over", "what is my card balance"]


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    model, tok = load_model_and_tokenizer(str(tiny_dir), precision="fp32")
    return model, tok


def prompt_ids(tok, text):
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                   tokenize=True, return_dict=False)


def sampler_for(model, tok):
    return Sampler(model, tok)


def teacher_forced(model, prompt, completion, temperature):
    seq = Tokenized(tuple(prompt) + tuple(completion), (IGNORE,) * len(prompt) + tuple(completion))
    with torch.no_grad():
        logps, _ = token_logps(model, collate([seq], 0), temperature=temperature)
    return logps


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, 0), (0.7, 0.9, 0), (1.3, 1.0, 20)])
def test_generation_logps_equal_a_teacher_forced_forward(tiny, temperature, top_p, top_k):
    model, tok = tiny
    prompts = [prompt_ids(tok, p) for p in PROMPTS]  # different lengths: left padding in the prefill
    settings = SamplingSettings(group_size=3, max_new_tokens=12, temperature=temperature, top_p=top_p,
                                top_k=top_k)
    sampler = sampler_for(model, tok)
    groups, stats = sampler.sample(prompts, settings, torch.Generator().manual_seed(0))
    assert [len(g) for g in groups] == [3, 3, 3]
    assert stats.prompt_tokens == sum(len(p) for p in prompts)  # each prompt run once for its 3 completions
    for prompt, group in zip(prompts, groups, strict=True):
        for c in group:
            assert len(c.tokens) == len(c.logps) and 1 <= len(c.tokens) <= 12
            assert c.stopped == (c.tokens[-1] in sampler.stop_ids)
            forced = teacher_forced(model, prompt, c.tokens, temperature)
            torch.testing.assert_close(torch.tensor(c.logps), forced, atol=2e-5, rtol=0)


def test_lora_adapters_are_live_and_sampling_is_reproducible(tiny_dir):
    from tunesmith.config import AdapterConfig

    model, tok = load_model_and_tokenizer(str(tiny_dir), precision="fp32")
    model = adapters.apply_adapter(model, AdapterConfig(r=4, alpha=8))
    prompts = [prompt_ids(tok, p) for p in PROMPTS[:2]]
    settings = SamplingSettings(group_size=4, max_new_tokens=8)
    sampler = sampler_for(model, tok)

    def run(seed):
        return sampler.sample(prompts, settings, torch.Generator().manual_seed(seed))[0]

    first = run(1)
    assert [[c.tokens for c in g] for g in run(1)] == [[c.tokens for c in g] for g in first]
    torch.manual_seed(123)  # the global generator plays no part
    assert [[c.logps for c in g] for g in run(1)] == [[c.logps for c in g] for g in first]
    with torch.no_grad():  # change the adapter: the same draws now score (and pick) differently
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.5)
    changed = run(1)
    c0 = changed[0][0]
    assert c0.logps != first[0][0].logps or c0.tokens != first[0][0].tokens
    torch.testing.assert_close(torch.tensor(c0.logps), teacher_forced(model, prompts[0], c0.tokens, 1.0),
                               atol=2e-5, rtol=0)
    assert model.training  # the sampler puts the model back as it found it


def test_finished_rows_leave_the_batch_without_changing_results(tiny):
    model, tok = tiny
    prompts = [prompt_ids(tok, p) for p in PROMPTS]
    settings = SamplingSettings(group_size=4, max_new_tokens=16)
    sampler = sampler_for(model, tok)
    eos = tok.eos_token_id
    # point the end-of-turn token's output row along the typical hidden state, so rows finish early and at
    # different steps
    with torch.no_grad():
        h = model.model(input_ids=torch.tensor([prompts[0]])).last_hidden_state[0].mean(0)
        bias = model.get_output_embeddings().weight
        saved = bias[eos].clone()
        bias[eos] = h / h.norm() * 0.5
    try:
        groups, stats = sampler.sample(prompts, settings, torch.Generator().manual_seed(3))
        assert stats.rows[0] == 12 and stats.rows[-1] < 12  # rows really left the batch
        lengths = {len(c.tokens) for g in groups for c in g}
        assert len(lengths) > 1 and any(c.stopped for g in groups for c in g)
        for prompt, group in zip(prompts, groups, strict=True):
            for c in group:
                forced = teacher_forced(model, prompt, c.tokens, 1.0)
                torch.testing.assert_close(torch.tensor(c.logps), forced, atol=2e-5, rtol=0)
        assert stats.new_tokens == sum(len(c.tokens) for g in groups for c in g)
    finally:
        with torch.no_grad():
            bias[eos] = saved


def test_top_k_and_top_p_match_transformers_warpers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0)) * 3
    for top_p in (0.3, 0.9, 0.99):
        expected = TopPLogitsWarper(top_p)(None, logits.clone())
        assert torch.equal(filter_logits(logits, top_p=top_p).isinf(), expected.isinf())
    expected = TopKLogitsWarper(7)(None, logits.clone())
    assert torch.equal(filter_logits(logits, top_k=7).isinf(), expected.isinf())


def test_draws_follow_the_filtered_distribution_and_score_the_unfiltered_one():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    settings = SamplingSettings(group_size=1, max_new_tokens=1, temperature=0.5, top_k=2)
    tokens, logps = draw(logits, settings, torch.Generator().manual_seed(0))
    assert set(tokens.tolist()) == {0, 1}  # top-k 2 decides what can be drawn
    p = torch.softmax(logits[0, :2] / 0.5, -1)
    assert abs((tokens == 0).float().mean().item() - p[0].item()) < 0.03
    full = (logits[0] / 0.5).log_softmax(-1)  # ... and the log-prob is the temperature-scaled, untruncated one
    torch.testing.assert_close(logps, full[tokens])


def test_inverse_cdf_draws_in_proportion_and_never_an_impossible_token():
    from tunesmith.model.sampling import inverse_cdf

    probs = torch.tensor([[0.0, 0.2, 0.0, 0.5, 0.3, 0.0]]).repeat(40000, 1)
    probs[::2] *= 7.0  # unnormalised rows draw the same way
    tokens = inverse_cdf(probs, torch.Generator().manual_seed(0))
    counts = torch.bincount(tokens, minlength=6).double() / len(tokens)
    assert counts[[0, 2, 5]].sum() == 0
    torch.testing.assert_close(counts[[1, 3, 4]], torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64), atol=0.01,
                               rtol=0)
    one_hot = torch.zeros(3, 50)
    one_hot[torch.arange(3), torch.tensor([0, 17, 49])] = 1.0  # the first and last entries are reachable
    assert inverse_cdf(one_hot, torch.Generator().manual_seed(1)).tolist() == [0, 17, 49]


def test_inverse_cdf_across_blocks_picks_the_index_a_flat_cumulative_sum_picks():
    from tunesmith.model.sampling import CDF_BLOCK, inverse_cdf

    v = 3 * CDF_BLOCK + 37  # a last block that is partly padding
    g = torch.Generator().manual_seed(3)
    probs = torch.rand(2000, v, generator=g) ** 4
    probs[:, CDF_BLOCK:2 * CDF_BLOCK] = 0.0  # a whole block that cannot be drawn
    probs[:, CDF_BLOCK - 1] = probs[:, 2 * CDF_BLOCK] = 0.0  # zeros on both sides of a block edge
    probs[:1000, :-1] = 0.0  # rows whose only possible token is the last one
    tokens = inverse_cdf(probs, torch.Generator().manual_seed(4))
    u = torch.rand((2000, 1), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    cdf = probs.double().cumsum(-1)
    flat = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)
    assert (tokens[:1000] == v - 1).all()
    assert (probs.gather(1, tokens[:, None]) > 0).all()
    assert (tokens == flat).float().mean() > 0.999  # the same draw, up to float64 rounding at the edges


def test_reserved_cache_holds_exactly_what_concatenation_would(tiny):
    """The in-place cache against transformers' own DynamicCache, through appends and a row selection."""
    import copy

    from tunesmith.model.sampling import reserve

    model, tok = tiny
    ids = torch.tensor([prompt_ids(tok, PROMPTS[0])] * 3)
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    plain = copy.deepcopy(cache)
    reserve(cache, extra=4)
    g = torch.Generator().manual_seed(0)
    for step in range(7):  # more positions than were reserved
        if step == 2:
            keep = torch.tensor([0, 2])
            cache.batch_select_indices(keep)
            plain.batch_select_indices(keep)
        for a, b in zip(cache.layers, plain.layers, strict=True):
            k = torch.randn(b.keys.shape[0], b.keys.shape[1], 1, b.keys.shape[-1], generator=g)
            v = torch.randn(k.shape, generator=g)
            got, want = a.update(k, v), b.update(k, v)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert cache.get_seq_length() == plain.get_seq_length() == ids.shape[1] + 7


def test_decode_linears_compute_the_same_products_for_few_rows_only():
    from tunesmith.model.kernels import SKINNY_ROWS, decode_linears

    g = torch.Generator().manual_seed(0)
    big, small = torch.nn.Linear(576, 1536), torch.nn.Linear(576, 16, bias=False)  # small: a LoRA factor
    model = torch.nn.Sequential(big, small)
    calls = []
    original = torch.mm

    def counting_mm(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    with torch.no_grad():
        for rows in (1, 3, SKINNY_ROWS, SKINNY_ROWS + 1):
            x = torch.randn(rows, 1, 576, generator=g)
            with decode_linears(model, "cpu"):
                torch.mm = counting_mm
                try:
                    got, got_small = big(x), small(x)
                finally:
                    torch.mm = original
            torch.testing.assert_close(got, torch.nn.functional.linear(x, big.weight, big.bias), atol=1e-4,
                                       rtol=1e-5)
            torch.testing.assert_close(got_small, x @ small.weight.t())
            assert got.shape == (rows, 1, 1536) and got.is_contiguous()
            assert calls == ([big.weight.shape] if rows <= SKINNY_ROWS else [])  # W @ x^T, few rows, big only
            calls.clear()
        assert "forward" not in big.__dict__ and "forward" not in small.__dict__  # put back on leaving
        x = torch.randn(2, 1, 576, generator=g)
        with decode_linears(model, "meta"):  # elsewhere than the CPU: nothing changes
            assert "forward" not in big.__dict__
