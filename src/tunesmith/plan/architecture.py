"""What a plan knows about a model without its weights: the transformers config, and the model built from it on
the meta device (every parameter's name, shape and module, no memory).

A model spec is resolved the way training resolves it (`model.load.resolve`: "default", a local folder, a
.gguf file), plus, for planning only, the architectures shipped in `plan/architectures/*.json` by short name
(`llama-3.1-70b`) or hub id (`meta-llama/Llama-3.1-70B-Instruct`), and hub ids already in the local Hugging Face
cache. Nothing is downloaded.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import TunesmithError

SHIPPED_DIR = Path(__file__).with_name("architectures")
# short name -> hub ids whose config.json has the shipped dimensions (base and instruct share them)
SHIPPED = {
    "llama-3.1-8b": ("meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-8B",
                     "meta-llama/Meta-Llama-3.1-8B-Instruct", "meta-llama/Meta-Llama-3.1-8B"),
    "llama-3.1-70b": ("meta-llama/Llama-3.1-70B-Instruct", "meta-llama/Llama-3.1-70B",
                      "meta-llama/Meta-Llama-3.1-70B-Instruct", "meta-llama/Meta-Llama-3.1-70B"),
    "qwen2.5-7b": ("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B"),
    "qwen2.5-32b": ("Qwen/Qwen2.5-32B-Instruct", "Qwen/Qwen2.5-32B"),
    "mistral-7b": ("mistralai/Mistral-7B-Instruct-v0.3", "mistralai/Mistral-7B-v0.3"),
    "gemma-2-9b": ("google/gemma-2-9b-it", "google/gemma-2-9b"),
    "smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M"),
}


@dataclass(frozen=True)
class Linear:
    name: str
    in_features: int
    out_features: int
    bias: bool
    group: str  # attn_in (q/k/v), attn_out (o), mlp_in (gate/up), mlp_out (down), other
    layer: int  # index of its decoder layer (-1 outside the layers)


@dataclass
class Architecture:
    """Dimensions and parameter inventory of a causal LM, built on the meta device."""

    name: str
    source: str  # where the config came from
    model_type: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    linears: list[Linear]
    embedding_numel: int
    head_numel: int  # 0 when tied (the embedding's table serves as the head)
    other_numel: int  # norms, biases outside linear layers, anything else
    norms_per_layer: int
    fused_norm: bool  # model/fused.py replaces its RMSNorm (saves less for backward)
    fused_mlp: bool  # model/fused.py replaces its SwiGLU MLP
    checkpoint_bytes_per_param: int  # storage dtype of the checkpoint files (what loading maps from disk)
    meta_model: nn.Module | None = field(default=None, repr=False)

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def linear_numel(self) -> int:
        return sum(x.in_features * x.out_features for x in self.linears)

    @property
    def total_numel(self) -> int:
        bias = sum(x.out_features for x in self.linears if x.bias)
        return self.linear_numel + bias + self.embedding_numel + self.head_numel + self.other_numel

    def layer_numel(self) -> int:
        """Weights of one decoder layer (linear layers, their biases and the layer's norms)."""
        return (self.linear_numel + sum(x.out_features for x in self.linears if x.bias)
                + self.norms_per_layer * self.hidden * self.layers) // max(self.layers, 1)


def shipped_names() -> list[str]:
    return sorted(SHIPPED)


def _shipped_name(spec: str) -> str | None:
    low = spec.lower()
    for name, hub_ids in SHIPPED.items():
        if low == name or low in (h.lower() for h in hub_ids):
            return name
    return None


def hub_id_of(spec: str) -> str | None:
    """The first hub id of a shipped architecture (its tokenizer may be in the local cache)."""
    name = _shipped_name(spec)
    return SHIPPED[name][0] if name else spec if "/" in spec and not Path(spec).exists() else None


def resolve_config(spec: str | None, trust_remote_code: bool = False) -> tuple[dict, str, Path | None]:
    """(config dict, where it came from, model folder or None) for a model spec, without downloading."""
    spec = spec or "default"
    shipped = _shipped_name(spec)
    if shipped is not None and not Path(spec).exists():
        path = SHIPPED_DIR / f"{shipped}.json"
        return json.loads(path.read_text()), f"shipped architecture {shipped}", None
    from ..model.load import resolve

    where = resolve(spec, trust_remote_code)
    if isinstance(where, Path):
        return json.loads((where / "config.json").read_text()), str(where), where
    try:
        from huggingface_hub import hf_hub_download

        cached = Path(hf_hub_download(where, "config.json", local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the local cache
        raise TunesmithError(f"model '{spec}': no config.json here and nothing is downloaded for a plan",
                             f"point `model:` at a local folder, or plan one of the shipped architectures: "
                             f"{', '.join(shipped_names())}") from None
    return json.loads(cached.read_text()), f"{where} (local Hugging Face cache)", cached.parent


def _group(name: str) -> str:
    leaf = name.split(".")[-1]
    return {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "qkv_proj": "attn_in",
            "o_proj": "attn_out", "gate_proj": "mlp_in", "up_proj": "mlp_in", "gate_up_proj": "mlp_in",
            "down_proj": "mlp_out"}.get(leaf, "other")


def _layer(name: str) -> int:
    return next((int(part) for part in name.split(".") if part.isdigit()), -1)


@functools.lru_cache(maxsize=16)
def _load(config_json: str, name: str, source: str) -> Architecture:
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..model.adapters import _linear_modules
    from ..model.fused import MLPS, RMS_NORMS

    raw = json.loads(config_json)
    model_type = raw.get("model_type")
    if not model_type:
        raise TunesmithError(f"{source}: config.json has no model_type", "use the model's own config.json")
    try:
        config = AutoConfig.for_model(model_type, **{k: v for k, v in raw.items() if k != "model_type"})
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError) as e:
        raise TunesmithError(f"{source}: transformers cannot build a '{model_type}' model from this config: {e}",
                             "plan a model whose architecture this transformers version knows") from None
    return _inventory(model, config, name, source, raw, _linear_modules(model), RMS_NORMS, MLPS)


def _inventory(model, config, name, source, raw, linear_modules, rms_norms, mlps) -> Architecture:
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    linears = [Linear(n, m.in_features, m.out_features, m.bias is not None, _group(n), _layer(n))
               for n, m in linear_modules.items()]
    counted = {id(m.weight) for m in linear_modules.values()} | {id(m.bias) for m in linear_modules.values()}
    counted |= {id(emb.weight)} | ({id(head.weight)} if head is not None else set())
    other = sum(p.numel() for p in model.parameters() if id(p) not in counted)
    layers = config.num_hidden_layers
    norm_types = {type(m).__name__ for m in model.modules() if "norm" in type(m).__name__.lower()}
    n_norms = sum(1 for m in model.modules() if "norm" in type(m).__name__.lower())
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    dtype = str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16")
    return Architecture(
        name=name, source=source, model_type=config.model_type, vocab=config.vocab_size,
        hidden=config.hidden_size, intermediate=config.intermediate_size, layers=layers, heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim, tied=tied,
        linears=linears, embedding_numel=emb.weight.numel(),
        head_numel=0 if tied or head is None else head.weight.numel(), other_numel=other,
        norms_per_layer=max(1, round((n_norms - 1) / max(layers, 1))),
        fused_norm=bool(norm_types & rms_norms),
        fused_mlp=any(type(m).__name__ in mlps for m in model.modules()),
        checkpoint_bytes_per_param=4 if "32" in dtype else 2, meta_model=model)


def load_architecture(spec: str | None, trust_remote_code: bool = False) -> Architecture:
    """The architecture of a model spec, built on the meta device from its config.json alone."""
    raw, source, folder = resolve_config(spec, trust_remote_code)
    if raw.get("auto_map") and not trust_remote_code:
        from ..model.load import _remote_code_error

        raise _remote_code_error(spec)
    if folder is not None:
        files = sorted(folder.glob("*.safetensors"))
        if files:  # what loading actually maps from disk: the files' dtype, not the config's claim
            raw = {**raw, "dtype": _safetensors_dtype(files[0])}
    name = _shipped_name(spec or "default") or (spec or "default")
    return _load(json.dumps(raw, sort_keys=True), name, source)


def _safetensors_dtype(path: Path) -> str:
    """The dtype of the first tensor in a safetensors file (read from its JSON header)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        first = next(v for k, v in header.items() if k != "__metadata__")
        return {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(first["dtype"], "bfloat16")
    except (OSError, ValueError, StopIteration, KeyError):
        return "bfloat16"
