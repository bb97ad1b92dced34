"""model/fused.py: the RMSNorm, SwiGLU and attention that keep less for the backward pass compute the same
values and gradients as transformers' own modules (fp32: to rounding; bf16: to bf16 rounding), and a model
with all of them gives the same log-probs, gradients and training run."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, eager_attention_forward

from speed_utils import PAD, grads, naive_seq_logp, random_seqs, tiny_lora
from tiny import build_model
from tunesmith.data.batching import collate
from tunesmith.methods.logps import sequence_logps
from tunesmith.model.device import make_runtime
from tunesmith.model.fused import (
    AttentionFn,
    SiluMulFn,
    fuse,
    lora_inputs_uncast,
    mlp_forward,
    rms_norm_forward,
)
from tunesmith.model.unwrap import unwrap
from tunesmith.train.recipe import choose_attention


def _grads_of(fn, *tensors):
    out = fn(*tensors)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out.dtype)
    return [out] + list(torch.autograd.grad((out.float() * g.float()).sum(), tensors))


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_rms_norm_matches_transformers(dtype, tol):
    norm = LlamaRMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(48) + 0.5)
    norm = norm.to(dtype)
    x = torch.randn(3, 7, 48, generator=torch.Generator().manual_seed(0)).to(dtype)
    a, b = _leaf(x), _leaf(x)
    want = _grads_of(lambda t: norm(t), a) + [torch.autograd.grad(norm(a).float().sum(), norm.weight)[0]]
    fused = lambda t: rms_norm_forward(norm, t)  # noqa: E731
    got = _grads_of(fused, b) + [torch.autograd.grad(fused(b).float().sum(), norm.weight)[0]]
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g.float(), w.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_swiglu_matches_transformers(dtype, tol):
    from transformers import LlamaConfig

    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=80, hidden_act="silu")).to(dtype)
    x = torch.randn(2, 5, 32).to(dtype)
    a, b = _leaf(x), _leaf(x)
    want = _grads_of(mlp, a)
    got = _grads_of(lambda t: mlp_forward(mlp, t), b)
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g.float(), w.float(), atol=tol, rtol=tol)
    gate, up = torch.randn(4, 6, dtype=torch.float64, requires_grad=True), torch.randn(4, 6, dtype=torch.float64,
                                                                                      requires_grad=True)
    assert torch.autograd.gradcheck(SiluMulFn.apply, (gate, up))


class _Module:
    num_key_value_groups = 3
    training = True


def _block_mask(lengths, t):
    seq = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)] + [torch.full((t - sum(lengths),), -1)])
    allowed = (seq[:, None] == seq[None, :]) & torch.ones(t, t, dtype=torch.bool).tril() | torch.eye(t, dtype=bool)
    return torch.zeros(1, 1, t, t).masked_fill(~allowed, torch.finfo(torch.float32).min)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_attention_matches_eager_with_grouped_heads_and_a_block_mask(dtype, tol):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, h, 11, 8, generator=g).to(dtype) for h in (6, 2, 2))
    mask = _block_mask([4, 5], 11).expand(2, 1, 11, 11)
    eager = lambda q, k, v: eager_attention_forward(_Module, q, k, v, mask, 0.3)[0]  # noqa: E731
    ours = lambda q, k, v: AttentionFn.apply(q, k, v, mask, 0.3).transpose(1, 2)  # noqa: E731
    want = _grads_of(eager, *map(_leaf, (q, k, v)))
    got = _grads_of(ours, *map(_leaf, (q, k, v)))
    for w, gt in zip(want, got, strict=True):
        torch.testing.assert_close(gt.float(), w.float(), atol=tol, rtol=tol)


def test_a_decoding_step_takes_the_matmul_attention_and_matches_sdpa(monkeypatch):
    """One query per row against a cache with padding (what the GRPO sampler's decode steps send)."""
    from transformers.integrations import sdpa_attention

    from tunesmith.model.fused import attention_forward

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(3, h, t, 8, generator=g) for h, t in ((6, 1), (2, 9), (2, 9)))
    mask = torch.zeros(3, 1, 1, 9)
    mask[0, ..., :4] = torch.finfo(torch.float32).min  # a left-padded row
    want = sdpa_attention.sdpa_attention_forward(_Module, q, k, v, mask, scaling=0.3)[0]
    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", lambda *a, **kw: pytest.fail("took SDPA"))
    got = attention_forward(_Module, q, k, v, mask, scaling=0.3)[0]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_attention_gradcheck_float64():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, h, 5, 4, generator=g, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
    mask = _block_mask([2, 3], 5).double()
    assert torch.autograd.gradcheck(lambda q, k, v: AttentionFn.apply(q, k, v, mask, 0.5), (q, k, v))


def test_fused_model_gives_the_same_logps_and_gradients():
    plain, fused = tiny_lora(seed=4).eval(), tiny_lora(seed=4).eval()
    counts = fuse(fused)
    assert counts == {"rms_norm": 5, "mlp": 2, "lora": 14}  # 2 layers x (2 norms, 1 MLP, 7 LoRA linears) + final norm
    choose_attention(fused, make_runtime("cpu", "fp32", threads=1))
    seqs = random_seqs([9, 23, 14, 31], seed=5)
    batch = collate(seqs, PAD, pack_length=48)
    want = sequence_logps(plain, batch)
    got = sequence_logps(fused, batch)
    torch.testing.assert_close(got.logp_sum, want.logp_sum, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got.logp_sum, torch.stack([naive_seq_logp(plain, s) for s in seqs]),
                               atol=1e-4, rtol=1e-5)
    gw = grads(plain, sequence_logps(plain, batch).logp_sum.sum())
    gf = grads(fused, sequence_logps(fused, batch).logp_sum.sum())
    for name in gw:
        torch.testing.assert_close(gf[name], gw[name], atol=1e-5, rtol=1e-4, msg=name)


def test_lora_inputs_uncast_is_bit_identical_under_autocast():
    model = tiny_lora(seed=6).eval()
    base = unwrap(model)
    for name, p in base.named_parameters():
        if "lora_" not in name:
            p.data = p.data.to(torch.bfloat16)  # a bf16 frozen base with fp32 adapters, as training keeps it
    batch = collate(random_seqs([12, 17], seed=7), PAD, pack_length=None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = sequence_logps(model, batch, chunk=4)  # hidden_states switches the casts off ...
        layers = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
        assert layers and all(m.cast_input_dtype_enabled for m in layers)  # ... and back on afterwards
        for m in layers:
            m.cast_input_dtype_enabled = True
        with torch.no_grad():
            h_on = base.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask(),
                              position_ids=batch.position_ids).last_hidden_state
            with lora_inputs_uncast(model):
                h_off = base.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask(),
                                   position_ids=batch.position_ids).last_hidden_state
    assert torch.equal(h_on, h_off)
    assert torch.isfinite(cast.logp_sum).all()


def test_training_with_and_without_fused_gives_the_same_run(tiny_dir, tmp_path):
    import tunesmith
    from pref_utils import quiet, steps, write_jsonl

    rows = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
            for w in ["hello world", "quick brown fox", "lazy dog", "card balance", "top up", "refund"] * 2]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    losses = {}
    for fused in (True, False):
        cfg = {"name": f"f{fused}", "output_dir": str(tmp_path / "runs"), "model": str(tiny_dir), "device": "cpu",
               "precision": "fp32", "method": "sft", "data": {"train": str(data), "max_length": 64},
               "train": {"max_steps": 4, "micro_batch_size": 4, "lr": 3e-3, "warmup_ratio": 0.0, "fused": fused}}
        losses[fused] = [r["loss"] for r in steps(tunesmith.train(cfg, progress=False, console=quiet()[0]))]
    assert losses[True] == pytest.approx(losses[False], abs=2e-5)
    assert losses[True][-1] < losses[True][0]


def test_build_model_norms_are_the_known_kind():
    """fuse() only touches module classes it knows; the tiny test model must be one of them."""
    assert type(build_model(vocab_size=64).model.norm).__name__ == "LlamaRMSNorm"


def _bf16_close(a: torch.Tensor, b: torch.Tensor, rel: float = 0.05) -> None:
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert (a.float() - b.float()).norm() <= rel * b.float().norm(), ((a - b).abs().max(), b.abs().max())


def test_full_fine_tuning_under_autocast_mixes_dtypes_and_still_matches():
    """fp32 trainable weights under bf16 autocast: q and k leave RoPE in fp32 while v is bf16."""
    plain, fused = build_model(vocab_size=512, seed=8), build_model(vocab_size=512, seed=8)
    choose_attention(fused, make_runtime("cpu", "bf16", threads=1))
    batch = collate(random_seqs([20, 33, 12], seed=9), PAD, pack_length=64)
    out = {}
    for name, model in (("plain", plain), ("fused", fused)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = -sequence_logps(model, batch).logp_sum.sum()
        loss.backward()
        out[name] = (loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(out["fused"][0], out["plain"][0], rtol=2e-2, atol=0)
    _bf16_close(out["fused"][1], out["plain"][1])


def test_lora_on_a_bf16_base_without_autocast_takes_peft_path():
    """Generation after training may run without autocast: bf16 base, fp32 adapters, mixed dtypes."""
    plain, fused = tiny_lora(seed=10).eval(), tiny_lora(seed=10).eval()
    for model in (plain, fused):
        for name, p in model.named_parameters():
            if "lora_" not in name:
                p.data = p.data.to(torch.bfloat16)
    fuse(fused)
    ids = torch.randint(4, 500, (2, 9), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        want, got = plain(input_ids=ids).logits, fused(input_ids=ids).logits
    torch.testing.assert_close(got, want)
