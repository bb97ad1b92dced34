"""4-bit NF4 quantisation of a base model (bitsandbytes) and honest measurement of what the base costs.

A QLoRA base is loaded with `nf4_config(...)` passed to `from_pretrained`. bitsandbytes quantises every
linear layer except the output head; embeddings and norms stay in the load dtype. `quantize_embeddings_nf4`
then stores the input embedding in NF4 too, and the output head as a bitsandbytes `Linear4bit` (sharing the
embedding's very storage when the model ties them). `base_footprint_bytes` measures the real tensors (packed
4-bit weights, their absmax/quant-state, everything else), so its number is what the base actually occupies,
not a formula.
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


def nf4_config(double_quant: bool = True, compute_dtype: torch.dtype = torch.bfloat16,
               quant_storage: torch.dtype = torch.uint8):
    """The `BitsAndBytesConfig` for a QLoRA base: NF4 weights, optional double quantisation of the
    per-block absmax scales, matmuls computed in `compute_dtype`. `quant_storage` bf16 packs the 4-bit
    values into bf16 tensors, which FSDP2 shards like any other parameter."""
    _bnb()
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=quant_storage,
    )


def is_4bit_linear(module: nn.Module) -> bool:
    """True for a bitsandbytes 4-bit linear layer (without importing bitsandbytes when it is absent)."""
    return type(module).__name__ == "Linear4bit" and hasattr(getattr(module, "weight", None), "quant_state")


def is_4bit_embedding(module: nn.Module) -> bool:
    """True for an input embedding stored in NF4 by `quantize_embeddings_nf4`."""
    return isinstance(module, NF4Embedding)


def has_4bit_layers(model: nn.Module) -> bool:
    return any(is_4bit_linear(m) or is_4bit_embedding(m) for m in model.modules())


class NF4Embedding(nn.Module):
    """An input embedding table held as a bitsandbytes `Params4bit` (NF4, the blocks of 64 of the row-major
    [vocab, dim] table, optionally double-quantised), made by `quantize_embeddings_nf4`.

    A lookup gathers the packed bytes and the block scales of the looked-up rows only and dequantises those
    with `bitsandbytes.functional.dequantize_4bit`, in `compute_dtype` (when `dim` is a multiple of the block
    size, as for every usual model; otherwise the whole table is dequantised per call). With double
    quantisation the scales of all blocks (a transient fp32 array of vocab × dim / 64 values) are dequantised
    first, as bitsandbytes does inside `dequantize_4bit`. bitsandbytes' own `Embedding4bit` is not used: it
    gathers the still-quantised scales and then applies the second-level scales of the wrong 256-block
    groups (rows past the first 256 blocks come out wrong), and it cannot be saved in a state dict.
    The table is frozen (no gradient)."""

    def __init__(self, weight: nn.Parameter, compute_dtype: torch.dtype, padding_idx: int | None = None):
        super().__init__()
        shape = weight.quant_state.shape
        self.num_embeddings, self.embedding_dim = int(shape[0]), int(shape[1])
        self.padding_idx = padding_idx  # kept for the float embedding `dequantize_4bit_layers` gives back
        self.weight = weight
        self.compute_dtype = compute_dtype

    def extra_repr(self) -> str:
        state = self.weight.quant_state
        return (f"{self.num_embeddings}, {self.embedding_dim}, {state.quant_type}, blocksize={state.blocksize}, "
                f"double_quant={state.nested}, compute_dtype={self.compute_dtype}")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        import bitsandbytes.functional as bnbf

        state = self.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            raise TunesmithError("the 4-bit embedding's storage was repacked by bitsandbytes' CPU kernel",
                                 "call tunesmith.model.quantize.keep_4bit_layout(model) after loading")
        if self.embedding_dim % state.blocksize:
            return nn.functional.embedding(input_ids, _dequantize(self.weight, self.compute_dtype))
        absmax = state.absmax
        if state.nested:
            absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
        per_row = self.embedding_dim // state.blocksize
        packed = nn.functional.embedding(input_ids, self.weight.data.view(self.num_embeddings, -1))
        scales = nn.functional.embedding(input_ids, absmax.float().view(self.num_embeddings, per_row))
        rows = bnbf.QuantState(absmax=scales.reshape(-1), shape=torch.Size((*input_ids.shape, self.embedding_dim)),
                               code=state.code, blocksize=state.blocksize, quant_type=state.quant_type,
                               dtype=self.compute_dtype)
        return bnbf.dequantize_4bit(packed.reshape(-1, 1), rows)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """The packed weight and its quantisation state, under the keys `Linear4bit` uses."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for k, v in self.weight.quant_state.as_dict(packed=True).items():
            destination[prefix + "weight." + k] = v if keep_vars else v.detach()


def _dequantize(param: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The full weight a Params4bit stands for: the exact NF4 values (computed in fp32), rounded once to `dtype`."""
    bnb = _bnb()
    state = copy.copy(param.quant_state)
    state.dtype = torch.float32
    return bnb.functional.dequantize_4bit(param.data, state).to(dtype)


def _refuse_resize(*args, **kwargs):
    raise TunesmithError("this model's embedding is stored in 4-bit (adapter.quantize_embeddings), so its "
                         "vocabulary cannot be resized", "set adapter.quantize_embeddings: false to add tokens")


def _quantize_nf4(weight: torch.Tensor, double_quant: bool) -> nn.Parameter:
    bnb = _bnb()
    param = bnb.nn.Params4bit(weight.detach().contiguous(), requires_grad=False, blocksize=64,
                              compress_statistics=double_quant, quant_type="nf4", quant_storage=torch.uint8)
    return param.to(weight.device)  # quantises (bitsandbytes does it on the first move to a device)


def quantize_embeddings_nf4(model: nn.Module, double_quant: bool = True,
                            compute_dtype: torch.dtype = torch.bfloat16) -> dict:
    """After a QLoRA load (`nf4_config`), store the input embedding in NF4 as well (blocks of 64, the same
    double quantisation) and make the output head a bitsandbytes `Linear4bit`. When the model ties its head
    to the embedding, both use one `Params4bit` (one packed table, one quant state; counted once by
    `base_footprint_bytes`); an untied head is quantised on its own. The head then computes in
    `compute_dtype` like every other 4-bit layer. Works in place; returns {"tied": bool, "head": bool}.

    Refuses embeddings or heads that are subclasses doing more than a lookup / matmul (e.g. Gemma 3's scaled
    embedding), and from then on refuses `resize_token_embeddings`."""
    bnb = _bnb()
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if is_4bit_embedding(embedding):
        return {"tied": head is not None and head.weight is embedding.weight, "head": is_4bit_linear(head)}
    hint = "set adapter.quantize_embeddings: false for this model"
    if type(embedding) is not nn.Embedding or embedding.max_norm is not None:
        raise TunesmithError(f"the input embedding of this model is a {type(embedding).__name__}, which 4-bit "
                             "storage cannot reproduce (only plain nn.Embedding tables are quantised)", hint)
    if head is not None and type(head) is not nn.Linear and not is_4bit_linear(head):
        raise TunesmithError(f"the output head of this model is a {type(head).__name__}, not a linear layer "
                             "that can be stored in 4-bit", hint)
    tied = head is not None and head.weight is embedding.weight
    names = {id(m): n for n, m in model.named_modules()}
    param = _quantize_nf4(embedding.weight.data, double_quant)
    model.set_submodule(names[id(embedding)], NF4Embedding(param, compute_dtype, embedding.padding_idx))
    if head is not None and not is_4bit_linear(head):
        head_param = param if tied else _quantize_nf4(head.weight.data, double_quant)
        new = bnb.nn.Linear4bit(head.in_features, head.out_features, bias=head.bias is not None,
                                compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type="nf4",
                                quant_storage=torch.uint8, device="meta")
        new.weight = head_param
        new.quant_state = head_param.quant_state
        new.support_avx512bf16_for_cpu = False  # it would repack the storage in place: see keep_4bit_layout
        if head.bias is not None:
            new.bias = nn.Parameter(head.bias.data, requires_grad=False)
        model.set_submodule(names[id(head)], new)
    model.resize_token_embeddings = _refuse_resize
    return {"tied": tied, "head": head is not None}


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
    for every 4-bit layer, the 4-bit output head included (whose storage a tied 4-bit embedding reads too,
    so repacking it would also scramble every lookup), and undoes it where it already happened (the undo
    re-quantises absmax, so it is close to but not bit-identical with the original). Returns the number of
    layers undone."""
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
    """Replace every bitsandbytes 4-bit linear layer with an `nn.Linear`, and a 4-bit embedding with an
    `nn.Embedding`, holding the dequantised weight in `dtype`; returns how many modules were replaced.
    Modules that shared one 4-bit weight (a tied embedding and head) share one float parameter afterwards,
    so the model is tied again. The result equals what the 4-bit model computes (up to the rounding of
    `dtype`), not the original pre-quantisation weights, which are gone."""
    keep_4bit_layout(model)
    floats: dict[int, nn.Parameter] = {}

    def float_weight(param: torch.Tensor) -> nn.Parameter:
        if id(param) not in floats:
            floats[id(param)] = nn.Parameter(_dequantize(param, dtype), requires_grad=False)
        return floats[id(param)]

    targets = [(name, m) for name, m in model.named_modules() if is_4bit_linear(m) or is_4bit_embedding(m)]
    for name, old in targets:
        if is_4bit_embedding(old):
            new = nn.Embedding(old.num_embeddings, old.embedding_dim, old.padding_idx, device="meta", dtype=dtype)
        else:
            new = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None, device="meta", dtype=dtype)
            if old.bias is not None:
                new.bias = nn.Parameter(old.bias.data.to(dtype), requires_grad=False)
        new.weight = float_weight(old.weight)
        model.set_submodule(name, new)
    model.__dict__.pop("resize_token_embeddings", None)  # set by quantize_embeddings_nf4
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
