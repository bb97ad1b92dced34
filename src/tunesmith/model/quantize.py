"""4-bit NF4 quantisation of a base model (bitsandbytes) and honest measurement of what the base costs.

A QLoRA base is loaded with `nf4_config(...)` passed to `from_pretrained`. bitsandbytes quantises every
linear layer except the output head; embeddings and norms stay in the load dtype. `base_footprint_bytes`
measures the real tensors (packed 4-bit weights, their absmax/quant-state, everything else), so its number
is what the base actually occupies, not a formula.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import TunesmithError

_INSTALL_HINT = "install bitsandbytes (pip install 'tunesmith[qlora]'), or use adapter.kind: lora"


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise TunesmithError("QLoRA needs the bitsandbytes package, which is not installed", _INSTALL_HINT) from None
    return bnb


def nf4_config(double_quant: bool = True, compute_dtype: torch.dtype = torch.bfloat16):
    """The `BitsAndBytesConfig` for a QLoRA base: NF4 weights, optional double quantisation of the
    per-block absmax scales, matmuls computed in `compute_dtype`."""
    _bnb()
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=torch.uint8,
    )


def is_4bit_linear(module: nn.Module) -> bool:
    """True for a bitsandbytes 4-bit linear layer (without importing bitsandbytes when it is absent)."""
    return type(module).__name__ == "Linear4bit" and hasattr(getattr(module, "weight", None), "quant_state")


def has_4bit_layers(model: nn.Module) -> bool:
    return any(is_4bit_linear(m) for m in model.modules())


def _quant_state_tensors(param: torch.Tensor) -> list[torch.Tensor]:
    """Every tensor a Params4bit needs besides its packed data: absmax, code book, and, with double
    quantisation, the second-level absmax/code/offset."""
    state = getattr(param, "quant_state", None)
    if state is None:
        return []
    out = [t for t in (state.absmax, state.code, getattr(state, "offset", None)) if isinstance(t, torch.Tensor)]
    nested = getattr(state, "state2", None)
    if nested is not None:
        out += [t for t in (nested.absmax, nested.code) if isinstance(t, torch.Tensor)]
    return out


def _adapter_param_ids(model: nn.Module) -> set[int]:
    """ids of PEFT adapter parameters (LoRA A/B, DoRA magnitudes, modules_to_save copies)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import ModulesToSaveWrapper
    except ImportError:  # pragma: no cover - peft is a hard dependency
        return set()
    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for attr in module.adapter_layer_names:
                ids.update(id(p) for p in getattr(module, attr).parameters())
        if isinstance(module, ModulesToSaveWrapper):
            ids.update(id(p) for p in module.modules_to_save.parameters())
    return ids


def base_footprint_bytes(model: nn.Module) -> int:
    """Bytes held by the base model: every parameter that is not a PEFT adapter parameter, plus the
    quantisation state of 4-bit weights. Tied and shared tensors are counted once (by storage)."""
    skip = _adapter_param_ids(model)
    seen: set[tuple[int, int]] = set()
    total = 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            return
        seen.add(key)
        total += t.numel() * t.element_size()

    for p in model.parameters():
        if id(p) in skip:
            continue
        add(p.data)
        for t in _quant_state_tensors(p):
            add(t)
    return total


def logical_numel(param: torch.Tensor) -> int:
    """Number of weights a parameter represents (a packed 4-bit tensor holds two per byte)."""
    state = getattr(param, "quant_state", None)
    if state is not None and getattr(state, "shape", None) is not None:
        return int(torch.Size(state.shape).numel())
    return param.numel()


def keep_4bit_layout(model: nn.Module) -> int:
    """Call right after loading a 4-bit model. On CPUs with AVX512-BF16, bitsandbytes repacks each 4-bit
    weight in place on its first eval-mode forward: absmax rounded to bf16, matmuls in bf16, and from then on
    a kernel without autograd, which later training passes silently go through. This switches that off
    for every 4-bit layer and undoes it where it already happened (the undo re-quantises absmax, so it is
    close to but not bit-identical with the original). Returns the number of layers undone."""
    undone = 0
    for module in model.modules():
        if not is_4bit_linear(module):
            continue
        module.support_avx512bf16_for_cpu = False
        if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, module.weight.quant_state)
            undone += 1
    return undone


def dequantize_4bit_layers(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace every bitsandbytes 4-bit linear layer with an `nn.Linear` holding its dequantised weight in
    `dtype`; returns how many were replaced. The result equals what the 4-bit layer computes (up to the
    rounding of `dtype`), not the original pre-quantisation weights, which are gone."""
    bnb = _bnb()
    keep_4bit_layout(model)
    targets = [(name, m) for name, m in model.named_modules() if is_4bit_linear(m)]
    for name, old in targets:
        state = copy.copy(old.weight.quant_state)
        state.dtype = torch.float32  # the exact NF4 values, rounded once to `dtype` (not via the load dtype)
        weight = bnb.functional.dequantize_4bit(old.weight.data, state).to(dtype)
        new = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None,
                        device=weight.device, dtype=dtype)
        new.weight = nn.Parameter(weight, requires_grad=False)
        if old.bias is not None:
            new.bias = nn.Parameter(old.bias.data.to(dtype), requires_grad=False)
        model.set_submodule(name, new)
    return len(targets)


def clear_quantization_marks(model: nn.Module) -> None:
    """Forget that a transformers model was loaded quantised, once its weights are plain floats again
    (so that `.to(dtype)` and `save_pretrained` behave as for any float model)."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):
        if getattr(model, flag, False):
            setattr(model, flag, False)
    if hasattr(model, "quantization_method"):
        del model.quantization_method
