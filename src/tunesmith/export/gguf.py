"""Write a llama.cpp GGUF file from a standalone Hugging Face checkpoint, in pure Python.

The layout follows what llama.cpp's own converter produces for the llama and qwen2 architectures:
the same metadata keys (from `gguf.Keys` via `gguf.GGUFWriter`), tensor names (`gguf.TensorNameMap`),
and storage rules (1-D tensors and norms stay F32; a Q8_0 tensor whose rows are not a multiple of 32
falls back to F16). Tensors are streamed one at a time, so peak memory is about one tensor, not the model.

Two layout details matter for correctness:

- Rotary embeddings. HF Llama rotates the pairs (j, j + d/2) of each head ("rotate_half"); ggml's
  llama kernel rotates adjacent pairs (2j, 2j + 1). So the rows of every Q and K projection are
  interleaved per head on the way out: row j of the first half goes to 2j, row j of the second half
  to 2j + 1 (`interleave_rotary_rows`). qwen2 in ggml uses the "neox" (half-split) rotation, so its
  Q/K stay as they are; it carries q/k/v biases instead.
- Tied embeddings. When `tie_word_embeddings` is set, no `output.weight` is written; llama.cpp
  then uses `token_embd.weight` for the output projection, as transformers does.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from tunesmith.errors import TunesmithError
from tunesmith.export.gguf_vocab import add_tokenizer, read_json

logger = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType
# dtype name -> (general.file_type, storage type of the 2-D weights)
DTYPES: dict[str, tuple[gguf.LlamaFileType, gguf.GGMLQuantizationType]] = {
    "f32": (gguf.LlamaFileType.ALL_F32, Q.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, Q.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, Q.BF16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, Q.Q8_0),
}
# HF class -> GGUF architecture. llama.cpp converts Mistral as llama (same graph, same rotary layout).
ARCHITECTURES: dict[str, gguf.MODEL_ARCH] = {
    "LlamaForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "MistralForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "Qwen2ForCausalLM": gguf.MODEL_ARCH.QWEN2,
}
_SKIPPED_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclass(frozen=True)
class ModelShape:
    """The hyper-parameters export needs, read once from config.json."""

    arch: gguf.MODEL_ARCH
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    tied: bool

    @property
    def interleaves_rotary(self) -> bool:
        return self.arch == gguf.MODEL_ARCH.LLAMA


def read_config(hf_dir: Path) -> dict:
    return read_json(hf_dir / "config.json")


def model_shape(config: dict, where: Path) -> ModelShape:
    names = config.get("architectures") or []
    arch = next((ARCHITECTURES[n] for n in names if n in ARCHITECTURES), None)
    if arch is None:
        raise TunesmithError(f"{where / 'config.json'}: architecture {names or '(none)'} cannot be exported to GGUF",
                             hint=f"supported: {', '.join(ARCHITECTURES)}")
    n_heads = config["num_attention_heads"]
    return ModelShape(arch=arch, n_layers=config["num_hidden_layers"], n_heads=n_heads,
                      n_kv_heads=config.get("num_key_value_heads") or n_heads,
                      head_dim=config.get("head_dim") or config["hidden_size"] // n_heads,
                      vocab_size=config["vocab_size"], tied=bool(config.get("tie_word_embeddings", False)))


def rope_settings(config: dict) -> tuple[float, dict]:
    """(rope theta, scaling dict) from either transformers 5 `rope_parameters` or older `rope_scaling`."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    return float(theta), (params | {"rope_type": kind})


def llama3_rope_factors(theta: float, head_dim: int, scaling: dict) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1's rope scaling (llama.cpp's `rope_freqs.weight`).

    Long wavelengths are slowed by `factor`, short ones are kept, and the band between is blended.
    """
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (old_len / wavelen - low) / (high - low)
    blended = 1.0 / ((1 - smooth) / factor + smooth)
    factors = np.where(wavelen < old_len / high, 1.0, np.where(wavelen > old_len / low, factor, blended))
    return factors.astype(np.float32)


def add_hparams(writer: gguf.GGUFWriter, shape: ModelShape, config: dict) -> None:
    if shape.arch == gguf.MODEL_ARCH.LLAMA:
        writer.add_vocab_size(shape.vocab_size)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(shape.n_layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(shape.n_heads)
    writer.add_head_count_kv(shape.n_kv_heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if config.get("head_dim"):
        writer.add_key_length(shape.head_dim)
        writer.add_value_length(shape.head_dim)
    theta, scaling = rope_settings(config)
    writer.add_rope_freq_base(theta)
    if shape.arch == gguf.MODEL_ARCH.LLAMA:
        writer.add_rope_dimension_count(shape.head_dim)
    kind = scaling["rope_type"]
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(scaling["factor"])
        writer.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
    elif kind not in ("default", "llama3"):  # llama3 is written as the rope_freqs.weight tensor
        raise TunesmithError(f"config.json: rope scaling type {kind!r} is not supported by the GGUF exporter",
                             hint="supported: none, linear, yarn, llama3")
    window = config.get("sliding_window")
    if window and config.get("use_sliding_window", True) and window < config["max_position_embeddings"]:
        logger.warning("config.json sets sliding_window = %s; llama.cpp attends over the full context instead",
                       window)


def interleave_rotary_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder Q/K projection rows (or biases) from HF's half-split rotary layout to ggml's interleaved one."""
    half = weight.shape[0] // n_heads // 2
    per_head = weight.reshape(n_heads, 2, half, *weight.shape[1:])
    return per_head.transpose(1, 2).reshape(weight.shape)


def storage_type(gguf_name: str, shape: tuple[int, ...], wanted: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """llama.cpp's rule: vectors and norms stay F32; rows a quant block cannot tile fall back to F16."""
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight"):
        return Q.F32
    if not gguf_name.endswith((".weight", ".lora_a", ".lora_b")):
        return Q.F32
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    if shape[-1] % block:
        logger.info("%s: row length %d is not a multiple of %d, storing F16 instead of %s",
                    gguf_name, shape[-1], block, wanted.name)
        return Q.F16
    return wanted


def encoded_nbytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * type_size


def encode(tensor: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    array = tensor.detach().to(torch.float32).contiguous().numpy()
    return gguf.quants.quantize(array, qtype)


def safetensors_files(folder: Path, exclude_prefix: str = "adapter_") -> list[Path]:
    files = sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith(exclude_prefix))
    if not files:
        raise TunesmithError(f"{folder}: no *.safetensors weights found",
                             hint="export needs a merged, standalone checkpoint (tunesmith export RUN --format merged)")
    return files


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)


def gguf_tensor_name(name_map: gguf.TensorNameMap, hf_name: str, where: str) -> str:
    mapped = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise TunesmithError(f"{where}: tensor {hf_name!r} has no GGUF name for this architecture",
                             hint="is this a plain causal-LM checkpoint (no adapters or extra heads)?")
    return mapped


def rotary_heads(shape: ModelShape, gguf_name: str) -> int | None:
    """How many heads to interleave for this tensor, or None when it needs no reordering."""
    if not shape.interleaves_rotary:
        return None
    if ".attn_q." in gguf_name:
        return shape.n_heads
    if ".attn_k." in gguf_name:
        return shape.n_kv_heads
    return None


def _model_tensors(hf_dir: Path, shape: ModelShape, config: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor in GGUF row order) for every tensor the file needs, lazily."""
    name_map = gguf.get_tensor_name_map(shape.arch, shape.n_layers)
    theta, scaling = rope_settings(config)
    if scaling["rope_type"] == "llama3":
        yield "rope_freqs.weight", torch.from_numpy(llama3_rope_factors(theta, shape.head_dim, scaling))
    seen_output = False
    for hf_name, tensor in iter_safetensors(safetensors_files(hf_dir)):
        if hf_name.endswith(_SKIPPED_SUFFIXES) or (shape.tied and hf_name == "lm_head.weight"):
            continue
        gguf_name = gguf_tensor_name(name_map, hf_name, str(hf_dir))
        seen_output |= gguf_name == "output.weight"
        heads = rotary_heads(shape, gguf_name)
        yield gguf_name, interleave_rotary_rows(tensor, heads) if heads else tensor
    if not shape.tied and not seen_output:
        raise TunesmithError(f"{hf_dir}: tie_word_embeddings is false but there is no lm_head.weight",
                             hint="the checkpoint is incomplete; re-save it with save_pretrained")


def _shapes(hf_dir: Path, shape: ModelShape, config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of `_model_tensors` without reading tensor data (safetensors headers only)."""
    from safetensors import safe_open

    result = []
    name_map = gguf.get_tensor_name_map(shape.arch, shape.n_layers)
    if rope_settings(config)[1]["rope_type"] == "llama3":
        result.append(("rope_freqs.weight", (shape.head_dim // 2,)))
    for path in safetensors_files(hf_dir):
        with safe_open(str(path), framework="pt") as handle:
            for hf_name in handle.keys():
                if hf_name.endswith(_SKIPPED_SUFFIXES) or (shape.tied and hf_name == "lm_head.weight"):
                    continue
                dims = tuple(handle.get_slice(hf_name).get_shape())
                result.append((gguf_tensor_name(name_map, hf_name, str(hf_dir)), dims))
    return result


def write_streamed(out_path: Path, writer: gguf.GGUFWriter, planned: list[tuple[str, tuple[int, ...], Q]],
                   tensors: Iterator[tuple[str, torch.Tensor]]) -> Path:
    """Write header, metadata and tensor infos, then each tensor as it comes; atomically replace out_path."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(out_path.name + ".partial")
    try:
        for name, dims, qtype in planned:
            writer.add_tensor_info(name, dims, np.dtype(np.float32), encoded_nbytes(dims, qtype), raw_dtype=qtype)
        writer.write_header_to_file(path=partial)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for (name, dims, qtype), (got_name, tensor) in zip(planned, tensors, strict=True):
            assert name == got_name and tuple(tensor.shape) == dims, (name, got_name)
            writer.write_tensor_data(encode(tensor, qtype))
        writer.close()
        os.replace(partial, out_path)
    finally:
        partial.unlink(missing_ok=True)
    return out_path


def file_type_for(dtype: str) -> tuple[gguf.LlamaFileType, gguf.GGMLQuantizationType]:
    if dtype not in DTYPES:
        raise TunesmithError(f"unknown GGUF dtype {dtype!r}", hint=f"choose one of: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def export_gguf(hf_dir: str | Path, out_path: str | Path, dtype: str = "f16", name: str | None = None) -> Path:
    """Write `hf_dir` (safetensors + config.json + tokenizer files) as one GGUF file at `out_path`.

    dtype: "f32", "f16", "bf16" or "q8_0" for the 2-D weights; vectors and norms are always F32.
    """
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    file_type, wanted = file_type_for(dtype)
    config = read_config(hf_dir)
    shape = model_shape(config, hf_dir)

    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[shape.arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or hf_dir.name)
    add_hparams(writer, shape, config)
    writer.add_file_type(file_type)
    add_tokenizer(writer, hf_dir, shape.vocab_size)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    planned = [(n, dims, storage_type(n, dims, wanted)) for n, dims in _shapes(hf_dir, shape, config)]
    path = write_streamed(out_path, writer, planned, _model_tensors(hf_dir, shape, config))
    logger.info("wrote %s (%s, %d tensors)", path, dtype, len(planned))
    return path


def _lora_config(adapter_dir: Path) -> dict:
    config = read_json(adapter_dir / "adapter_config.json")
    where = str(adapter_dir / "adapter_config.json")
    unsupported = {
        "peft_type": config.get("peft_type", "LORA") != "LORA",
        "use_dora": bool(config.get("use_dora")),
        "modules_to_save": bool(config.get("modules_to_save")),
        "bias": config.get("bias", "none") != "none",
        "trainable_token_indices": bool(config.get("trainable_token_indices")),
    }
    bad = [field for field, is_bad in unsupported.items() if is_bad]
    if bad:
        raise TunesmithError(f"{where}: {', '.join(f'{b}={config.get(b)!r}' for b in bad)} cannot be written as a "
                             "llama.cpp LoRA (plain LoRA on linear layers only)",
                             hint="export the merged model instead (tunesmith export RUN --format gguf)")
    return config


def _lora_pairs(adapter_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{base module name: {"A": tensor, "B": tensor}} from adapter_model.safetensors."""
    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        raise TunesmithError(f"{path} is missing", hint="a PEFT adapter folder has adapter_model.safetensors")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in iter_safetensors([path]):
        module, dot, leaf = key.removeprefix("base_model.model.").rpartition(".lora_")
        if not dot or leaf not in ("A.weight", "B.weight"):
            raise TunesmithError(f"{path}: tensor {key!r} is not a LoRA A/B matrix of a linear layer",
                                 hint="embedding LoRA and extra trained modules are not supported by this export")
        pairs.setdefault(module, {})[leaf[0]] = tensor
    incomplete = [m for m, ab in pairs.items() if set(ab) != {"A", "B"}]
    if incomplete:
        raise TunesmithError(f"{path}: {incomplete[0]} has only one of lora_A / lora_B")
    return pairs


def lora_scale(config: dict, module: str, rank: int) -> float:
    """The scale PEFT applies to B @ A for this module (alpha/r, alpha/sqrt(r) with rsLoRA, patterns honoured)."""
    from peft.utils.other import get_pattern_key

    alpha_pattern = config.get("alpha_pattern") or {}
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config["lora_alpha"])
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def export_gguf_lora(adapter_dir: str | Path, base_hf_dir: str | Path, out_path: str | Path,
                     dtype: str = "f32") -> Path:
    """Write a PEFT LoRA adapter alone as a llama.cpp LoRA GGUF (`llama-server --lora FILE`).

    llama.cpp scales every pair by adapter.lora.alpha / rank; where PEFT's scale differs (rsLoRA,
    alpha_pattern) the difference is folded into lora_b, so the served delta equals PEFT's.
    """
    adapter_dir, base_hf_dir, out_path = Path(adapter_dir), Path(base_hf_dir), Path(out_path)
    _, wanted = file_type_for(dtype)
    config = _lora_config(adapter_dir)
    shape = model_shape(read_config(base_hf_dir), base_hf_dir)
    name_map = gguf.get_tensor_name_map(shape.arch, shape.n_layers)
    alpha = float(config["lora_alpha"])

    tensors: list[tuple[str, torch.Tensor]] = []
    for module, pair in _lora_pairs(adapter_dir).items():
        base_name = gguf_tensor_name(name_map, module + ".weight", str(adapter_dir))
        if shape.tied and base_name == "output.weight":
            raise TunesmithError(f"{adapter_dir}: the adapter trains lm_head, which is tied to the embeddings",
                                 hint="llama.cpp cannot apply it; export the merged model instead")
        lora_a, lora_b = pair["A"].float(), pair["B"].float()
        rank = lora_a.shape[0]
        lora_b = lora_b * (lora_scale(config, module, rank) * rank / alpha)
        heads = rotary_heads(shape, base_name)
        tensors += [(base_name + ".lora_a", lora_a),
                    (base_name + ".lora_b", interleave_rotary_rows(lora_b, heads) if heads else lora_b)]

    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[shape.arch])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(adapter_dir.name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    planned = [(n, tuple(t.shape), storage_type(n, tuple(t.shape), wanted)) for n, t in tensors]
    return write_streamed(out_path, writer, planned, iter(tensors))
