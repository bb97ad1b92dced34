"""The plan's memory model, part by part: hand-computed values, and the real tensors of a tiny model (its
bitsandbytes NF4 storage, PEFT adapters, torch's AdamW states, and what autograd keeps during a real step)."""

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from tunesmith.config import AdapterConfig
from tunesmith.data.batching import collate
from tunesmith.data.render import IGNORE, Tokenized
from tunesmith.methods.logps import sequence_logps
from tunesmith.model.adapters import (
    apply_adapter,
    enable_gradient_checkpointing,
    optimizer_param_groups,
    resolve_targets,
    trainable_summary,
)
from tunesmith.model.device import Runtime
from tunesmith.model.load import load_model_and_tokenizer
from tunesmith.model.quantize import base_footprint_bytes
from tunesmith.plan import memory
from tunesmith.plan.architecture import load_architecture
from tunesmith.train.recipe import base_dtype, choose_attention

# ---------------------------------------------------------------- hand-computed values

def test_nf4_bytes_by_hand():
    # 64,000 weights = 1,000 blocks of 64: 32,000 packed bytes, fp32 absmax per block, the 16-entry fp32 code
    assert memory.nf4_bytes(64_000, double_quant=False) == 32_000 + 4 * 1_000 + 64
    # double quantisation: one byte per block, an fp32 offset, fp32 absmax per 256 blocks (4 groups), 256-entry code
    assert memory.nf4_bytes(64_000, double_quant=True) == 32_000 + 1_000 + 4 + 4 * 4 + 1024 + 64
    # per weight on a large tensor: 4.5 bits without, about 4.127 bits with double quantisation
    n = 64 * 2**20
    assert memory.nf4_bytes(n, False) * 8 / n == pytest.approx(4.5, abs=1e-4)
    assert memory.nf4_bytes(n, True) * 8 / n == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=2e-4)


def test_adamw_states_by_hand():
    assert memory.adamw_state_bytes(1_000) == 8_000  # two fp32 moments
    assert memory.adamw_state_bytes(10_240, "adamw_8bit") == 2 * (10_240 + 4 * 40)  # bytes + fp32 scale / 256
    assert memory.adamw_state_bytes(1_000, "adamw_8bit") == 8_000  # under 4096 weights: 32-bit states


def test_torch_adamw_keeps_two_fp32_moments_per_weight():
    w = torch.nn.Parameter(torch.randn(100, 30))
    opt = torch.optim.AdamW([w])
    w.sum().backward()
    opt.step()
    state = opt.state[w]
    held = state["exp_avg"].nbytes + state["exp_avg_sq"].nbytes
    assert held == memory.adamw_state_bytes(w.numel())


# ---------------------------------------------------------------- against a real tiny model

def _setting(arch, kind, precision="fp32", **kw):
    targets = () if kind == "full" else tuple(resolve_targets(arch.meta_model, "all-linear"))
    return memory.Setting(kind, precision, targets=targets, **kw)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("embeddings", [True, False])
def test_weights_match_the_loaded_base(tiny_dir, double_quant, embeddings):
    arch = load_architecture(str(tiny_dir))
    for kind in ("lora", "qlora"):
        s = _setting(arch, kind, double_quant=double_quant, embeddings_4bit=embeddings)
        model, _ = load_model_and_tokenizer(str(tiny_dir), quantize_nf4=kind == "qlora", double_quant=double_quant,
                                            quantize_embeddings=embeddings)
        assert sum(memory.weight_bytes(arch, s).values()) == base_footprint_bytes(model), kind


@pytest.mark.parametrize("kind", ["lora", "dora", "full"])
def test_trainable_weights_match_peft(tiny_dir, kind):
    arch = load_architecture(str(tiny_dir))
    model, _ = load_model_and_tokenizer(str(tiny_dir))
    model = apply_adapter(model, AdapterConfig(kind=kind))
    s = _setting(arch, kind)
    assert memory.trainable_numel(arch, s) == trainable_summary(model)["trainable"]
    opt = torch.optim.AdamW(optimizer_param_groups(model, AdapterConfig(kind=kind), 1e-3, 0.0))
    assert memory.optimizer_bytes(arch, s) == 8 * trainable_summary(model)["trainable"]
    del opt


class LiveBytes(TorchDispatchMode):
    """Bytes of live tensor storage, updated after every op the forward and backward run; `peak` is the most."""

    def __init__(self, existing=()):
        super().__init__()
        self.live, self.now, self.peak = WeakIdKeyDictionary(), 0, 0
        for t in existing:
            self._add(t)
        self.base = self.now

    def _add(self, t):
        storage = t.untyped_storage()
        if storage in self.live:
            return
        self.live[storage] = n = storage.nbytes()
        self.now += n
        weakref.finalize(storage, self._free, n)

    def _free(self, n):
        self.now -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t)
        self.peak = max(self.peak, self.now)
        return out


def _batch(rows, width, vocab, trained_from=0):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (rows, width), generator=g).tolist()
    seqs = [Tokenized(tuple(x), tuple([IGNORE] * trained_from + x[trained_from:])) for x in ids]
    return collate(seqs, 0, None)


def _measure(tiny_dir, kind, ckpt, precision="fp32", rows=2, width=48, chunk=1024):
    """Live bytes after a real forward and at the peak of the second training step (states exist)."""
    adapter = AdapterConfig(kind=kind)
    rt = Runtime(torch.device("cpu"), precision)
    model, tok = load_model_and_tokenizer(str(tiny_dir), precision=precision, dtype=base_dtype_of(kind, precision),
                                          quantize_nf4=kind == "qlora")
    model = apply_adapter(model, adapter)
    if ckpt:
        enable_gradient_checkpointing(model)
    choose_attention(model, rt)
    model.train()
    opt = torch.optim.AdamW(optimizer_param_groups(model, adapter, 1e-3, 0.0))
    batch = _batch(rows, width, len(tok))

    def step(marks=None, mode=None):
        with rt.autocast():
            out = sequence_logps(model, batch, chunk)
        if marks is not None:
            marks["forward"] = mode.now - mode.base
        (-out.logp_sum.sum()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    from tunesmith.model.quantize import _quant_state_tensors

    existing = list(model.parameters()) + list(model.buffers()) + \
        [t for p in model.parameters() for t in _quant_state_tensors(p)] + \
        [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    marks = {}
    with LiveBytes(existing) as mode:
        step(marks, mode)
    return mode.base, marks["forward"], mode.peak, batch


def base_dtype_of(kind, precision):
    from tunesmith.config import RunConfig

    return base_dtype(RunConfig(adapter=kind, data={"train": "x"}), precision)


@pytest.mark.parametrize("kind,ckpt,precision", [
    ("lora", False, "fp32"), ("dora", False, "fp32"), ("full", False, "fp32"), ("qlora", False, "fp32"),
    ("lora", True, "fp32"), ("full", True, "fp32"), ("lora", False, "bf16"), ("full", False, "bf16"),
    ("qlora", False, "bf16")])
def test_activations_and_peak_match_a_real_step(tiny_dir, kind, ckpt, precision):
    """What the model predicts the forward keeps, and the step's peak, against the live tensors of a real step of
    the tiny model (2 layers, hidden 64), in fp32 and under bf16 autocast: the static part exactly, activations
    and peak within 10%."""
    static, forward, peak, batch = _measure(tiny_dir, kind, ckpt, precision)
    arch = load_architecture(str(tiny_dir))
    s = _setting(arch, kind, precision, grad_checkpointing=ckpt)
    shape = memory.BatchShape(*batch.input_ids.shape, batch.n_target_tokens)
    m = memory.step_memory(arch, s, shape)
    predicted_static = sum(m.weights.values()) + m.optimizer + (0 if kind == "full" else m.trainable * 4)
    assert predicted_static == pytest.approx(static, rel=0.01)
    assert m.activations_total == pytest.approx(forward, rel=0.10), m.activations
    assert m.peak == pytest.approx(peak, rel=0.10), (m.phases, peak)


def test_checkpointing_keeps_only_layer_inputs():
    arch = _fake_arch()
    s = memory.Setting("lora", "bf16", targets=tuple(x.name for x in arch.linears), grad_checkpointing=True)
    b = memory.BatchShape(4, 256, 100)
    saved = memory.saved_activations(arch, s, b)
    # bf16 stream: 2 bytes x hidden per position per layer
    assert saved["layer inputs (checkpointed)"] == arch.layers * 4 * 256 * arch.hidden * 2


def test_cpu_heap_slack_by_case():
    """glibc's retained heap (plan/core.heap_slack): a share of the saved activations; under checkpointing a
    share of what the step would save without it; QLoRA adds a share of its weights dequantised in fp32."""
    from dataclasses import replace

    from tunesmith.plan import core

    arch = _fake_arch()
    s = memory.Setting("lora", "fp32", targets=tuple(x.name for x in arch.linears))
    b = memory.BatchShape(4, 256, 100)
    plain = memory.step_memory(arch, s, b)
    assert core.heap_slack(arch, s, plain, b, 1, "none") == round(0.85 * plain.activations_total)
    ckpt = replace(s, grad_checkpointing=True)
    mem = memory.step_memory(arch, ckpt, b)
    assert mem.activations_total < plain.activations_total / 10  # checkpointing keeps little ...
    assert core.heap_slack(arch, ckpt, mem, b, 1, "none") == round(0.55 * plain.activations_total)  # ... the heap more
    q = replace(s, adapter="qlora")
    qmem = memory.step_memory(arch, q, b)
    dequantised = arch.linear_numel * 4  # every 4-bit weight as an fp32 matrix
    assert core.heap_slack(arch, q, qmem, b, 1, "none") == round(0.85 * qmem.activations_total + 0.65 * dequantised)


def test_parallel_memory_per_rank():
    arch = _fake_arch()
    s = memory.Setting("full", "bf16", device="cuda")
    b = memory.BatchShape(1, 128, 64)
    one = memory.step_memory(arch, s, b)
    ddp = memory.step_memory(arch, s, b, world=4, parallel="ddp")
    fsdp = memory.step_memory(arch, s, b, world=4, parallel="fsdp")
    assert ddp.extra["gradient buckets"] == one.trainable * 4  # a second copy of the gradients
    assert ddp.peak > one.peak
    # FSDP2: weights, gradients and states divided by 4, plus two unsharded layers and the unsharded embedding
    assert fsdp.optimizer == one.optimizer // 4 and fsdp.gradients == one.gradients // 4
    assert fsdp.extra["unsharded layers (current + prefetch)"] == 2 * arch.layer_numel() * 2  # gathered in bf16
    assert fsdp.peak < one.peak


def _fake_arch():
    from tunesmith.plan.architecture import Linear

    layers, d, ff = 4, 256, 512
    linears = []
    for i in range(layers):
        for name, (a, b) in {"q_proj": (d, d), "k_proj": (d, 64), "v_proj": (d, 64), "o_proj": (d, d),
                             "gate_proj": (d, ff), "up_proj": (d, ff), "down_proj": (ff, d)}.items():
            group = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
                     "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_out"}[name]
            linears.append(Linear(f"model.layers.{i}.{name}", a, b, False, group, i))
    from tunesmith.plan.architecture import Architecture

    return Architecture("fake", "test", "llama", 1000, d, ff, layers, 4, 1, 64, True, linears, 1000 * d, 0,
                        (2 * layers + 1) * d, 2, True, True, 2)


def test_flops_by_hand():
    from tunesmith.plan.flops import SeqStats, Shapes, forward_flops, recompute_flops, training_flops

    s = Shapes(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=512)  # head dim 16, kv width 32
    n = 2 * (64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 64 * 128 + 64 * 128 + 128 * 64)
    assert s.n_linear == n
    seqs = SeqStats((10,), (3,))  # 10 tokens, 55 causal pairs, 3 trained positions
    lora = (4 * n + 6 * s.n_lora(4)) * 10 + 4 * 512 * 64 * 3 + 12 * 64 * 55 * 2
    assert training_flops(s, seqs, lora_r=4) == lora
    assert training_flops(s, seqs, lora_r=None) == 6 * n * 10 + 6 * 512 * 64 * 3 + 12 * 64 * 55 * 2
    assert forward_flops(s, seqs) == 2 * n * 10 + 2 * 512 * 64 * 3 + 4 * 64 * 55 * 2
    assert recompute_flops(s, seqs) == 2 * n * 10 + 4 * 64 * 55 * 2
    # a set head_dim (Gemma-2: 16 heads of 256 on a 3584-wide model) sizes q and o by heads x head_dim
    g = Shapes(hidden=3584, intermediate=14336, layers=1, heads=16, kv_heads=8, vocab=8, head_dim_=256)
    assert g.linears()[0] == (3584, 4096) and g.linears()[3] == (4096, 3584)
