"""Packing: several sequences share a row, with restarting position ids and a block-diagonal causal mask.
Checked against each sequence run alone through the model's own forward (fp32): logits, per-sequence
log-probs and LoRA gradients agree, for SFT batches and for preference batches (chosen + rejected)."""

from __future__ import annotations

import pytest
import torch

from speed_utils import PAD, grads, naive_seq_logp, random_seqs, solo_logits, tiny_lora
from tunesmith.data.batching import _pack, collate
from tunesmith.data.render import IGNORE, TokenizedPair
from tunesmith.methods import get_method
from tunesmith.methods.logps import hidden_states, sequence_logps, token_logps
from tunesmith.model.unwrap import unwrap

LENGTHS = [9, 23, 5, 14, 31, 7, 12]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_lora(seed=0).eval()  # eval: no dropout; gradients still flow


def packed_logits(model, batch) -> torch.Tensor:
    return unwrap(model).get_output_embeddings()(hidden_states(model, batch))


def rows_with_several_sequences(batch) -> int:
    return sum(len(set(row.tolist()) - {-1}) > 1 for row in batch.seq_ids)


def test_pack_places_every_sequence_once_within_the_row_budget():
    seqs = random_seqs([50, 3, 17, 40, 8, 8, 25, 64, 71], seed=1)
    rows = _pack([len(s) for s in seqs], 64)
    placed = sorted(i for row in rows for i in row)
    assert placed == list(range(len(seqs)))
    for row in rows:
        assert sum(len(seqs[i]) for i in row) <= 64 or len(row) == 1  # a too-long sequence gets a row alone
    # first-fit decreasing by hand: [71] [64] [50 8 3] [40 17] [25 8]
    assert sorted(sorted(len(seqs[i]) for i in row) for row in rows) == [[3, 8, 50], [8, 25], [17, 40], [64], [71]]


def test_packed_logits_equal_each_sequence_alone(model):
    seqs = random_seqs(LENGTHS, seed=2)
    batch = collate(seqs, PAD, pack_length=48)
    assert batch.input_ids.shape[0] < len(seqs) and rows_with_several_sequences(batch) >= 2
    with torch.no_grad():
        logits = packed_logits(model, batch)
        for i, seq in enumerate(seqs):
            mine = logits[batch.seq_ids == i]
            torch.testing.assert_close(mine, solo_logits(model, seq), atol=1e-4, rtol=1e-4)


def test_position_ids_alone_do_not_keep_packed_sequences_apart(model):
    """Why the batch carries an explicit 4D mask. With a 2D mask of ones, SDPA attends across the whole row,
    so the second sequence of a row sees the first; restarted position ids change nothing about that. With
    no mask at all, transformers 5 infers sequences from restarting position ids (training only, no cache)
    — tunesmith does not depend on that inference: its mask also covers padding and every transformers
    version."""
    a, b = random_seqs([11, 13], seed=3)
    batch = collate([a, b], PAD, pack_length=64)
    assert batch.input_ids.shape == (1, 24)
    body = getattr(unwrap(model), unwrap(model).base_model_prefix)
    head = unwrap(model).get_output_embeddings()
    with torch.no_grad():
        alone = solo_logits(model, b)

        def second(mask):
            h = body(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids,
                      use_cache=False).last_hidden_state
            return head(h)[0, 11:]

        leaked = second(torch.ones_like(batch.input_ids))
        assert (leaked - alone).abs().max() > 1e-2  # the second sequence attended to the first
        torch.testing.assert_close(second(batch.attention_mask()), alone, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(second(None), alone, atol=1e-4, rtol=1e-4)


def test_boundary_tokens_are_never_predicted_across_sequences(model):
    seqs = random_seqs(LENGTHS, seed=4, prompt_frac=0.0)  # every token but the first is trained
    batch = collate(seqs, PAD, pack_length=64)
    seq_ids = batch.seq_ids
    trained = batch.labels[:, 1:] != IGNORE
    # the token at position t is predicted from position t-1: both must belong to the same sequence
    assert torch.equal(seq_ids[:, 1:][trained], seq_ids[:, :-1][trained])
    with torch.no_grad():
        logps, seq = token_logps(model, batch, chunk=16)
    assert logps.shape[0] == sum(len(s) - 1 for s in seqs)
    assert torch.bincount(seq, minlength=len(seqs)).tolist() == [len(s) - 1 for s in seqs]


def test_packed_padded_and_alone_give_the_same_sequence_logps(model):
    seqs = random_seqs(LENGTHS, seed=5)
    with torch.no_grad():
        naive = torch.stack([naive_seq_logp(model, s) for s in seqs])
        packed = sequence_logps(model, collate(seqs, PAD, pack_length=40), chunk=8)
        padded = sequence_logps(model, collate(seqs, PAD, pack_length=None), chunk=8)
    torch.testing.assert_close(packed.logp_sum, naive, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(padded.logp_sum, naive, atol=1e-4, rtol=1e-5)
    assert packed.n_tokens.tolist() == [float(sum(x != IGNORE for x in s.labels[1:])) for s in seqs]


def test_packed_gradients_equal_the_sum_of_per_sequence_gradients(model):
    seqs = random_seqs(LENGTHS, seed=6)
    weights = torch.linspace(-1.0, 2.0, len(seqs))  # distinct weights: a leak between sequences shows up
    batch = collate(seqs, PAD, pack_length=48)
    assert rows_with_several_sequences(batch) >= 2
    packed = grads(model, (sequence_logps(model, batch, chunk=8).logp_sum * weights).sum())
    alone = grads(model, sum(w * naive_seq_logp(model, s) for w, s in zip(weights, seqs, strict=True)))
    assert packed.keys() == alone.keys() and len(packed) > 0
    for name in packed:
        torch.testing.assert_close(packed[name], alone[name], atol=1e-5, rtol=1e-4, msg=name)
    assert all(g.abs().sum() > 0 for g in packed.values())


def test_preference_batch_packs_chosen_with_rejected_and_matches_alone(model):
    """The paired methods' collate: chosen sequences get seq ids 0..B-1, rejected B..2B-1, all packed together.
    Log-probs of each, and the gradient of the DPO-style margin, equal those of each sequence alone."""
    dpo = get_method("dpo")
    chosen = random_seqs([15, 22, 9, 30], seed=7, prompt_frac=0.5)
    rejected = random_seqs([12, 25, 18, 8], seed=8, prompt_frac=0.5)
    pairs = [TokenizedPair(c, r) for c, r in zip(chosen, rejected, strict=True)]
    batch = dpo.collate(pairs, PAD, 64)
    assert batch.extra["pairs"] == 4 and batch.n_seqs == 8
    assert rows_with_several_sequences(batch) >= 2 and batch.input_ids.shape[0] < 8
    policy = sequence_logps(model, batch, chunk=5)
    got_c, got_r = policy.split(4)
    want_c = torch.stack([naive_seq_logp(model, s) for s in chosen])
    want_r = torch.stack([naive_seq_logp(model, s) for s in rejected])
    torch.testing.assert_close(got_c.logp_sum, want_c, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got_r.logp_sum, want_r, atol=1e-4, rtol=1e-5)

    margin = lambda c, r: torch.nn.functional.logsigmoid(0.1 * (c - r)).sum()  # noqa: E731
    packed = grads(model, margin(got_c.logp_sum, got_r.logp_sum))
    alone = grads(model, margin(want_c, want_r))
    for name in packed:
        torch.testing.assert_close(packed[name], alone[name], atol=1e-6, rtol=1e-4, msg=name)


def test_padding_rows_are_finite_and_do_not_change_results(model):
    """A row shorter than the batch width is padded; padding attends to itself only (no empty mask row, no NaN)."""
    seqs = random_seqs([30, 4], seed=9)
    batch = collate(seqs, PAD, pack_length=None)
    mask = batch.attention_mask() == 0  # additive mask: 0 = may attend
    assert mask.shape == (2, 1, 30, 30) and bool(mask.any(-1).all())
    with torch.no_grad():
        logits = packed_logits(model, batch)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits[1, :4], solo_logits(model, seqs[1]).detach(), atol=1e-4, rtol=1e-4)
