"""Which weights train: LoRA / rsLoRA / DoRA / QLoRA adapters through PEFT, or every parameter (`full`).

The base model is never modified by adapter training (PiSSA/OLoRA excepted: they move the principal part
of each weight into the adapter at init; `save_adapter` converts such adapters back into plain LoRA that
applies to the original base). Adapters are saved and loaded in PEFT's own format, safetensors only.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..config import AdapterConfig
from ..errors import TunesmithError
from .quantize import has_4bit_layers, is_4bit_embedding, is_4bit_linear, keep_4bit_layout, logical_numel

ATTENTION_PARENTS = ("self_attn", "attention", "attn")
MLP_PARENTS = ("mlp", "feed_forward", "ffn")
_INITIAL_ADAPTER_ATTR = "_tunesmith_initial_adapter"


# ---------------------------------------------------------------- targets

def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_4bit_linear(module) or type(module).__name__ == "Linear8bitLt"


def _linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear layer of the model except the output head (which is usually tied to the embeddings)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name: m for name, m in model.named_modules()
            if _is_linear(m) and m is not head and name.split(".")[-1] != "lm_head"}


def _under(name: str, parents: tuple[str, ...]) -> bool:
    return len(name.split(".")) >= 2 and name.split(".")[-2] in parents


def resolve_targets(model: nn.Module, spec: str | list[str]) -> list[str]:
    """Full names of the linear modules an adapter wraps. `spec` is "all-linear", "attention", "mlp" or a list
    of module names (a leaf such as "q_proj" matches it in every layer; a full dotted name matches one)."""
    linear = _linear_modules(model)
    if spec == "all-linear":
        found = list(linear)
    elif spec in ("attention", "mlp"):
        parents = ATTENTION_PARENTS if spec == "attention" else MLP_PARENTS
        found = [n for n in linear if _under(n, parents)]
    elif isinstance(spec, str):
        raise TunesmithError(f"adapter.target: unknown preset '{spec}'",
                             "use all-linear, attention, mlp, or a list of module names such as [q_proj, v_proj]")
    else:
        found, unmatched = [], []
        for entry in spec:
            hits = [n for n in linear if n == entry or n.endswith("." + entry)]
            (found.extend(hits) if hits else unmatched.append(entry))
        if unmatched:
            leaves = sorted({n.split(".")[-1] for n in linear})
            raise TunesmithError(f"adapter.target: no linear layer named {unmatched} in this model",
                                 f"linear layers here: {', '.join(leaves)}")
        found = [n for n in linear if n in set(found)]
    if not found:
        leaves = sorted({n.split(".")[-1] for n in linear})
        raise TunesmithError(f"adapter.target '{spec}' matches no linear layer of this model",
                             f"list the layers explicitly, e.g. adapter.target: [{', '.join(leaves[:3])}]")
    return found


def _peft_target_modules(model: nn.Module, names: list[str]) -> list[str]:
    """Leaf names when they select exactly `names` (a readable adapter_config.json), else the full names."""
    leaves = sorted({n.split(".")[-1] for n in names})
    selected = {n for n, _ in model.named_modules() if n.split(".")[-1] in leaves}
    return leaves if selected == set(names) else list(names)


# ---------------------------------------------------------------- applying adapters

def lora_config(model: nn.Module, cfg: AdapterConfig):
    """The `peft.LoraConfig` an AdapterConfig stands for."""
    from peft import LoraConfig

    init = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}[cfg.init]
    return LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none", task_type="CAUSAL_LM",
        target_modules=_peft_target_modules(model, resolve_targets(model, cfg.target)),
        modules_to_save=list(cfg.modules_to_save) or None,
        use_rslora=cfg.rslora,
        use_dora=cfg.dora,
        init_lora_weights=init,
    )


def apply_adapter(model: nn.Module, cfg: AdapterConfig) -> nn.Module:
    """Make the model trainable as `cfg` says. `full`: every parameter trains, the model is returned as is.
    Otherwise the base is frozen and a PeftModel with trainable adapter weights (fp32) is returned."""
    quantized = has_4bit_layers(model)
    if cfg.kind == "full":
        if quantized:
            raise TunesmithError("adapter.kind full cannot train a 4-bit base",
                                 "load the model without quantize_nf4, or use adapter.kind: qlora")
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if cfg.kind == "qlora" and not quantized:
        raise TunesmithError("adapter.kind qlora needs a base loaded in 4-bit",
                             "load the model with quantize_nf4=True, or use adapter.kind: lora")
    if cfg.kind != "qlora" and quantized:
        raise TunesmithError(f"the base is loaded in 4-bit but adapter.kind is {cfg.kind}",
                             "use adapter.kind: qlora (with use_dora / use_rslora for those variants)")
    if cfg.dora and cfg.init in ("pissa", "olora"):
        raise TunesmithError(f"adapter.init '{cfg.init}' with DoRA is not supported: PEFT's conversion back to the "
                             "original base drops the DoRA magnitudes", "use adapter.init: default")
    _check_modules_to_save(model, cfg)
    keep_4bit_layout(model)
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.from_adapter:
        peft_model = load_adapter(model, cfg.from_adapter, trainable=True)
    else:
        from peft import get_peft_model

        peft_model = get_peft_model(model, lora_config(model, cfg))
        if cfg.init in ("pissa", "olora"):
            _remember_initial_adapter(peft_model)
    checkpointing = any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    if checkpointing and hasattr(model, "enable_input_require_grads"):
        # Reentrant checkpointing needs an input that requires grad, or frozen-base blocks get no gradient.
        model.enable_input_require_grads()
    return peft_model


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in the backward pass instead of keeping its activations (non-reentrant
    checkpointing, so a frozen base still passes gradients to the adapters before it)."""
    from peft import PeftModel

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise TunesmithError(f"{type(base).__name__} does not support gradient checkpointing",
                             "set train.grad_checkpointing: false")
    enable = getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable
    enable({"use_reentrant": False})
    base.config.use_cache = False


def compile_layers(model: nn.Module) -> int:
    """torch.compile each decoder layer in place (`Module.compile`: names and state dicts stay as they are).
    Identical layers reuse the same compiled code (a 30-layer model builds no more graphs than a 2-layer one),
    and shapes are dynamic because every packed batch has its own length. Returns how many modules were
    compiled."""
    from peft import PeftModel

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    body = getattr(base, base.base_model_prefix, base)
    layers = getattr(body, "layers", None)
    targets = list(layers) if isinstance(layers, nn.ModuleList) and len(layers) else [body]
    for module in targets:
        module.compile(dynamic=True)
    return len(targets)


def _check_modules_to_save(model: nn.Module, cfg: AdapterConfig) -> None:
    for entry in cfg.modules_to_save:
        hits = [m for n, m in model.named_modules() if n == entry or n.endswith("." + entry)]
        if not hits:
            raise TunesmithError(f"adapter.modules_to_save: no module named '{entry}' in this model",
                                 "use names such as lm_head or embed_tokens")
        embeddings = {id(m) for m in (model.get_input_embeddings(), model.get_output_embeddings())
                      if m is not None} if hasattr(model, "get_output_embeddings") else set()
        if any(id(m) in embeddings and (is_4bit_linear(m) or is_4bit_embedding(m)) for m in hits):
            raise TunesmithError(f"adapter.modules_to_save: '{entry}' is stored in 4-bit "
                                 "(adapter.quantize_embeddings) and cannot be trained in full",
                                 "set adapter.quantize_embeddings: false to train it")
        if any(is_4bit_linear(m) for m in hits):
            raise TunesmithError(f"adapter.modules_to_save: '{entry}' is quantised to 4-bit and cannot be trained",
                                 "wrap it with LoRA through adapter.target instead")


def _remember_initial_adapter(peft_model: nn.Module) -> None:
    """PiSSA/OLoRA rewrite the base weights; keeping the initial adapter lets `save_adapter` convert the
    trained one into a plain LoRA that applies to the original base."""
    path = Path(tempfile.mkdtemp(prefix="tunesmith-initial-adapter-"))
    atexit.register(shutil.rmtree, path, True)
    peft_model.save_pretrained(str(path / "initial"))
    setattr(peft_model, _INITIAL_ADAPTER_ATTR, str(path / "initial"))


# ---------------------------------------------------------------- loading and saving

def _check_adapter_dir(adapter_dir: str | Path) -> Path:
    path = Path(adapter_dir)
    if not path.is_dir():
        raise TunesmithError(f"adapter directory not found: {path}", "point at a folder written by save_adapter")
    if not (path / "adapter_config.json").exists():
        if (path / "config.json").exists():
            raise TunesmithError(f"{path} is a full model checkpoint, not an adapter",
                                 "use it as the model (model: <dir>) instead of loading it as an adapter")
        raise TunesmithError(f"{path} has no adapter_config.json", "point at a folder written by save_adapter")
    if not (path / "adapter_model.safetensors").exists():
        hint = ("it holds adapter_model.bin, a pickle file that tunesmith does not load for safety; re-save it "
                "as safetensors" if (path / "adapter_model.bin").exists() else "the adapter weights are missing")
        raise TunesmithError(f"{path} has no adapter_model.safetensors", hint)
    return path


def load_adapter(base_model: nn.Module, adapter_dir: str | Path, trainable: bool = False) -> nn.Module:
    """Wrap `base_model` (modified in place) with the PEFT adapter saved in `adapter_dir`. Checks that every
    saved adapter tensor was loaded unchanged."""
    from peft import PeftModel

    path = _check_adapter_dir(adapter_dir)
    keep_4bit_layout(base_model)
    try:
        model = PeftModel.from_pretrained(base_model, str(path), is_trainable=trainable)
    except (ValueError, RuntimeError, KeyError, TypeError) as e:
        raise TunesmithError(f"adapter {path} does not fit this base model: {str(e).splitlines()[0]}",
                             f"load the base it was trained on ({_adapter_base(path)})") from None
    _verify_loaded(model, path, "default")
    return model


def _adapter_base(path: Path) -> str:
    cfg = json.loads((path / "adapter_config.json").read_text())
    return cfg.get("base_model_name_or_path") or "see adapter_config.json"


def _verify_loaded(model: nn.Module, path: Path, adapter_name: str) -> None:
    """PEFT only warns about adapter tensors it could not place or did not find; either is an error here,
    as is any loaded tensor that differs from the saved one."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    saved = load_file(str(path / "adapter_model.safetensors"))
    live = get_peft_model_state_dict(model, adapter_name=adapter_name)
    hint = f"load the base it was trained on ({_adapter_base(path)})"
    unplaced, absent = sorted(set(saved) - set(live)), sorted(set(live) - set(saved))
    if unplaced:
        raise TunesmithError(f"adapter {path}: {len(unplaced)} saved tensors fit no layer of this model "
                             f"(first: {unplaced[0]})", hint)
    if absent:
        raise TunesmithError(f"adapter {path} lacks {len(absent)} tensors its config asks for (first: {absent[0]})",
                             "the adapter file is incomplete; save it again with tunesmith")
    for key, tensor in saved.items():
        if live[key].shape != tensor.shape or not torch.equal(live[key].to(tensor.dtype).cpu(), tensor):
            raise TunesmithError(f"adapter {path}: tensor {key} did not load as saved "
                                 f"(shape {tuple(tensor.shape)} vs {tuple(live[key].shape)})", hint)


def save_adapter(model: nn.Module, out_dir: str | Path, state_dict: dict | None = None) -> Path:
    """PEFT models: adapter_config.json + adapter_model.safetensors. A full fine-tune: a complete HF
    safetensors checkpoint (config.json + model*.safetensors). `state_dict`: the model's full weights when
    they are sharded across processes (FSDP2) and so not in the module itself."""
    from peft import PeftModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    extra = {"state_dict": state_dict} if state_dict is not None else {}
    if isinstance(model, PeftModel):
        initial = getattr(model, _INITIAL_ADAPTER_ATTR, None)
        model.save_pretrained(str(out), safe_serialization=True,
                              path_initial_model_for_weight_conversion=initial, **extra)
    else:
        model.save_pretrained(str(out), **extra)
    return out


# ---------------------------------------------------------------- optimiser groups and summaries

def _is_lora_b(name: str) -> bool:
    return ".lora_B." in name or ".lora_embedding_B." in name


def _no_decay(name: str, param: torch.Tensor) -> bool:
    """Norm weights, biases and DoRA magnitudes (all 1-D) are not decayed toward zero."""
    return param.ndim < 2 or name.endswith(".bias") or "norm" in name.lower()


def _embedding_weights(model: nn.Module) -> set[int]:
    """ids of the weights of the input embedding and the output head, and of their trained copies
    (modules_to_save); LoRA's own embedding matrices are not among them."""
    from ..config.checks import EMBEDDING_NAMES

    return {id(m.weight) for n, m in model.named_modules()
            if isinstance(m, (nn.Embedding, nn.Linear)) and EMBEDDING_NAMES & set(n.split("."))}


def optimizer_param_groups(model: nn.Module, cfg: AdapterConfig, lr: float,
                           weight_decay: float) -> list[dict]:
    """Param groups for torch optimisers. LoRA+ (cfg.lora_plus_ratio): LoRA B matrices learn at
    ratio × lr. cfg.embedding_lr: a trained input embedding and output head (modules_to_save, or full
    fine-tuning) learn at that rate. Groups carry a "name" key for logging; empty groups
    are dropped."""
    ratio = cfg.lora_plus_ratio if cfg.kind != "full" else None
    groups: dict[str, dict] = {
        "decay": {"params": [], "lr": lr, "weight_decay": weight_decay},
        "no_decay": {"params": [], "lr": lr, "weight_decay": 0.0},
        "lora_B": {"params": [], "lr": lr * (ratio or 1.0), "weight_decay": weight_decay},
        "embedding": {"params": [], "lr": cfg.embedding_lr or lr, "weight_decay": weight_decay},
    }
    embeddings = _embedding_weights(model) if cfg.embedding_lr else set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in embeddings:
            groups["embedding"]["params"].append(p)
        elif _no_decay(name, p):
            groups["no_decay"]["params"].append(p)
        elif ratio and _is_lora_b(name):
            groups["lora_B"]["params"].append(p)
        else:
            groups["decay"]["params"].append(p)
    return [{"name": k, **g} for k, g in groups.items() if g["params"]]


def _param_kind(name: str) -> str:
    if "lora_magnitude_vector" in name:
        return "dora_magnitude"
    if ".lora_A." in name or ".lora_embedding_A." in name:
        return "lora_A"
    if _is_lora_b(name):
        return "lora_B"
    if ".modules_to_save." in name:
        return "modules_to_save"
    return "base"


def trainable_summary(model: nn.Module) -> dict:
    """Counts of weights (4-bit packed weights counted as the weights they hold): trainable, total, percent,
    and trainable counts per kind (lora_A, lora_B, dora_magnitude, modules_to_save, base)."""
    trainable = total = 0
    by_kind: dict[str, int] = {}
    for name, p in model.named_parameters():
        n = logical_numel(p)
        total += n
        if p.requires_grad:
            trainable += n
            kind = _param_kind(name)
            by_kind[kind] = by_kind.get(kind, 0) + n
    percent = 100.0 * trainable / total if total else 0.0
    return {"trainable": trainable, "total": total, "percent": percent, "by_kind": by_kind}


def format_summary(summary: dict) -> str:
    """One line, e.g. "trainable 1,327,104 of 135,842,112 weights (0.977%): lora_A 442,368, lora_B 884,736"."""
    head = (f"trainable {summary['trainable']:,} of {summary['total']:,} weights "
            f"({summary['percent']:.3g}%)")
    parts = [f"{k} {v:,}" for k, v in sorted(summary["by_kind"].items())]
    return head + (": " + ", ".join(parts) if parts else "")
