"""Fold a trained adapter into its base and write a standalone Hugging Face checkpoint.

QLoRA: the base only exists in 4-bit, so it is dequantised (to the merge dtype) and the adapter delta is
added to that. The merged model therefore reproduces the QLoRA model as trained (dequantised NF4 base +
adapter), not "original full-precision base + adapter": the NF4 rounding of the base stays in the weights,
and the result is a full-size float checkpoint. Re-quantising merged weights (what merging straight into a
4-bit layer does) would add a second rounding on top and is avoided.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from ..errors import TunesmithError
from .quantize import clear_quantization_marks, dequantize_4bit_layers, has_4bit_layers, is_4bit_embedding
from .runs import base_load_options, quantised_base_settings

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SAMPLE_CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris is the capital of France."}],
    [{"role": "user", "content": "Write one sentence about the sea."}],
]


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise TunesmithError(f"unknown dtype '{name}'", f"choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def merge_adapter(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Merge the active adapter of a PeftModel into its base and return the plain base model. In place: the
    PeftModel is consumed. `dtype` (default: keep the base dtype; the compute dtype for a 4-bit base) is the
    precision the merge happens in. A model without adapters is returned as is (cast to `dtype` if given)."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return model.to(dtype) if dtype is not None else model
    if has_4bit_layers(model):
        return _merge_into_dequantised(model, dtype)
    if dtype is not None:
        model.to(dtype)
    name = model.active_adapter
    merged = model.merge_and_unload(safe_merge=True, adapter_names=[name])
    return merged


def _merge_into_dequantised(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """Re-attach the adapter to a dequantised copy of the 4-bit base, then merge there (PEFT merges into
    Linear4bit by re-quantising, which loses most of a small adapter delta)."""
    from peft import get_peft_model, set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict

    name = model.active_adapter
    config = copy.deepcopy(model.peft_config[name])
    config.init_lora_weights = True  # weights are overwritten below; PiSSA/OLoRA must not re-run
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}
    quant_config = getattr(getattr(model, "config", None), "quantization_config", None)
    dtype = dtype or _compute_dtype(quant_config) or torch.float32
    base = model.unload()
    dequantize_4bit_layers(base, dtype)
    clear_quantization_marks(base)
    base.to(dtype)
    rewrapped = get_peft_model(base, config, adapter_name=name)
    result = set_peft_model_state_dict(rewrapped, state, adapter_name=name)
    if result.unexpected_keys:
        raise TunesmithError(f"merge: {len(result.unexpected_keys)} adapter tensors did not fit the dequantised "
                             f"base (first: {result.unexpected_keys[0]})", "this is a bug; please report it")
    return rewrapped.merge_and_unload(safe_merge=True, adapter_names=[name])


def _compute_dtype(quant_config) -> torch.dtype | None:
    if quant_config is None:
        return None
    value = quant_config.get("bnb_4bit_compute_dtype") if isinstance(quant_config, dict) else \
        getattr(quant_config, "bnb_4bit_compute_dtype", None)
    if isinstance(value, str):
        return getattr(torch, value.replace("torch.", ""), None)
    return value


@torch.no_grad()
def logits_of(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits of a model in eval mode (its train/eval mode is restored afterwards)."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        out = model(input_ids=input_ids.to(device), attention_mask=torch.ones_like(input_ids, device=device))
        return out.logits.float().cpu()
    finally:
        model.train(was_training)


def check_merge_parity(adapter_model: nn.Module | torch.Tensor, merged_model: nn.Module,
                       input_ids: torch.Tensor, tol: float) -> float:
    """Max absolute logit difference between the adapter model (or its logits computed before merging,
    since merging consumes it) and the merged model. Raises above `tol` or on NaN/inf."""
    ref = adapter_model if isinstance(adapter_model, torch.Tensor) else logits_of(adapter_model, input_ids)
    got = logits_of(merged_model, input_ids)
    if not torch.isfinite(ref).all():
        raise TunesmithError("the adapter model produces NaN/inf logits", "the training run diverged; use an "
                             "earlier checkpoint or a lower learning rate")
    if not torch.isfinite(got).all():
        raise TunesmithError("the merged model produces NaN/inf logits",
                             "merge in higher precision (dtype fp32) or check the adapter for overflow")
    diff = (ref.float() - got).abs().max().item()
    if diff > tol:
        raise TunesmithError(f"merged model differs from the adapter model: max |logit diff| {diff:.3g} > {tol:.3g}",
                             "merge in fp32, and check that the base model is the one the adapter was trained on")
    return diff


def end_of_turn_ids(tokenizer) -> list[int]:
    """The ids that end a reply (as training rendered them), EOS first: generation_config lists them all."""
    from ..data.render import end_of_turn_ids as turn_enders

    ids = turn_enders(tokenizer)
    eos = tokenizer.eos_token_id
    return ([int(eos)] if eos is not None else []) + sorted(int(i) for i in ids if i != eos)


def _generation_config(model: nn.Module, tokenizer):
    from transformers import GenerationConfig

    gen = copy.deepcopy(getattr(model, "generation_config", None)) or GenerationConfig.from_model_config(model.config)
    existing = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    eos = end_of_turn_ids(tokenizer)
    eos += [int(i) for i in existing if i is not None and int(i) not in eos]
    if not eos:
        raise TunesmithError("the tokenizer has no eos token, so generation would never stop",
                             "set tokenizer.eos_token before writing the merged model")
    gen.eos_token_id = eos if len(eos) > 1 else eos[0]
    gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    if tokenizer.bos_token_id is not None:
        gen.bos_token_id = tokenizer.bos_token_id
    return gen


def write_merged(model: nn.Module, tokenizer, out_dir: str | Path, dtype: str = "bf16") -> Path:
    """Write a standalone HF checkpoint: safetensors weights in `dtype`, config, generation_config.json
    (eos = eos + end-of-turn ids), tokenizer and chat template."""
    from peft import PeftModel

    target = _dtype(dtype)
    if isinstance(model, PeftModel):
        raise TunesmithError("write_merged got a model with an unmerged adapter", "call merge_adapter first")
    if has_4bit_layers(model):
        raise TunesmithError("write_merged got a 4-bit model", "call merge_adapter first (it dequantises)")
    clear_quantization_marks(model)
    model.to(target)
    model.generation_config = _generation_config(model, tokenizer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def sample_input_ids(tokenizer) -> torch.Tensor:
    """A small fixed batch for parity checks: chat-formatted conversations, right-trimmed to equal length."""
    if getattr(tokenizer, "chat_template", None):
        texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in SAMPLE_CONVERSATIONS]
    else:
        texts = ["What is the capital of France? Paris.", "Write one sentence about the sea."]
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    n = min(len(r) for r in rows)
    return torch.tensor([r[:n] for r in rows], dtype=torch.long)


def _read_run(run_dir: Path) -> dict:
    path = run_dir / "run.json"
    if not path.exists():
        raise TunesmithError(f"{path} not found", "point merge at a run folder written by tunesmith train")
    try:
        run = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TunesmithError(f"{path} is not valid JSON: {e.msg} (line {e.lineno})",
                             "the run folder is damaged") from None
    for key in ("model", "adapter_kind"):
        if key not in run:
            raise TunesmithError(f"{path} has no '{key}' key", "the run folder is damaged or from another tool")
    return run


def _upcast_unquantised(model: nn.Module) -> None:
    """fp32 for every parameter outside the 4-bit layers (norms; embeddings unless they are 4-bit, in which
    case they dequantise to fp32), so the adapter model is evaluated in the same precision the merge happens in."""
    for p in model.parameters():
        if not hasattr(p, "quant_state") and p.is_floating_point():
            p.data = p.data.float()
    for m in model.modules():
        if is_4bit_embedding(m):
            m.compute_dtype = torch.float32


def merge_run(run_dir: str | Path, out_dir: str | Path | None = None, dtype: str = "bf16",
              tol: float = 1e-3) -> tuple[Path, dict]:
    """Merge `run_dir/adapter` into the run's base model (merging in fp32), check logits on sample inputs
    against the unmerged model (|diff| <= tol × max(1, max |logit|)), write `dtype` weights to
    `run_dir/merged` (or out_dir), reload them and report how close they stay. Returns (path, report)."""
    from transformers import AutoModelForCausalLM

    from .load import load_model_and_tokenizer

    run_dir = Path(run_dir)
    run = _read_run(run_dir)
    _dtype(dtype)
    adapter_dir = run_dir / "adapter"
    out = Path(out_dir) if out_dir is not None else run_dir / "merged"
    kind = run["adapter_kind"]
    if kind == "full":
        if not (adapter_dir / "config.json").exists():
            raise TunesmithError(f"{adapter_dir} holds no full checkpoint (config.json)", "the run folder is damaged")
        _, tokenizer = load_model_and_tokenizer(run["model"], precision="fp32", **base_load_options(run_dir))
        model = AutoModelForCausalLM.from_pretrained(str(adapter_dir), dtype=torch.float32)
        ids = sample_input_ids(tokenizer)
        ref = logits_of(model, ids)
        report: dict = {"kind": kind, "merged": False, "max_abs_diff": 0.0, "tol": 0.0}
    else:
        from .adapters import load_adapter

        quantised = kind == "qlora"
        settings = quantised_base_settings(run_dir, run) if quantised else {}
        base, tokenizer = load_model_and_tokenizer(run["model"], precision="fp32", quantize_nf4=quantised,
                                                   **settings, **base_load_options(run_dir))
        if quantised:
            _upcast_unquantised(base)
        adapter_model = load_adapter(base, adapter_dir)
        ids = sample_input_ids(tokenizer)
        ref = logits_of(adapter_model, ids)
        model = merge_adapter(adapter_model, dtype=torch.float32)
        bound = tol * max(1.0, ref.abs().max().item())
        diff = check_merge_parity(ref, model, ids, bound)
        report = {"kind": kind, "merged": True, "max_abs_diff": diff, "tol": bound}
    write_merged(model, tokenizer, out, dtype=dtype)
    del model
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=DTYPES[dtype])
    written = logits_of(reloaded, ids)
    if not torch.isfinite(written).all():
        raise TunesmithError(f"the merged checkpoint in {out} produces NaN/inf logits in {dtype}",
                             "write it with dtype fp32")
    report.update({"checked_tokens": int(ids.numel()), "written_dtype": dtype,
                   "written_max_abs_diff": (written - ref).abs().max().item(),
                   "written_top1_agreement": (written.argmax(-1) == ref.argmax(-1)).float().mean().item()})
    return out, report
