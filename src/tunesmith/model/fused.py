"""Training-time replacements for three pieces of a Llama-style block that keep less for the backward pass.

Same math as transformers' modules; the difference is what autograd saves and how many small ops run:
  - RMSNorm: saves its input and one scale per token, not an fp32 copy of the input plus the normalised
    output (about 4.6 KB a token per norm for a 576-wide model in bf16);
  - SwiGLU (silu(gate) * up): saves gate and up, not also silu(gate);
  - a LoRA linear layer: base(x) + scale * B(A(x)) with the B matmul, scale and sum as one addmm (three
    passes over the layer's output fewer, forward and backward);
  - attention: matmul + softmax like transformers' eager attention, but saves the probabilities once in the
    compute dtype instead of an fp32 and a bf16 copy, and computes grouped-query heads without repeating keys
    and values. On CPU this trains faster than torch's flash-attention kernel for 64-dim heads.
`fuse(model)` swaps the first three in on the model instance (the class and the saved weights are untouched)
for the architectures whose modules it knows; others are left as they are. The attention is registered with
transformers and chosen per batch by model/attention.py.

`lora_inputs_uncast(model)`: under autocast, LoRA layers cast their bf16 input to fp32 only for autocast to
cast it straight back for the matmul; switching the cast off saves the time and a copy per adapted layer
kept for the backward pass, with bit-identical results.
"""

from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION = "tunesmith"
MATMUL_ATTENTION_MAX_ROW = 512  # longer rows use SDPA: the probabilities kept grow with rows x length^2
RMS_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm"}
MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"}


class RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.float() * rstd
        g = grad.float() * weight.float()
        dx = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (grad.float() * xhat.to(x.dtype).float()).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        return dx.to(x.dtype), dw, None


def rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return RMSNormFn.apply(hidden_states, self.weight, self.variance_epsilon)


class SiluMulFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors  # the ops autograd would run, with silu(gate) recomputed, not kept
        return torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)


def mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(SiluMulFn.apply(self.gate_proj(x), self.up_proj(x)))


class AttentionFn(torch.autograd.Function):
    """softmax(q k^T * scale + mask) v for q [B, H, T, D] and k, v [B, KV, T, D] (H = KV * G), mask additive
    [B, 1, T, T] or None. Query heads are grouped by their key head, so keys and values are never repeated;
    the scale is applied to the [T, D] gradients rather than the [T, T] ones."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale: float):
        b, h, t, d = q.shape
        kv = k.shape[1]
        scores = torch.matmul(q.reshape(b, kv, -1, d), k.transpose(-1, -2)).view(b, h, t, -1)
        scores = torch.add(mask, scores, alpha=scale) if mask is not None else scores.float() * scale
        p = torch.softmax(scores, dim=-1).to(q.dtype)
        del scores
        out = torch.matmul(p.view(b, kv, -1, p.shape[-1]), v).view(b, h, t, d)
        ctx.save_for_backward(q, k, v, p)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, p = ctx.saved_tensors
        b, h, t, d = q.shape
        kv = k.shape[1]
        pg = p.view(b, kv, -1, p.shape[-1])
        g = grad.reshape(b, kv, -1, d).to(v.dtype)
        dv = torch.matmul(pg.transpose(-1, -2), g)
        ds = torch._softmax_backward_data(torch.matmul(g, v.transpose(-1, -2)), pg, -1, pg.dtype)
        dq = (torch.matmul(ds, k) * ctx.scale).view(b, h, t, d)
        dk = torch.matmul(ds.transpose(-1, -2), q.reshape(b, kv, -1, d)) * ctx.scale
        return dq, dk, dv, None, None


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, **kwargs):
    """A transformers attention function (registered as "tunesmith"); returns ([B, T, H, D], None). It takes
    full-sequence attention with an explicit mask and decoding steps (one query per row against a cache: on
    CPU, SDPA's kernel took 0.47-0.65 ms a layer for 32 rows of 80 keys, the two matmuls 0.32-0.36 ms);
    anything else (chunks of queries against a cache, attention dropout) goes to transformers' SDPA path."""
    decoding = query.shape[-2] == 1
    if attention_mask is None or (query.shape[-2] != key.shape[-2] and not decoding) or (dropout and module.training):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    # one dtype for the three (full fine-tuning under autocast gives fp32 q, k after RoPE and a bf16 v)
    device = query.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else \
        torch.promote_types(torch.promote_types(query.dtype, key.dtype), value.dtype)
    query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    mask = attention_mask
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)
    out = AttentionFn.apply(query, key, value, mask, scaling)
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> None:
    """Make "tunesmith" a transformers attention implementation (its masks built like eager attention's)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTENTION, attention_forward)
    AttentionMaskInterface.register(ATTENTION, eager_mask)


def lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT's LoRA linear forward, base(x) + scale * B(A(x)), with the B matmul, the scale and the sum in one
    addmm. Anything but one plain LoRA adapter without dropout, unmerged and enabled, takes PEFT's own path."""
    adapters = self.active_adapters
    same_dtype = torch.is_autocast_enabled(x.device.type) or (
        adapters and adapters[0] in self.lora_A
        and x.dtype == self.lora_A[adapters[0]].weight.dtype == self.base_layer.weight.dtype)
    if (args or kwargs or not same_dtype or self.disable_adapters or self.merged or len(adapters) != 1
            or adapters[0] in self.lora_variant or adapters[0] not in self.lora_A
            or not isinstance(self.lora_dropout[adapters[0]], nn.Identity)):
        return type(self).forward(self, x, *args, **kwargs)
    name = adapters[0]
    result = self.base_layer(x)
    a = F.linear(self._cast_input_dtype(x, self.lora_A[name].weight.dtype), self.lora_A[name].weight)
    b = self.lora_B[name].weight
    out = torch.addmm(result.reshape(-1, result.shape[-1]), a.reshape(-1, a.shape[-1]), b.t(),
                      alpha=self.scaling[name])
    return out.view(result.shape).to(result.dtype)


def _is_plain_lora_linear(module: nn.Module) -> bool:
    return (type(module).__name__ == "Linear" and type(module).__module__.startswith("peft.tuners.lora")
            and isinstance(getattr(module, "base_layer", None), nn.Linear)
            and getattr(module.base_layer, "bias", None) is None)


def fuse(model: nn.Module) -> dict[str, int]:
    """Swap in the fused RMSNorm, SwiGLU and LoRA-linear forwards; returns how many modules of each kind
    were changed."""
    counts = {"rms_norm": 0, "mlp": 0, "lora": 0}
    for module in model.modules():
        name = type(module).__name__
        if name in RMS_NORMS and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(rms_norm_forward, module)
            counts["rms_norm"] += 1
        elif name in MLPS and _is_silu(module):
            module.forward = types.MethodType(mlp_forward, module)
            counts["mlp"] += 1
        elif _is_plain_lora_linear(module):
            module.forward = types.MethodType(lora_forward, module)
            counts["lora"] += 1
    return counts


@contextlib.contextmanager
def lora_inputs_uncast(model: nn.Module):
    """Within an autocast region: LoRA layers take their input as it comes (see the module docstring)."""
    layers = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "cast_input_dtype_enabled")]
    before = [m.cast_input_dtype_enabled for m in layers]
    for m in layers:
        m.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for m, b in zip(layers, before, strict=True):
            m.cast_input_dtype_enabled = b


def _is_silu(mlp: nn.Module) -> bool:
    act = getattr(mlp, "act_fn", None)
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation" or act is F.silu
