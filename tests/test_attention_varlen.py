"""model/attention.py: tunesmith's batch layouts as cu_seqlens for a variable-length flash kernel, the per-batch
choice of attention (every branch, with mocked CUDA capabilities), and the varlen path through whole models,
run on CPU with kernels.reference_varlen (the flash kernels exist on CUDA only) and checked against each
sequence alone and against the SDPA-with-mask path: values and gradients, packed and prompt-shared."""

from __future__ import annotations

import math

import pytest
import torch

from speed_utils import PAD, VOCAB, grads, naive_seq_logp, random_seqs, tiny_lora
from test_shared_prompt import random_pairs
from tiny import build_model
from tunesmith.data.batching import collate
from tunesmith.errors import TunesmithError
from tunesmith.methods.logps import sequence_logps
from tunesmith.model import attention, kernels
from tunesmith.model.attention import (
    POLICY,
    VARLEN,
    Capability,
    choose_kernel,
    setup,
    varlen_layout,
    varlen_unusable,
)
from tunesmith.model.kernels import reference_varlen
from tunesmith.model.unwrap import unwrap

CPU = torch.device("cpu")
H100 = Capability("cuda", (9, 0), "bf16", 64, True, ("torch",))


# ---------------------------------------------------------------- layout -> cu_seqlens, worked by hand

def test_padded_rows_become_one_sequence_per_group_and_padding_run():
    layout = varlen_layout(torch.tensor([[0, 0, 0, -1], [1, 1, -1, -1]]))
    assert layout.kind == "padded"
    assert layout.cu_seqlens.tolist() == [0, 3, 4, 6, 8] and layout.cu_seqlens.dtype == torch.int32
    assert layout.max_len == 3 and layout.index is None and layout.inverse is None


def test_packed_row():
    layout = varlen_layout(torch.tensor([[0, 0, 1, 1, 1, -1]]))
    assert layout.kind == "packed" and layout.cu_seqlens.tolist() == [0, 2, 5, 6] and layout.max_len == 3


def test_shared_prompt_is_read_once_per_branch_and_its_outputs_come_from_the_first_copy():
    groups = torch.tensor([[0, 0, 0, 0, 0, 0, 0, -1]])
    branch = torch.tensor([[0, 0, 1, 1, 2, 2, 2, 0]])  # prompt 0-1, branch 1: 2-3, branch 2: 4-6, padding 7
    layout = varlen_layout(groups, branch)
    assert layout.kind == "shared"
    assert layout.index.tolist() == [0, 1, 2, 3, 0, 1, 4, 5, 6, 7]
    assert layout.cu_seqlens.tolist() == [0, 4, 9, 10] and layout.max_len == 5
    assert layout.inverse.tolist() == [0, 1, 2, 3, 6, 7, 8, 9]


def test_layouts_the_mask_cannot_be_cut_into_are_refused():
    assert varlen_layout(torch.tensor([[0, 0, 1, 0]])) is None  # group 0 split by group 1
    assert varlen_layout(torch.tensor([[0, 0, 0]]), torch.tensor([[1, 0, 0]])) is None  # branch before prompt
    assert varlen_layout(torch.tensor([[0, 0, 0, 0]]), torch.tensor([[0, 1, 2, 1]])) is None  # branch split


def _kernel_allowed(layout, n_flat: int) -> torch.Tensor:
    """[n_flat, n_flat] which flat keys each flat token's output attends to, as the kernel computes it."""
    index = layout.index if layout.index is not None else torch.arange(n_flat)
    inverse = layout.inverse if layout.inverse is not None else torch.arange(n_flat)
    seq_of = torch.zeros(index.numel(), dtype=torch.long)
    for s, (a, b) in enumerate(zip(layout.cu_seqlens[:-1].tolist(), layout.cu_seqlens[1:].tolist(), strict=True)):
        seq_of[a:b] = s
    allowed = torch.zeros(n_flat, n_flat, dtype=torch.bool)
    for f in range(n_flat):
        pos = int(inverse[f])
        start = int(layout.cu_seqlens[seq_of[pos]])
        allowed[f, index[start:pos + 1]] = True
    return allowed


@pytest.mark.parametrize("share,pack", [(False, None), (False, 64), (True, None), (True, 48)])
def test_kernel_attention_equals_the_mask_for_every_real_token(share, pack):
    """Independent of any kernel: what the layout lets each token see is exactly what the 4D mask allows."""
    pairs = random_pairs(5, seed=3)
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    batch = collate(seqs, PAD, pack, share=[(i, i + 5) for i in range(5)] if share else ())
    layout = varlen_layout(batch.attn_ids, batch.branch)
    assert layout.kind == ("shared" if share else "packed" if pack else "padded")
    r, t = batch.input_ids.shape
    mask = (batch.attention_mask()[:, 0] == 0)  # [R, T, T]
    want = torch.block_diag(*mask)  # flat [R*T, R*T]: rows never see each other
    got = _kernel_allowed(layout, r * t)
    real = (batch.seq_ids.reshape(-1) >= 0).nonzero().flatten()
    assert torch.equal(got[real][:, real], want[real][:, real])


# ---------------------------------------------------------------- the per-batch choice

@pytest.mark.parametrize("cap,mode,fused,layout,row,want", [
    (H100, "auto", True, "packed", 4096, "torch"),
    (H100, "auto", True, "shared", 100, "torch"),
    (H100, "auto", False, "padded", 100, "torch"),  # the kernel choice does not depend on train.fused
    (H100, "varlen", True, "packed", 100, "torch"),
    (H100, "auto", True, None, 100, "sdpa"),  # a layout varlen cannot express: this batch takes the mask
    (H100, "sdpa", True, "packed", 100, "sdpa"),
    (Capability("cuda", (9, 0), "bf16", 64, True, ("flash_attn",)), "auto", True, "packed", 100, "flash_attn"),
    (Capability("cuda", (9, 0), "bf16", 64, True, ()), "auto", True, "packed", 100, "sdpa"),
    (Capability("cuda", (7, 5), "fp16", 64, True, ("torch",)), "auto", True, "packed", 100, "sdpa"),
    (Capability("cuda", (9, 0), "fp32", 64, True, ("torch",)), "auto", True, "packed", 100, "sdpa"),
    (Capability("cuda", (9, 0), "bf16", 320, True, ("torch",)), "auto", True, "packed", 100, "sdpa"),
    (Capability("cuda", (9, 0), "bf16", 64, False, ("torch",)), "auto", True, "packed", 100, "sdpa"),
    (Capability("cpu", None, "fp32", 64, True, ("torch",)), "auto", True, "packed", 512, "matmul"),
    (Capability("cpu", None, "fp32", 64, True, ()), "auto", True, "packed", 513, "sdpa"),
    (Capability("cpu", None, "fp32", 64, True, ()), "auto", False, "packed", 100, "sdpa"),
    (Capability("cpu", None, "fp32", 64, True, ()), "sdpa", True, "packed", 100, "sdpa"),
    (Capability("cpu", None, "fp32", 64, True, ("reference",)), "auto", True, "shared", 100, "reference"),
])
def test_choose_kernel(cap, mode, fused, layout, row, want):
    assert choose_kernel(cap, mode, fused, layout, row, 512) == want


def test_reasons_name_what_is_missing():
    assert varlen_unusable(H100) is None
    assert "CUDA only" in varlen_unusable(Capability("cpu", None, "bf16", 64, True, ("torch",)))
    assert "no variable-length flash kernel" in varlen_unusable(Capability("cuda", (9, 0), "bf16", 64, True, ()))
    assert "8.0 or newer" in varlen_unusable(Capability("cuda", (7, 5), "fp16", 64, True, ("torch",)))
    assert "precision: fp32" in varlen_unusable(Capability("cuda", (9, 0), "fp32", 64, True, ("torch",)))
    assert "sliding window" in varlen_unusable(Capability("cuda", (9, 0), "bf16", 64, False, ("torch",)))


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    return torch.device("cuda")


def test_setup_on_cuda_picks_the_installed_kernel(fake_cuda, monkeypatch):
    monkeypatch.setattr(attention, "installed_varlen_kernels", lambda: ("torch", "flash_attn"))
    model = tiny_lora()
    assert setup(model, fake_cuda, "bf16").startswith("varlen (torch)")
    policy = getattr(unwrap(model), POLICY)
    assert policy.varlen and policy.capability == Capability("cuda", (9, 0), "bf16", 16, True, ("torch", "flash_attn"))


def test_setup_on_cuda_without_a_kernel_says_what_it_costs(fake_cuda, monkeypatch):
    monkeypatch.setattr(attention, "installed_varlen_kernels", lambda: ())
    with pytest.warns(UserWarning, match=r"no variable-length flash kernel.*\[rows, 1, T, T\] mask"):
        assert setup(tiny_lora(), fake_cuda, "bf16") == "sdpa"
    with pytest.raises(TunesmithError, match="train.attention: varlen cannot run here"):
        setup(tiny_lora(), fake_cuda, "bf16", mode="varlen")


def test_sliding_window_models_keep_the_mask(fake_cuda):
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=16)
    model = MistralForCausalLM(cfg)
    assert not attention.plain_causal_attention(model)
    with pytest.warns(UserWarning, match="sliding window"):
        assert setup(model, fake_cuda, "bf16", kernels=("torch",)) == "sdpa"


def test_liger_head_only_on_cuda_when_installed_and_enabled(fake_cuda, monkeypatch):
    monkeypatch.setattr(attention, "installed_varlen_kernels", lambda: ("torch",))
    for installed, device, enabled, want in [(True, fake_cuda, True, "liger"), (False, fake_cuda, True, None),
                                             (True, fake_cuda, False, None), (True, CPU, True, None)]:
        monkeypatch.setattr(kernels, "liger_linear_ce", lambda i=installed: kernels.reference_linear_ce if i else None)
        model = tiny_lora()
        setup(model, device, "bf16" if device.type == "cuda" else "fp32", liger=enabled)
        assert getattr(unwrap(model), POLICY).head_ce == want


# ---------------------------------------------------------------- the torch kernel across torch releases

def _fake_varlen(accepts: set[str]):
    """A stand-in for torch.nn.attention.varlen.varlen_attn with the keywords of one torch release, computing
    what that release would (default scale 1/sqrt(D), no grouped heads unless enable_gqa)."""
    seen = {}

    def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
        assert set(kw) <= accepts, kw
        seen.update(kw)
        causal = kw.get("window_size") == (-1, 0) or kw.get("is_causal", False)
        assert causal and torch.equal(cu_q, cu_k)
        if not kw.get("enable_gqa"):
            assert k.shape[1] == q.shape[1]
        return reference_varlen(q, k, v, cu_q, max_q, kw.get("scale", 1 / math.sqrt(q.shape[-1])))

    return varlen_attn, seen


@pytest.mark.parametrize("release,accepts", [
    ("2.10", {"is_causal", "return_aux"}),
    ("2.11", {"window_size", "scale", "return_aux"}),
    ("2.13", {"window_size", "scale", "enable_gqa", "return_aux"}),
])
def test_torch_varlen_adapts_to_each_release(monkeypatch, release, accepts):
    import inspect

    import torch.nn.attention.varlen as varlen_module

    fake, seen = _fake_varlen(accepts)
    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD)
              for n in ("query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k")]
    params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in sorted(accepts)]
    fake.__signature__ = inspect.Signature(params)
    monkeypatch.setattr(varlen_module, "varlen_attn", fake)
    kernels.torch_varlen.cache_clear()
    try:
        kernel = kernels.torch_varlen()
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(9, heads, 8, generator=g, dtype=torch.float64) for heads in (4, 2, 2))
        cu = torch.tensor([0, 4, 9], dtype=torch.int32)
        torch.testing.assert_close(kernel(q, k, v, cu, 5, 0.3), reference_varlen(q, k, v, cu, 5, 0.3))
        assert ("enable_gqa" in seen) == (release == "2.13")
    finally:
        kernels.torch_varlen.cache_clear()


def test_reference_varlen_equals_sdpa_per_sequence():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(11, heads, 8, generator=g) for heads in (6, 2, 2))
    cu = torch.tensor([0, 3, 11], dtype=torch.int32)
    out = reference_varlen(q, k, v, cu, 8, 0.25)
    for a, b in ((0, 3), (3, 11)):
        want = torch.nn.functional.scaled_dot_product_attention(
            q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), is_causal=True, scale=0.25,
            enable_gqa=True).transpose(0, 1)
        torch.testing.assert_close(out[a:b], want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- whole models through the varlen path

def _varlen_model(seed: int):
    model = tiny_lora(seed=seed)
    assert setup(model, CPU, "fp32", kernels=("reference",)).startswith("varlen (reference)")
    return model


@pytest.mark.parametrize("share", [False, True])
def test_varlen_model_equals_each_sequence_alone_and_the_mask_path(share):
    plain, fast = tiny_lora(seed=4), _varlen_model(seed=4)
    pairs = random_pairs(4, seed=8)
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    batch = collate(seqs, PAD, pack_length=64, share=[(i, i + 4) for i in range(4)] if share else ())
    got = sequence_logps(fast, batch)
    policy = getattr(unwrap(fast), POLICY)
    assert policy.used == {"reference": 1} and unwrap(fast).config._attn_implementation == VARLEN
    alone = torch.stack([naive_seq_logp(plain, s) for s in seqs])
    torch.testing.assert_close(got.logp_sum, alone, atol=1e-4, rtol=1e-5)
    want = grads(plain, sequence_logps(plain, batch).logp_sum.sum())  # SDPA with the 4D mask
    have = grads(fast, sequence_logps(fast, batch).logp_sum.sum())
    for name in want:
        torch.testing.assert_close(have[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


def test_a_batch_varlen_cannot_take_falls_back_to_the_mask():
    model = _varlen_model(seed=5)
    batch = collate(random_seqs([7, 9], seed=2), PAD, pack_length=None)
    batch.attn_ids = torch.tensor([[0, 0, 1, 1, 0, 0, 0, -1, -1], [2] * 9])  # group 0 split: not a varlen layout
    sequence_logps(model, batch)
    assert getattr(unwrap(model), POLICY).used == {"matmul": 1}


def test_generation_after_varlen_training_uses_sdpa_with_a_proper_mask(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    fresh = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    setup(model, CPU, "fp32", kernels=("reference",))
    sequence_logps(model, collate(random_seqs([5, 8], seed=1, ), PAD, pack_length=16))
    assert model.config._attn_implementation == VARLEN  # left as the last batch chose it
    ids = tok(["hello world how are", "the quick"], return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(model.generate(**ids, **kwargs), fresh.generate(**ids, **kwargs))


def test_fused_cross_entropy_head_gives_the_checkpointed_heads_values_and_gradients(monkeypatch):
    """A trained head (full fine-tuning) through the fused linear cross-entropy interface that Liger
    implements, here with its plain-torch reference: same log-probs and gradients as the chunked path."""
    calls = []
    reference = kernels.reference_linear_ce
    monkeypatch.setattr(kernels, "reference_linear_ce", lambda *a: calls.append(1) or reference(*a))
    plain, fused = build_model(vocab_size=VOCAB, seed=3), build_model(vocab_size=VOCAB, seed=3)
    setup(fused, CPU, "fp32", fused=False)
    getattr(fused, POLICY).head_ce = "reference"
    batch = collate(random_seqs([12, 20, 9], seed=6), PAD, pack_length=48)
    lp_plain, lp_fused = sequence_logps(plain, batch), sequence_logps(fused, batch)
    torch.testing.assert_close(lp_fused.logp_sum, lp_plain.logp_sum, atol=1e-4, rtol=1e-5)
    assert calls == [1]
    weights = torch.tensor([1.0, -2.0, 0.5])  # any loss of the log-probs, not only their sum
    loss_p, loss_f = (lp_plain.logp_sum * weights).sum(), (lp_fused.logp_sum * weights).sum()
    gp = torch.autograd.grad(loss_p, [plain.lm_head.weight, plain.model.layers[0].mlp.up_proj.weight])
    gf = torch.autograd.grad(loss_f, [fused.lm_head.weight, fused.model.layers[0].mlp.up_proj.weight])
    for a, b in zip(gp, gf, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(kernels.torch_varlen() is None, reason="this torch has no torch.nn.attention.varlen")
@pytest.mark.parametrize("share", [False, True])
def test_torchs_own_varlen_kernel_takes_the_models_tensors(fake_cuda, share):
    """The flash kernel itself runs on CUDA only, but its fake (meta-tensor) implementation checks what it is
    given: tunesmith's whole attention path with the real torch op, bf16 weights on the meta device, forward
    and backward, on a mocked sm_90 GPU."""
    from tunesmith.model.attention import attention_inputs

    model = build_model(vocab_size=VOCAB, seed=0).to(torch.bfloat16)
    assert setup(model, fake_cuda, "bf16", kernels=("torch",)).startswith("varlen (torch)")
    model.to("meta")
    pairs = random_pairs(3, seed=4)
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    batch = collate(seqs, PAD, pack_length=64, share=[(i, i + 3) for i in range(3)] if share else ())
    for name in ("input_ids", "labels", "position_ids", "seq_ids"):  # groups stay on the CPU for the layout
        setattr(batch, name, getattr(batch, name).to("meta"))
    h = model.model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                    **attention_inputs(model, batch)).last_hidden_state  # what logps.hidden_states runs
    assert h.shape == (*batch.input_ids.shape, 64) and h.device.type == "meta" and h.dtype == torch.bfloat16
    assert getattr(model, POLICY).used == {"torch": 1} and model.config._attn_implementation == VARLEN
    h.float().sum().backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad.shape == (64, 64)
