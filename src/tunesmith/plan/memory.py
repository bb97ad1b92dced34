"""The memory model: what a training step of tunesmith holds, part by part, as pure functions of the model's
dimensions, the run's settings and one micro-batch's shape. Every number is bytes.

What is modelled is what tunesmith's code keeps (checked against what autograd saves, tests/test_plan_memory.py):
  - weights in their storage dtype: frozen bases in the compute precision, trained weights in fp32, NF4 as
    bitsandbytes stores it (4-bit pairs packed in bytes, one absmax per block of 64 weights, or with double
    quantisation one byte per block plus an fp32 scale per 256 blocks, and the code books), the 4-bit
    embedding/head counted once when tied;
  - trained weights' gradients (fp32) and AdamW's two fp32 moments (8-bit AdamW: one byte each plus an fp32
    scale per 256 weights, fp32 for tensors under 4096 weights);
  - activations per token and layer as the fused layers (model/fused.py) save them: RMSNorm its input and one
    scale per token, SwiGLU gate and up, tunesmith's CPU attention q, k, v and the probabilities once, LoRA the
    inputs of the adapted layers and the rank-r products; with gradient checkpointing only each layer's input;
  - the LM head on trained positions only, a chunk of `logits_chunk` rows at a time (methods/logps.py);
  - the transients around the peak: a chunk's logits, attention scores, the backward's gradient buffers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .architecture import Architecture

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
NF4_BLOCK = 64
NESTED_BLOCK = 256
EIGHT_BIT_MIN = 4096  # bitsandbytes keeps 32-bit states for smaller tensors (min_8bit_size)
EIGHT_BIT_BLOCK = 256


# ---------------------------------------------------------------- weights and states

def nf4_bytes(numel: int, double_quant: bool) -> int:
    """Bytes of one bitsandbytes NF4 tensor (blocks of 64): packed weights, absmax, code books."""
    blocks = math.ceil(numel / NF4_BLOCK)
    packed = math.ceil(numel / 2)
    code = 16 * 4  # the NF4 code book, fp32
    if not double_quant:
        return packed + 4 * blocks + code
    # absmax in uint8, an fp32 offset, the second level's fp32 absmax per 256 blocks and its 256-entry code
    return packed + blocks + 4 + 4 * math.ceil(blocks / NESTED_BLOCK) + 256 * 4 + code


def adamw_state_bytes(numel: int, optimizer: str = "adamw") -> int:
    """AdamW's two moments for one tensor (the scalar step counter is left out)."""
    if optimizer == "adamw_8bit" and numel >= EIGHT_BIT_MIN:
        return 2 * (numel + 4 * math.ceil(numel / EIGHT_BIT_BLOCK))
    return 8 * numel


@dataclass(frozen=True)
class Setting:
    """The settings memory depends on, resolved (precision never 'auto')."""

    adapter: str  # lora | rslora | dora | qlora | full
    precision: str  # compute precision: fp32 | bf16 | fp16
    r: int = 16
    targets: tuple[str, ...] = ()  # names of the adapted linear layers
    double_quant: bool = True
    embeddings_4bit: bool = True
    modules_to_save_numel: int = 0
    optimizer: str = "adamw"
    grad_checkpointing: bool = False
    fused: bool = True
    logits_chunk: int = 1024
    device: str = "cpu"  # cpu | cuda

    @property
    def is_full(self) -> bool:
        return self.adapter == "full"

    @property
    def dora(self) -> bool:
        return self.adapter == "dora"

    @property
    def base_bytes(self) -> int:
        """Storage of frozen (and, in full fine-tuning, trained) weights: train.recipe.base_dtype."""
        return 4 if self.is_full or self.precision == "fp32" else BYTES[self.precision]

    @property
    def compute_bytes(self) -> int:
        return BYTES[self.precision]


def weight_bytes(arch: Architecture, s: Setting) -> dict[str, int]:
    """The base model's weights as stored during training, by part."""
    b = s.base_bytes
    bias = sum(x.out_features for x in arch.linears if x.bias) * b
    if s.adapter == "qlora":
        linear = sum(nf4_bytes(x.in_features * x.out_features, s.double_quant) for x in arch.linears)
    else:
        linear = arch.linear_numel * b
    tables = [arch.embedding_numel] + ([arch.head_numel] if arch.head_numel else [])
    if s.adapter == "qlora" and s.embeddings_4bit:
        embedding = sum(nf4_bytes(n, s.double_quant) for n in tables)
    else:
        embedding = sum(tables) * b
    return {"linear layers": linear + bias, "embedding and head": embedding, "norms and other": arch.other_numel * b}


def trainable_numel(arch: Architecture, s: Setting) -> int:
    if s.is_full:
        return arch.total_numel
    by_name = {x.name: x for x in arch.linears}
    n = 0
    for name in s.targets:
        x = by_name[name]
        n += s.r * (x.in_features + x.out_features) + (x.out_features if s.dora else 0)
    return n + s.modules_to_save_numel


def trainable_tensor_sizes(arch: Architecture, s: Setting) -> list[int]:
    """Sizes of the trained tensors (8-bit AdamW treats small tensors differently)."""
    if s.is_full:
        sizes = [x.in_features * x.out_features for x in arch.linears]
        sizes += [x.out_features for x in arch.linears if x.bias]
        sizes += [arch.embedding_numel] + ([arch.head_numel] if arch.head_numel else [])
        norms = arch.other_numel // max(arch.hidden, 1)
        return sizes + [arch.hidden] * norms
    by_name = {x.name: x for x in arch.linears}
    sizes = []
    for name in s.targets:
        x = by_name[name]
        sizes += [s.r * x.in_features, s.r * x.out_features] + ([x.out_features] if s.dora else [])
    return sizes + ([s.modules_to_save_numel] if s.modules_to_save_numel else [])


def optimizer_bytes(arch: Architecture, s: Setting) -> int:
    return sum(adamw_state_bytes(n, s.optimizer) for n in trainable_tensor_sizes(arch, s))


# ---------------------------------------------------------------- activations

@dataclass(frozen=True)
class BatchShape:
    """One micro-batch as the model runs it: rows x width positions (padding included), trained positions."""

    rows: int
    width: int
    targets: int

    @property
    def positions(self) -> int:
        return self.rows * self.width


def _adapted_per_layer(arch: Architecture, s: Setting) -> dict[str, tuple[float, float, float]]:
    """group -> (adapted linears per layer, share of layers where the group is adapted, output features of the
    adapted linears per layer)."""
    chosen = set(s.targets)
    layers = max(arch.layers, 1)
    out: dict[str, tuple[float, float, float]] = {}
    for group in ("attn_in", "attn_out", "mlp_in", "mlp_out", "other"):
        members = [x for x in arch.linears if x.group == group and (s.is_full or x.name in chosen)]
        if members:
            out[group] = (len(members) / layers, len({x.layer for x in members}) / layers,
                          sum(x.out_features for x in members) / layers)
    return out


def layer_saved_per_position(arch: Architecture, s: Setting, width: int) -> dict[str, float]:
    """Bytes one decoder layer keeps for the backward pass, per position of a row `width` long."""
    st, c = s.base_bytes, s.compute_bytes
    d, ff, q, kv, h = arch.hidden, arch.intermediate, arch.q_width, arch.kv_width, arch.heads
    parts: dict[str, float] = {}
    norm = d * st + 4 if s.fused and arch.fused_norm else d * 4 + 4 + (d * st if s.is_full else 0)
    parts["norms"] = arch.norms_per_layer * norm
    # the inputs of trained matmuls: one copy per group of layers reading the same input, or, when autocast
    # casts the input for each trained weight (full fine-tuning with an fp32 stream), one per layer
    widths = {"attn_in": d, "attn_out": q, "mlp_in": d, "mlp_out": ff, "other": d}
    adapted = _adapted_per_layer(arch, s)
    copies = s.is_full and st != c
    parts["matmul inputs"] = sum((n if copies and g in ("attn_in", "mlp_in") else share) * widths[g] * c
                                 for g, (n, share, _) in adapted.items())
    if not s.is_full:
        parts["adapter products"] = sum(n for n, _, _ in adapted.values()) * s.r * c
        if s.dora:  # PEFT's DoRA keeps the base and adapter outputs of each layer for the magnitude's gradient
            parts["dora outputs"] = sum(out for _, _, out in adapted.values()) * 2 * c
    if s.device == "cpu" and s.fused and width <= 512:  # tunesmith's matmul attention
        parts["attention q k v"] = (q + 2 * kv) * c
        parts["attention probabilities"] = h * width * c
    else:  # SDPA with an explicit mask: keys and values repeated per query head, the output and its logsumexp
        parts["attention q k v"] = 3 * q * c
        parts["attention output"] = q * c + h * 4
    parts["mlp"] = (2 if s.fused and arch.fused_mlp else 3) * ff * c
    return parts


def saved_activations(arch: Architecture, s: Setting, b: BatchShape) -> dict[str, int]:
    """Everything the forward keeps for the backward, over the whole batch, by part."""
    n, L, st = b.positions, arch.layers, s.base_bytes
    out: dict[str, int] = {}
    out["rotary cos/sin"] = 2 * n * arch.head_dim * s.compute_bytes  # one pair for every layer
    if s.grad_checkpointing:
        out["layer inputs (checkpointed)"] = L * n * arch.hidden * st
        out["attention mask (kept for recomputation)"] = mask_bytes(b)
    else:
        for part, v in layer_saved_per_position(arch, s, b.width).items():
            out[part] = round(L * n * v)
    out["final norm"] = n * (arch.hidden * st + 4)
    out["lm head inputs"] = b.targets * (arch.hidden * st + 4)
    if s.is_full and st != s.compute_bytes:  # autocast keeps a compute-dtype copy of every trained weight
        out["autocast weight copies"] = arch.linear_numel * s.compute_bytes
    return out


def head_transient(arch: Architecture, s: Setting, b: BatchShape) -> tuple[int, int]:
    """(forward, backward) peak bytes of one LM-head chunk: [chunk x vocab] logits and their gradient."""
    k, v, c = min(s.logits_chunk, max(b.targets, 1)), arch.vocab, s.compute_bytes
    up = 0 if c == 4 else 4  # fp32 copies made when the logits come out in a lower precision
    frozen_linear = not s.is_full and not (s.adapter == "qlora" and s.embeddings_4bit)
    if frozen_linear:  # FrozenHeadLogps: logits, fp32 copy, logsumexp's temporary; backward: logits, p
        fwd, bwd = k * v * (c + up + 4), k * v * (c + 4 + (c if c != 4 else 0))
    else:  # a checkpointed chunk: logits and the fp32 log-softmax; the backward recomputes both and adds the
        # gather's gradient (measured: three [chunk x vocab] fp32 buffers at its peak in fp32)
        fwd, bwd = k * v * (c + up + 4), k * v * (c + up + 4 + 4)
    if s.adapter == "qlora" and s.embeddings_4bit:  # the 4-bit head dequantises its table inside each call
        table = v * arch.hidden * c
        fwd, bwd = max(fwd, table + k * v * c), max(bwd, table + k * v * (c + up + 4))
    return fwd, bwd


def layer_transient(arch: Architecture, s: Setting, b: BatchShape) -> tuple[int, int]:
    """(forward, backward) working memory of one decoder layer beyond what it saves."""
    n, c, st = b.positions, s.compute_bytes, s.base_bytes
    scores = b.rows * arch.heads * b.width * b.width
    if s.device == "cpu" and s.fused and b.width <= 512:
        fwd = scores * (4 + 4 + (c if c != 4 else 0))  # fp32 scores, fp32 softmax, probabilities in c
        bwd_attn = scores * 2 * c  # grad of the probabilities and of the scores
    else:
        fwd = n * arch.q_width * c * 2  # SDPA's repeated keys/values before they are saved
        bwd_attn = n * arch.q_width * c * 3
    bwd_mlp = n * arch.intermediate * c * 4
    grads = 2 * n * arch.hidden * st  # the residual stream's gradient and the layer's contribution
    if s.adapter == "qlora":  # each 4-bit linear dequantises its weight for the matmul
        fwd += max(x.in_features * x.out_features for x in arch.linears) * c
    return fwd, max(bwd_attn, bwd_mlp) + grads


def mask_bytes(b: BatchShape) -> int:
    """The additive [rows, 1, width, width] fp32 attention mask (data/batching.py)."""
    return b.rows * b.width * b.width * 4


# ---------------------------------------------------------------- one step, phase by phase

@dataclass
class StepMemory:
    """Peak bytes of one training step and the parts it is made of."""

    weights: dict[str, int]
    trainable: int
    gradients: int
    optimizer: int
    activations: dict[str, int]
    peak_phase: str
    transient: int
    phases: dict[str, int] = field(default_factory=dict)
    extra: dict[str, int] = field(default_factory=dict)  # parallel training: buckets, unsharded layers

    @property
    def activations_total(self) -> int:
        return sum(self.activations.values())

    @property
    def peak(self) -> int:
        return max(self.phases.values())


@dataclass(frozen=True)
class _Static:
    weights: dict[str, int]
    trainable: int  # trained weights held by this rank
    gradients: int
    optimizer: int
    extra: dict[str, int]
    total: int  # weights, fp32 adapters, optimizer states, parallel extras: present throughout a step


def _static(arch: Architecture, s: Setting, world: int, parallel: str) -> _Static:
    weights = weight_bytes(arch, s)
    trainable = trainable_numel(arch, s)
    grads, states = trainable * 4, optimizer_bytes(arch, s)
    master = trainable * 4 if not s.is_full else 0  # adapters are fp32 tensors of their own
    extra: dict[str, int] = {}
    if parallel == "fsdp" and world > 1:  # FSDP2 per decoder layer, gathered in the compute dtype
        weights = {k: v // world for k, v in weights.items()}
        trainable, grads, states, master = (x // world for x in (trainable, grads, states, master))
        extra["unsharded layers (current + prefetch)"] = 2 * arch.layer_numel() * s.compute_bytes
        extra["unsharded embedding and head"] = (arch.embedding_numel + arch.head_numel) * s.compute_bytes
    elif parallel == "ddp" and world > 1:
        extra["gradient buckets"] = grads
    total = sum(weights.values()) + master + states + sum(extra.values())
    return _Static(weights, trainable, grads, states, extra, total)


SHARED_SAVED = ("final norm", "lm head inputs", "autocast weight copies", "rotary cos/sin",
                "attention mask (kept for recomputation)")


def step_memory(arch: Architecture, s: Setting, b: BatchShape, world: int = 1, parallel: str = "none"
                ) -> StepMemory:
    """The peak of a training step (after the first, when the optimizer's states exist): the largest of
    the forward's end, an attention forward, the head's backward, the last and first layers' backward and
    the optimizer step."""
    st = _static(arch, s, world, parallel)
    saved = saved_activations(arch, s, b)
    if parallel == "fsdp" and world > 1:  # parameters arrive in the compute dtype: autocast makes no copies
        saved.pop("autocast weight copies", None)
    acts = sum(saved.values())
    head_f, head_b = head_transient(arch, s, b)
    layer_f, layer_b = layer_transient(arch, s, b)
    per_layer = (acts - sum(saved.get(k, 0) for k in SHARED_SAVED)) / max(arch.layers, 1)
    recompute = 0
    if s.grad_checkpointing:  # the layer being recomputed keeps everything again for its backward
        plain = Setting(**{**s.__dict__, "grad_checkpointing": False})
        recompute = round(sum(layer_saved_per_position(arch, plain, b.width).values()) * b.positions)
    layer_grads = st.gradients / (arch.layers + 1) if s.is_full else 0
    head_grad = (arch.embedding_numel if arch.tied else arch.head_numel) * 4 if s.is_full else 0
    logits = 2 * 4 * min(s.logits_chunk, max(b.targets, 1)) * arch.vocab
    mask = 0 if s.grad_checkpointing else mask_bytes(b)  # with checkpointing it is among the saved tensors
    base = st.total + acts
    phases = {
        "forward end (LM head)": base + b.positions * arch.hidden * s.base_bytes + mask + head_f,
        "attention forward": base + mask + layer_f,
        "LM head backward": base + max(head_b, head_grad + logits),
        "last layer backward": base + head_grad + layer_grads + layer_b + recompute,
        "first layer backward": st.total + per_layer + st.gradients + layer_b + recompute,
        "optimizer step": st.total + st.gradients + _optimizer_temp(arch, s, st.trainable),
    }
    peak_phase = max(phases, key=phases.get)
    return StepMemory(st.weights, st.trainable, st.gradients, st.optimizer, saved, peak_phase,
                      max(0, phases[peak_phase] - base), phases, st.extra)


def _optimizer_temp(arch: Architecture, s: Setting, trainable: int) -> int:
    """torch's AdamW: on CUDA the foreach path makes one fp32 list the size of the trained weights; on CPU it
    updates one tensor at a time (a temporary the size of the largest)."""
    if s.device == "cuda" and s.optimizer == "adamw":
        return trainable * 4
    return min(trainable, max(trainable_tensor_sizes(arch, s) or [0])) * 4 * 2
