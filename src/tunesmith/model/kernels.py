"""The kernels training can use beyond plain PyTorch ops, and which of them this installation has.

  - variable-length causal attention over packed tokens: `torch.nn.attention.varlen.varlen_attn` (PyTorch's
    own flash kernel, torch >= 2.10; its keywords changed between releases, so the call adapts to the
    signature it finds) or `flash_attn_varlen_func` from the flash-attn package. Both take every token of
    the batch as one [tokens, heads, dim] tensor and `cu_seqlens`, the offsets where each sequence starts;
    `reference_varlen` is the same maths written out (one causal softmax per sequence), what the fast
    kernels are checked against, and what runs the varlen path on a CPU, where neither kernel exists;
  - Liger's fused linear cross-entropy (liger-kernel, Triton, CUDA only): per-token log-probs through a
    trained LM head without keeping the [tokens x vocab] logits;
  - decoding on CPU (`decode_linears`, the GRPO sampler's decode steps): linear layers that
    see a few rows run as W @ x^T. The weights are not in cache between tokens, and MKL's x @ W^T streams
    them poorly: on a 2-core EPYC, 32 rows through a 576x1536 weight took 1.6 ms against 1.0 ms, through
    SmolLM2's 49k-token head 85 ms against 40 ms. The same products (a decode forward of the default
    model gave the same logits to the bit either way, measured here).

Every probe is cached: the answer cannot change within a process.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F

# (q [N, H, D], k [N, KV, D], v [N, KV, D], cu_seqlens int32 [S + 1], max_len, scale) -> out [N, H, D]
VarlenKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, float], torch.Tensor]
VARLEN_PREFERENCE = ("torch", "flash_attn")


def reference_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_len: int, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + causal) v within each segment [cu[i], cu[i+1]), in fp32 or wider; grouped-query
    heads (H = KV * G) share key head h // G, as transformers' repeat_kv lays them out."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    wide = torch.promote_types(q.dtype, torch.float32)
    groups = q.shape[1] // k.shape[1]
    bounds = cu_seqlens.tolist()
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        qs = q[a:b].to(wide).transpose(0, 1)  # [H, n, D]
        ks = k[a:b].to(wide).repeat_interleave(groups, dim=1).transpose(0, 1)
        vs = v[a:b].to(wide).repeat_interleave(groups, dim=1).transpose(0, 1)
        scores = qs @ ks.transpose(-1, -2) * scale
        causal = torch.ones(b - a, b - a, dtype=torch.bool, device=q.device).tril()
        p = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        out[a:b] = (p @ vs).transpose(0, 1).to(q.dtype)
    return out


@functools.cache
def torch_varlen() -> VarlenKernel | None:
    """torch's varlen_attn as a VarlenKernel, or None when this torch has none. torch 2.10 takes `is_causal`
    and no scale; 2.11 takes `window_size` (causal = (-1, 0)) and `scale`; 2.13 adds `enable_gqa`. Without
    `scale`, q is pre-scaled so the kernel's default 1/sqrt(D) gives the model's scale; without
    `enable_gqa`, key and value heads are repeated as repeat_kv does."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}

    def kernel(q, k, v, cu_seqlens, max_len, scale):
        kw = dict(causal)
        if "scale" in params:
            kw["scale"] = scale
        else:
            q = q * (scale * math.sqrt(q.shape[-1]))
        if k.shape[1] != q.shape[1]:
            if "enable_gqa" in params:
                kw["enable_gqa"] = True
            else:
                groups = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, **kw)

    return kernel


@functools.cache
def flash_attn_varlen() -> VarlenKernel | None:
    """flash-attn's flash_attn_varlen_func as a VarlenKernel (it takes grouped-query heads as they are)."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None

    def kernel(q, k, v, cu_seqlens, max_len, scale):
        return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, dropout_p=0.0,
                                      softmax_scale=scale, causal=True)

    return kernel


_VARLEN = {"torch": torch_varlen, "flash_attn": flash_attn_varlen}


def varlen_kernel(name: str) -> VarlenKernel:
    kernel = reference_varlen if name == "reference" else _VARLEN[name]()
    if kernel is None:
        raise RuntimeError(f"varlen kernel {name!r} is not installed")
    return kernel


def installed_varlen_kernels() -> tuple[str, ...]:
    """Names of the variable-length flash kernels this installation has, in order of preference."""
    return tuple(name for name in VARLEN_PREFERENCE if _VARLEN[name]() is not None)


# (h [n, H], weight [V, H], targets [n]) -> per-token cross-entropy [n] (= -log p(target)), float32
FusedLinearCE = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@functools.cache
def liger_linear_ce() -> FusedLinearCE | None:
    """Liger's fused linear cross-entropy with per-token losses (reduction "none": its backward then
    recomputes the chunk logits and weighs each token by its own upstream gradient, so any loss of the
    log-probs is exact), or None when liger-kernel (and Triton) are not installed."""
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
    except ImportError:
        return None

    def fn(h, weight, targets):
        loss = LigerFusedLinearCrossEntropyFunction.apply(h, weight, targets, None, None, -100, 0.0, 0.0,
                                                          "none")
        return loss[0] if isinstance(loss, tuple) else loss

    return fn


def reference_linear_ce(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """What a FusedLinearCE computes, in plain torch (fp32 logits)."""
    return torch.nn.functional.cross_entropy((h @ weight.t()).float(), targets, reduction="none")


def head_ce_kernel(name: str | None) -> FusedLinearCE | None:
    """The fused linear cross-entropy a KernelPolicy names ("liger", "reference"), or None."""
    if name == "reference":
        return reference_linear_ce
    return liger_linear_ce() if name == "liger" else None


SKINNY_ROWS = 64  # up to this many rows, CPU linear layers run as W @ x^T while decoding ...
SKINNY_WEIGHT = 2**16  # ... when their weight has at least this many entries (not LoRA's small factors)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), computed as (W @ x^T)^T for a CPU input of at most SKINNY_ROWS rows in the
    weight's dtype, made contiguous (a transposed view would send attention to a slower kernel)."""
    if x.device.type != "cpu" or x.dtype != weight.dtype or x.numel() > SKINNY_ROWS * x.shape[-1]:
        return F.linear(x, weight, bias)
    out = torch.mm(weight, x.reshape(-1, x.shape[-1]).t()).t().contiguous()
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _skinny_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return skinny_linear(x, self.weight, self.bias)


@contextlib.contextmanager
def decode_linears(model: torch.nn.Module, device: torch.device | str):
    """While active on CPU, the model's plain `nn.Linear` layers with at least SKINNY_WEIGHT weights (not
    LoRA factors, not quantised layers) run `skinny_linear`. Each layer's forward is replaced on the
    instance, so only these calls pay anything: a torch function mode, tried first, ran every op of the
    forward through Python and gave back most of the gain."""
    if torch.device(device).type != "cpu":
        yield
        return
    layers = [m for m in model.modules() if type(m) is torch.nn.Linear and m.weight.dim() == 2
              and m.weight.numel() >= SKINNY_WEIGHT and "forward" not in m.__dict__]
    for m in layers:
        m.forward = types.MethodType(_skinny_forward, m)
    try:
        yield
    finally:
        for m in layers:
            del m.forward
