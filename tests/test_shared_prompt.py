"""Shared prompts: a preference pair's chosen and rejected sequences compute their common prompt once, and each
continues from that one copy in a branch the other cannot see. Checked against each sequence alone (fp32):
layout, log-probs and gradients, under both attention implementations, in the reference pre-pass, and through
whole DPO runs with the option on and off."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from speed_utils import PAD, VOCAB, grads, naive_seq_logp, tiny_lora
from tunesmith.config import MethodConfig
from tunesmith.data.batching import collate, shared_prefix
from tunesmith.data.render import IGNORE, Tokenized, TokenizedPair
from tunesmith.methods import get_method
from tunesmith.methods.logps import sequence_logps
from tunesmith.methods.reference import score_batches
from tunesmith.model.device import make_runtime


def seq(ids, n_prompt):
    return Tokenized(tuple(ids), tuple([IGNORE] * n_prompt + list(ids[n_prompt:])))


def random_pairs(n: int, seed: int) -> list[TokenizedPair]:
    """Pairs with one prompt and two different completions, of assorted lengths."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        prompt = torch.randint(4, VOCAB, (6 + 5 * k,), generator=g).tolist()
        a = torch.randint(4, VOCAB, (3 + 2 * k,), generator=g).tolist()
        b = torch.randint(4, VOCAB, (9 - k,), generator=g).tolist()
        out.append(TokenizedPair(seq(prompt + a, len(prompt)), seq(prompt + b, len(prompt))))
    return out


def test_shared_prefix_stops_before_the_last_common_untrained_token():
    a = seq([1, 2, 3, 4, 5], 3)  # trained from index 3
    b = seq([1, 2, 3, 9, 9, 9], 3)
    assert shared_prefix(a, b) == 2  # tokens 0-1 once; each keeps token 2, whose state predicts its token 3
    assert shared_prefix(a, seq([1, 2, 3, 4, 7], 3)) == 2  # equal trained tokens are never shared
    assert shared_prefix(a, seq([1, 2, 3, 4, 5], 1)) == 0  # the other sequence trains from index 1
    assert shared_prefix(a, seq([7, 2, 3, 4], 3)) == 0
    assert shared_prefix(seq([1, 2], 2), seq([1, 2, 3], 2)) == 1  # one sequence is all prompt


def test_layout_positions_labels_and_mask():
    c, r = seq([1, 2, 3, 4, 5], 3), seq([1, 2, 3, 9, 9, 9], 3)
    batch = collate([c, r], PAD, pack_length=None, share=[(0, 1)])
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 3, 9, 9, 9]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 3, 4, 5]]
    assert batch.seq_ids.tolist() == [[0, 0, 0, 0, 0, 1, 1, 1, 1]]
    assert batch.labels.tolist() == [[IGNORE, IGNORE, IGNORE, 4, 5, IGNORE, 9, 9, 9]]
    assert batch.n_real_tokens == 11 and batch.n_computed_tokens == 9 and batch.n_target_tokens == 5
    allowed = (batch.attention_mask()[0, 0] == 0).int()
    assert allowed.tolist() == [
        [1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 1, 0, 0, 0],  # rejected's copy of token 2 sees the shared tokens 0-1, not chosen
        [1, 1, 0, 0, 0, 1, 1, 0, 0],
        [1, 1, 0, 0, 0, 1, 1, 1, 0],
        [1, 1, 0, 0, 0, 1, 1, 1, 1],
    ]


@pytest.fixture(scope="module")
def model():
    return tiny_lora(seed=3).eval()


@pytest.mark.parametrize("pack", [None, 64])
def test_shared_logps_and_gradients_equal_each_sequence_alone(model, pack):
    pairs = random_pairs(4, seed=1)
    dpo = get_method("dpo")
    batch = dpo.collate(pairs, PAD, pack)
    assert batch.n_computed_tokens < batch.n_real_tokens  # the prompts really were shared
    assert batch.n_real_tokens == sum(len(p.chosen) + len(p.rejected) for p in pairs)
    got_c, got_r = sequence_logps(model, batch, chunk=7).split(4)
    want_c = torch.stack([naive_seq_logp(model, p.chosen) for p in pairs])
    want_r = torch.stack([naive_seq_logp(model, p.rejected) for p in pairs])
    torch.testing.assert_close(got_c.logp_sum, want_c, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got_r.logp_sum, want_r, atol=1e-4, rtol=1e-5)
    assert got_c.n_tokens.tolist() == [float(sum(x != IGNORE for x in p.chosen.labels[1:])) for p in pairs]

    weights = torch.tensor([1.0, -0.5, 2.0, 0.3])  # distinct: a leak between branches shows up
    loss = lambda c, r: (weights * torch.nn.functional.logsigmoid(c - 0.7 * r)).sum()  # noqa: E731
    shared = grads(model, loss(got_c.logp_sum, got_r.logp_sum))
    alone = grads(model, loss(want_c, want_r))
    for name in shared:
        torch.testing.assert_close(shared[name], alone[name], atol=1e-5, rtol=1e-4, msg=name)


def test_a_leak_between_branches_would_be_seen(model):
    """The check above can fail: letting the rejected branch see the chosen one changes its log-probs."""
    pairs = random_pairs(2, seed=2)
    batch = get_method("dpo").collate(pairs, PAD, None)
    batch.branch = None  # rejected now attends to chosen's completion
    leaked = sequence_logps(model, batch).split(2)[1].logp_sum
    want = torch.stack([naive_seq_logp(model, p.rejected) for p in pairs])
    assert (leaked - want).abs().max() > 1e-2


def test_share_prompt_off_runs_two_full_sequences():
    pairs = random_pairs(3, seed=4)
    method = get_method("dpo", MethodConfig(share_prompt=False))
    batch = method.collate(pairs, PAD, 64)
    assert batch.n_computed_tokens == batch.n_real_tokens
    on = get_method("dpo")
    assert on.length(pairs[0]) == method.length(pairs[0]) - shared_prefix(pairs[0].chosen, pairs[0].rejected)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_both_attention_implementations_read_the_branch_mask(tiny_dir, impl):
    lm = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation=impl).eval()
    vocab = lm.config.vocab_size
    pairs = [TokenizedPair(seq([p % vocab for p in range(5, 30)] + [40, 41, 42], 25),
                           seq([p % vocab for p in range(5, 30)] + [50, 51], 25)),
             TokenizedPair(seq([60, 61, 62, 63, 64, 65], 4), seq([60, 61, 62, 63, 70, 71, 72, 73], 4))]
    with torch.no_grad():
        shared = sequence_logps(lm, get_method("dpo").collate(pairs, PAD, 64)).logp_sum
        alone = torch.stack([sequence_logps(lm, collate([s], PAD)).logp_sum[0]
                             for s in [pairs[0].chosen, pairs[1].chosen, pairs[0].rejected, pairs[1].rejected]])
    torch.testing.assert_close(shared, alone, atol=1e-4, rtol=1e-5)


def test_reference_pass_with_pairs_equals_sequences_alone(model):
    pairs = random_pairs(5, seed=5)
    groups = [pairs[:2], pairs[2:]]
    rt = make_runtime("cpu", "fp32")
    scored = {}
    for share in (True, False):
        scored[share] = {}
        method = get_method("dpo", MethodConfig(share_prompt=share))
        score_batches(lambda b: sequence_logps(model, b), method, [(g, True) for g in groups], PAD, 64, rt,
                      scored[share])
    assert set(scored[True]) == set(scored[False]) and len(scored[True]) == 10
    keys = sorted(scored[True])
    shared, alone = (torch.tensor([scored[s][k] for k in keys]) for s in (True, False))
    torch.testing.assert_close(shared, alone, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_training_with_and_without_shared_prompts_gives_the_same_run(tiny_dir, tmp_path, monkeypatch, method):
    import tunesmith
    from pref_utils import pair_rows, quiet, run_config, steps, write_jsonl

    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    runs = {}
    for share in (True, False):
        # length grouping off: a shared prompt changes a pair's length, and so which pairs group together
        cfg = run_config(tiny_dir, tmp_path / f"runs-{share}", method, data,
                         train={"max_steps": 4, "micro_batch_size": 4, "group_by_length": False},
                         method_args={"share_prompt": share})
        runs[share] = steps(tunesmith.train(cfg, progress=False, console=quiet()[0]))
    on, off = runs[True], runs[False]
    assert [r["loss"] for r in on] == pytest.approx([r["loss"] for r in off], abs=2e-5)
    assert on[-1]["loss"] != pytest.approx(on[0]["loss"], abs=1e-3)  # it trained
    assert [r["tokens"] for r in on] == [r["tokens"] for r in off]  # throughput counts both whole sequences
