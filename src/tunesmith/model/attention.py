"""Which attention each batch runs, and the variable-length flash path.

tunesmith's batches (data/batching.py) describe attention with `attn_ids` (groups), `branch` (0 = seen by the
whole group, k > 0 = seen by branch k only) and padding (-1); the SDPA and matmul paths read the [R, 1, T, T]
additive mask built from them. On CUDA the same batches run a variable-length flash kernel instead, which
takes every token of the batch as one sequence of tokens plus `cu_seqlens`, the offsets where each
independent causal sequence starts, and needs no mask at all:

  - padded and packed rows: each run of one attention group is a sequence; each row's padding is one too
    (no real token attends to it, and its outputs are never read), so the kernel sees the tokens in place;
  - a shared prompt P with branches B1, B2 (a preference pair) is laid out as two sequences [P, B1] and
    [P, B2]: the kernel reads P's keys and values once per branch and P's own outputs are taken from the
    first copy. That is the mask's maths exactly (a branch sees P and itself, P sees only P) with plain
    causal attention; P's MLP and projections still run once, which is where sharing saves most.

`varlen_layout` builds this from a batch (a pure function; None for a layout it cannot express, which then
takes SDPA with the mask), `choose_kernel` picks each batch's attention from the device, the layout and the
installed kernels (a pure function), `setup` prepares a model once (recipe.choose_attention) and
`attention_inputs` applies the choice per batch (methods/logps.py).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import TunesmithError
from .kernels import VarlenKernel, installed_varlen_kernels, varlen_kernel

VARLEN = "tunesmith_varlen"  # the transformers attention implementation of the varlen path
LAYOUT_KWARG = "tunesmith_varlen_layout"  # how a batch's layout reaches every attention layer
POLICY = "tunesmith_kernels"  # attribute of the transformers model holding its KernelPolicy
PLAIN_ATTENTION = {"LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention"}
FLASH_DTYPES = ("bf16", "fp16")
FLASH_MIN_SM = (8, 0)
FLASH_MAX_HEAD_DIM = 256


# ---------------------------------------------------------------- batch layout -> cu_seqlens

@dataclass(frozen=True)
class VarlenLayout:
    """A batch as independent causal sequences over its flattened [R * T] tokens."""

    kind: str  # padded (one group per row) | packed (rows hold several groups) | shared (prompt branches)
    cu_seqlens: torch.Tensor  # int32 [S + 1]: sequence i is kernel positions cu[i] .. cu[i+1]
    max_len: int
    index: torch.Tensor | None = None  # int64 [N]: the flat token at each kernel position (None: same order)
    inverse: torch.Tensor | None = None  # int64 [R * T]: the kernel position holding each flat token's output
    kernel: VarlenKernel | None = None

    def bind(self, kernel: VarlenKernel, device: torch.device) -> VarlenLayout:
        def move(t):
            return None if t is None else t.to(device, non_blocking=True)

        return dataclasses.replace(self, cu_seqlens=move(self.cu_seqlens), index=move(self.index),
                                   inverse=move(self.inverse), kernel=kernel)


def _runs(groups: torch.Tensor, branch: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """(start, stop, group, branch) of every maximal run of equal (group, branch) within a row, in flat
    positions of the [R, T] batch, in order."""
    r, t = groups.shape
    g, b = groups.reshape(-1), branch.reshape(-1)
    change = torch.ones(r * t, dtype=torch.bool)
    change[1:] = (g[1:] != g[:-1]) | (b[1:] != b[:-1])
    change[::t] = True
    starts = change.nonzero().flatten()
    stops = torch.cat([starts[1:], torch.tensor([r * t])])
    return list(zip(starts.tolist(), stops.tolist(), g[starts].tolist(), b[starts].tolist(), strict=True))


def _unit_sequences(unit: list[tuple[int, int, int, int]]) -> list[list[tuple[int, int]]] | None:
    """The kernel sequences of one attention group's runs: [prompt] alone, or [prompt, branch k] for each
    branch. None unless the prompt (branch 0) comes first and each branch is one run."""
    prompt = [(a, b) for a, b, _, br in unit if br == 0]
    branches = [(a, b) for a, b, _, br in unit if br != 0]
    if len(prompt) > 1 or (prompt and unit[0][3] != 0) or len({br for *_, br in unit}) != len(unit):
        return None
    if not branches:
        return [prompt]
    return [prompt + [rng] for rng in branches]


def varlen_layout(groups: torch.Tensor, branch: torch.Tensor | None = None) -> VarlenLayout | None:
    """The VarlenLayout of a batch with attention groups `groups` [R, T] (-1 = padding) and `branch` [R, T]
    (None: no shared prompts), or None when its mask is not a set of causal sequences (a group split within
    a row, or a shared prompt that does not precede its branches)."""
    groups = groups.detach().cpu()
    branch = torch.zeros_like(groups) if branch is None else branch.detach().cpu()
    t = groups.shape[1]
    runs = _runs(groups, branch)
    sequences: list[list[tuple[int, int]]] = []
    packed = shared = False
    i, seen, row = 0, set(), -1
    while i < len(runs):
        start, _, group, _ = runs[i]
        if start // t != row:
            row, seen = start // t, set()
        j = i + 1
        if group >= 0:
            while j < len(runs) and runs[j][2] == group and runs[j][0] // t == row:
                j += 1
            if group in seen:
                return None
            packed |= bool(seen)
            seen.add(group)
        unit = _unit_sequences(runs[i:j]) if group >= 0 else [[runs[i][:2]]]
        if unit is None:
            return None
        shared |= len(unit) > 1 or len(unit[0]) > 1
        sequences += unit
        i = j
    return _layout(sequences, groups.numel(), "shared" if shared else "packed" if packed else "padded")


def _layout(sequences: list[list[tuple[int, int]]], n_flat: int, kind: str) -> VarlenLayout:
    lengths = [sum(b - a for a, b in seq) for seq in sequences]
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    if kind != "shared":  # every flat token once, in order: the kernel reads the batch as it is
        return VarlenLayout(kind, cu, max(lengths))
    index = torch.cat([torch.arange(a, b) for seq in sequences for a, b in seq])
    inverse = torch.empty(n_flat, dtype=torch.long)
    placed, at = set(), 0
    for seq in sequences:
        for a, b in seq:
            if (a, b) not in placed:  # a shared prompt's outputs come from its first copy
                placed.add((a, b))
                inverse[a:b] = torch.arange(at, at + b - a)
            at += b - a
    return VarlenLayout(kind, cu, max(lengths), index, inverse)


# ---------------------------------------------------------------- the per-batch choice

@dataclass(frozen=True)
class Capability:
    """What the choice depends on besides the batch: the device, the compute precision, the model's
    attention, and the installed variable-length kernels (in order of preference)."""

    device: str  # cuda | cpu | mps
    sm: tuple[int, int] | None = None  # CUDA compute capability
    precision: str = "fp32"
    head_dim: int = 64
    plain_attention: bool = True  # causal softmax attention of a known module, no sliding window, no dropout
    kernels: tuple[str, ...] = ()


def varlen_unusable(cap: Capability) -> str | None:
    """Why no variable-length kernel can run here, or None when the first of cap.kernels can. The
    "reference" kernel (kernels.reference_varlen, used by tests and the GPU script's CPU dry run) runs on any
    device and precision."""
    if not cap.plain_attention:
        return "this model's attention is not plain causal attention of a known module (sliding window, " \
               "attention dropout, or an unknown attention class)"
    if cap.kernels[:1] == ("reference",):
        return None
    if cap.device != "cuda":
        return f"the flash kernels run on CUDA only (device: {cap.device})"
    if not cap.kernels:
        return f"no variable-length flash kernel is installed (torch {torch.__version__} has no " \
               "torch.nn.attention.varlen, and the flash-attn package is not installed)"
    if cap.sm is not None and tuple(cap.sm) < FLASH_MIN_SM:
        return f"the flash kernels need compute capability 8.0 or newer (this GPU: {cap.sm[0]}.{cap.sm[1]})"
    if cap.precision not in FLASH_DTYPES:
        return f"the flash kernels compute in bf16 or fp16 (precision: {cap.precision})"
    if cap.head_dim > FLASH_MAX_HEAD_DIM or cap.head_dim % 8:
        return f"the flash kernels take head sizes that are multiples of 8 up to 256 (this model: {cap.head_dim})"
    return None


def choose_kernel(cap: Capability, mode: str, fused: bool, layout: str | None, row_length: int,
                  matmul_max_row: int) -> str:
    """The attention one batch runs: a varlen kernel's name (cap.kernels[0]), "matmul" (model/fused.py's
    attention, CPU rows up to matmul_max_row tokens) or "sdpa" (the 4D mask). `layout` is the batch's
    VarlenLayout kind, None where it has none; `mode` is train.attention (auto | varlen | sdpa)."""
    if mode == "sdpa":
        return "sdpa"
    if layout is not None and varlen_unusable(cap) is None:
        return cap.kernels[0]
    if cap.device == "cpu" and fused and row_length <= matmul_max_row:
        return "matmul"
    return "sdpa"


# ---------------------------------------------------------------- the model side

@dataclass
class KernelPolicy:
    """What `setup` decided for a model; `attention_inputs` and methods/logps.py read it per batch."""

    capability: Capability
    mode: str
    fused: bool
    matmul_max_row: int
    head_ce: str | None = None  # fused linear cross-entropy for a trained head: "liger" (or "reference")
    used: Counter = field(default_factory=Counter)  # batches per attention kernel, for run.json

    @property
    def varlen(self) -> bool:
        return self.mode != "sdpa" and varlen_unusable(self.capability) is None

    def describe(self) -> str:
        if self.varlen:
            return f"varlen ({self.capability.kernels[0]}) for padded, packed and shared-prompt batches"
        if self.mode != "sdpa" and self.capability.device == "cpu" and self.fused:
            return f"tunesmith up to {self.matmul_max_row} tokens, sdpa above"
        return "sdpa"


def plain_causal_attention(lm: nn.Module) -> bool:
    cfg = lm.config
    window = getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True)
    classes = {type(m).__name__ for m in lm.modules() if type(m).__name__.endswith("Attention")}
    return bool(classes) and classes <= PLAIN_ATTENTION and not window \
        and not getattr(cfg, "attention_dropout", 0.0)


def capability(lm: nn.Module, device: torch.device, precision: str,
               kernels: tuple[str, ...] | None = None) -> Capability:
    cfg = lm.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    sm = tuple(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None
    return Capability(device.type, sm, precision, head_dim, plain_causal_attention(lm),
                      installed_varlen_kernels() if kernels is None else tuple(kernels))


def register_varlen() -> None:
    """Make VARLEN a transformers attention implementation. Its mask function is SDPA's: a forward that
    does not come from `attention_inputs` (generation after training, say) gets SDPA and a proper mask."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN, sdpa_mask)


@torch.compiler.disable  # kept out of compiled graphs: a gather and one kernel, and lengths that change per batch
def varlen_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                             **kwargs):
    """A transformers attention function: q [B, H, T, D], k and v [B, KV, T, D] -> ([B, T, H, D], None)."""
    layout: VarlenLayout | None = kwargs.pop(LAYOUT_KWARG, None)
    if layout is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    b, h, t, d = query.shape
    device = query.device.type
    autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if autocast else \
        torch.promote_types(torch.promote_types(query.dtype, key.dtype), value.dtype)
    q, k, v = (x.transpose(1, 2).reshape(b * t, x.shape[1], d).to(dtype) for x in (query, key, value))
    if layout.index is not None:
        q, k, v = q[layout.index], k[layout.index], v[layout.index]
    out = layout.kernel(q, k, v, layout.cu_seqlens, layout.max_len, scaling)
    if layout.inverse is not None:
        out = out[layout.inverse]
    return out.reshape(b, t, h, d), None


def setup(model: nn.Module, device: torch.device, precision: str, fused: bool = True, mode: str = "auto",
          liger: bool = True, kernels: tuple[str, ...] | None = None) -> str:
    """Prepare a (possibly PEFT-wrapped) model for training: the fused layers (model/fused.py, with `fused`)
    and the KernelPolicy its batches read; returns a description. `kernels` overrides the installed varlen
    kernels (tests). A user's own attention choice (e.g. flash_attention_2) is left alone."""
    from .fused import MATMUL_ATTENTION_MAX_ROW, fuse, register_attention
    from .kernels import liger_linear_ce
    from .unwrap import unwrap

    base = unwrap(model)
    if getattr(base.config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return base.config._attn_implementation
    if fused:
        fuse(model)
    cap = capability(base, device, precision, kernels)
    reason = varlen_unusable(cap)
    if mode == "varlen" and reason:
        raise TunesmithError(f"train.attention: varlen cannot run here: {reason}",
                             "use train.attention: auto, which picks the fastest attention this setup has")
    register_attention()
    register_varlen()
    head_ce = "liger" if liger and cap.device == "cuda" and liger_linear_ce() is not None else None
    policy = KernelPolicy(cap, mode, fused, MATMUL_ATTENTION_MAX_ROW, head_ce)
    setattr(base, POLICY, policy)
    if cap.device == "cuda" and mode == "auto" and reason:
        warnings.warn(f"attention: {reason}; batches use SDPA with a [rows, 1, T, T] mask, which rules out the "
                      "flash kernels: time and memory grow with T^2 per row", stacklevel=2)
    return policy.describe()


def attention_summary(model: nn.Module) -> dict | None:
    """What ran, for run.json: the description and how many batches took each attention kernel."""
    from .unwrap import unwrap

    policy: KernelPolicy | None = getattr(unwrap(model), POLICY, None)
    if policy is None:
        return None
    return {"setup": policy.describe(), "batches": dict(policy.used), "head_ce": policy.head_ce}


def attention_inputs(lm: nn.Module, batch) -> dict:
    """The attention arguments of the transformer body for one batch, after selecting the batch's kernel on
    `lm` (left in place, so checkpointed layers recompute with the same attention). Models without a
    KernelPolicy get the mask and whatever attention they have."""
    policy: KernelPolicy | None = getattr(lm, POLICY, None)
    if policy is None:
        return {"attention_mask": batch.attention_mask()}
    groups = batch.attn_ids if batch.attn_ids is not None else batch.seq_ids
    layout = varlen_layout(groups, batch.branch) if policy.varlen else None
    kernel = choose_kernel(policy.capability, policy.mode, policy.fused, layout.kind if layout else None,
                           batch.input_ids.shape[1], policy.matmul_max_row)
    policy.used[kernel] += 1
    if layout is not None and kernel == policy.capability.kernels[0]:
        lm.config._attn_implementation = VARLEN
        device = batch.input_ids.device
        # a 4D mask is taken as given by transformers' mask code: this empty one skips building any mask
        return {"attention_mask": torch.empty((0, 0, 0, 0), device=device),
                LAYOUT_KWARG: layout.bind(varlen_kernel(kernel), device)}
    from .fused import ATTENTION

    lm.config._attn_implementation = ATTENTION if kernel == "matmul" else "sdpa"
    return {"attention_mask": batch.attention_mask()}
