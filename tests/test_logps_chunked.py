"""Chunked log-probs (`methods.logps`): the LM head and log-softmax run only on trained positions, a chunk at a
time under activation checkpointing. Checked against the naive computation — full [rows, T, vocab] logits,
log-softmax, gather — for the per-sequence sums and for the gradients w.r.t. the LoRA weights and the hidden
states, at chunk sizes from 1 to larger than the number of trained tokens. A dispatch mode that sees every
tensor the forward and backward create shows that no [trained tokens x vocab] tensor ever exists."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from speed_utils import PAD, VOCAB, lora_params, random_seqs, tiny_lora
from tunesmith.data.batching import collate
from tunesmith.data.render import IGNORE
from tunesmith.methods.logps import sequence_logps
from tunesmith.model.unwrap import unwrap

LENGTHS = [19, 33, 8, 26, 14]


@pytest.fixture(scope="module")
def model():
    return tiny_lora(seed=1).eval()


def naive_sequence_logps(model, batch) -> torch.Tensor:
    """Per-sequence sums from the full logits of the model's own forward."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask(),
                   position_ids=batch.position_ids, use_cache=False).logits
    logp = logits.float().log_softmax(-1)[:, :-1]
    labels = batch.labels[:, 1:]
    trained = labels != IGNORE
    per_token = logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)[trained]
    seq = batch.seq_ids[:, 1:][trained]
    return torch.zeros(batch.n_seqs).index_add(0, seq, per_token)


def value_and_grads(model, batch, compute) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """Weighted sum of the per-sequence log-probs; its gradients w.r.t. the LoRA weights and w.r.t. the final
    hidden states (output of the last norm, captured by a hook)."""
    captured = {}
    norm = getattr(unwrap(model), unwrap(model).base_model_prefix).norm

    def keep(module, inputs, output):
        output.retain_grad()
        captured["h"] = output

    handle = norm.register_forward_hook(keep)
    try:
        sums = compute(model, batch)
        weights = torch.linspace(0.5, 1.5, batch.n_seqs)
        (sums * weights).sum().backward()
    finally:
        handle.remove()
    params = lora_params(model)
    g = {n: p.grad.clone() for n, p in params.items()}
    for p in params.values():
        p.grad = None
    return sums.detach(), g, captured["h"].grad.clone()


@pytest.fixture(scope="module")
def batch():
    return collate(random_seqs(LENGTHS, seed=11), PAD, pack_length=48)


@pytest.fixture(scope="module")
def naive(model, batch):
    return value_and_grads(model, batch, naive_sequence_logps)


@pytest.mark.parametrize("chunk", [1, 7, 32, "all", "more"])
def test_chunked_sums_and_gradients_equal_the_full_logits(model, batch, naive, chunk):
    n = batch.n_target_tokens
    size = {"all": n, "more": n + 50}.get(chunk, chunk)
    sums, g, g_hidden = value_and_grads(model, batch, lambda m, b: sequence_logps(m, b, size).logp_sum)
    want_sums, want_g, want_hidden = naive
    torch.testing.assert_close(sums, want_sums, atol=1e-4, rtol=1e-5)
    assert g.keys() == want_g.keys() and len(g) > 0
    for name in g:
        torch.testing.assert_close(g[name], want_g[name], atol=1e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(g_hidden, want_hidden, atol=1e-6, rtol=1e-4)
    assert g_hidden.abs().sum() > 0


class LargestTensors(TorchDispatchMode):
    """Records the largest tensor any (non-view) op creates, overall and among those with a vocab-sized dim."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.largest, self.largest_vocab = vocab, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
                    if self.vocab in t.shape:
                        self.largest_vocab = max(self.largest_vocab, t.numel())
        return out


def largest_tensors(model, batch, compute) -> LargestTensors:
    with LargestTensors(VOCAB) as seen:
        compute(model, batch).sum().backward()
    for p in lora_params(model).values():
        p.grad = None
    return seen


def test_no_tokens_by_vocab_tensor_exists_with_chunks(model):
    for lengths in (LENGTHS, LENGTHS * 3):  # three times the trained tokens: the chunked peak stays put
        batch = collate(random_seqs(lengths, seed=12), PAD, pack_length=64)
        n = batch.n_target_tokens
        assert n > 3 * 16  # chunk < trained tokens
        chunked = largest_tensors(model, batch, lambda m, b: sequence_logps(m, b, 16).logp_sum)
        assert chunked.largest < n * VOCAB
        assert chunked.largest_vocab == 16 * VOCAB  # one chunk's logits (forward, and again in the backward)
        naive = largest_tensors(model, batch, naive_sequence_logps)
        assert naive.largest_vocab >= n * VOCAB  # the [rows, T, vocab] logits
        assert naive.largest_vocab >= batch.input_ids.numel() * VOCAB


def test_dispatch_mode_sees_the_backward_pass(model):
    """The memory test is only meaningful if the recorder also sees backward ops: the head's logits are made
    again in the backward (the frozen head keeps none of them), and that one-chunk tensor must be recorded."""
    batch = collate(random_seqs([30], seed=13), PAD, pack_length=None)
    seen_forward = LargestTensors(VOCAB)
    with seen_forward, torch.no_grad():
        sequence_logps(model, batch, 4)
    sums = sequence_logps(model, batch, 4).logp_sum
    with LargestTensors(VOCAB) as seen_backward:
        sums.sum().backward()
    for p in lora_params(model).values():
        p.grad = None
    assert seen_backward.largest_vocab == 4 * VOCAB
    assert seen_forward.largest_vocab == 4 * VOCAB


def test_frozen_head_function_gradcheck():
    from tunesmith.methods.logps import FrozenHeadLogps

    g = torch.Generator().manual_seed(15)
    h = torch.randn(5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(11, 6, dtype=torch.float64, generator=g)
    targets = torch.tensor([0, 3, 10, 3, 7])
    assert torch.autograd.gradcheck(lambda h: FrozenHeadLogps.apply(h, w, targets), (h,))
    want = torch.log_softmax(h @ w.T, -1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(FrozenHeadLogps.apply(h, w, targets), want)


def test_a_trained_head_goes_through_checkpointed_chunks(model):
    """Full fine-tuning trains the head: the chunked path (checkpointed) gives the naive head gradient."""
    head = unwrap(model).get_output_embeddings()
    head.weight.requires_grad_(True)
    try:
        batch = collate(random_seqs(LENGTHS, seed=16), PAD, pack_length=64)
        got = torch.autograd.grad(sequence_logps(model, batch, 8).logp_sum.sum(), head.weight)[0]
        want = torch.autograd.grad(naive_sequence_logps(model, batch).sum(), head.weight)[0]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    finally:
        head.weight.requires_grad_(False)
        head.weight.grad = None
