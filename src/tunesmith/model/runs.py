"""Open what `tunesmith train` produced: a run directory → base model with the run's adapter attached."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import TunesmithError


def is_run_dir(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "run.json").exists() and (p / "adapter").is_dir()


def run_info(path: str | Path) -> dict:
    p = Path(path)
    if not is_run_dir(p):
        raise TunesmithError(f"{p} is not a finished tunesmith run (no run.json and adapter/ inside)",
                             hint="pass the run folder `tunesmith train` wrote, e.g. runs/<name>")
    return json.loads((p / "run.json").read_text())


def run_system_prompt(path: str | Path, info: dict | None = None) -> str | None:
    """The system message every training example carried (run.json records it), so serving can send it too.
    Runs recorded before run.json had the field fall back to the config's data.system_prompt."""
    info = run_info(path) if info is None else info
    if "system_prompt" in info:
        return info["system_prompt"] or None
    import yaml

    config_path = Path(path) / "config.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.exists() else {}
    data = config.get("data") if isinstance(config, dict) else None
    return (data.get("system_prompt") if isinstance(data, dict) else None) or None


def base_load_options(run_dir: str | Path) -> dict:
    """How training was allowed to load the run's base model (its config.yaml), so reopening it for
    inference, eval or merging may do the same: {"trust_remote_code", "allow_pickle_weights"}."""
    import yaml

    config_path = Path(run_dir) / "config.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.exists() else {}
    config = config if isinstance(config, dict) else {}
    return {key: bool(config.get(key, False)) for key in ("trust_remote_code", "allow_pickle_weights")}


def load_run(path: str | Path, device="cpu", precision: str = "bf16", dtype: str | None = None):
    """(model, tokenizer, info) for a run: its base model with its adapter attached (inference mode).
    The tokenizer (and chat template) come from the run's adapter folder: what training used."""
    from transformers import AutoTokenizer

    from .adapters import load_adapter
    from .load import load_model_and_tokenizer

    info = run_info(path)
    adapter = Path(path) / "adapter"
    if info.get("adapter_kind") == "full":
        from .load import load_model_and_tokenizer as load

        model, _ = load(str(adapter), device=device, precision=precision, dtype=dtype)
    else:
        quantised = info.get("adapter_kind") == "qlora"
        settings = quantised_base_settings(Path(path), info) if quantised else {}
        settings.pop("dtype", None)  # inference keeps the dtype asked for; NF4 weights are the same either way
        model, _ = load_model_and_tokenizer(info["model"], device=device, precision=precision, dtype=dtype,
                                            quantize_nf4=quantised, **settings, **base_load_options(path))
        model = load_adapter(model, adapter, trainable=False)
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, info


def quantised_base_settings(run_dir: Path, run: dict) -> dict:
    """How a QLoRA run's 4-bit base was made, so that it is re-created with the very same NF4 weights: the
    dtype the weights were quantised from (the run's base dtype, i.e. its precision), double quantisation,
    and whether the embedding and head were quantised too (run.json records it; a config.yaml that has the
    key but leaves it unset means on; a run from before the option existed had them in bf16)."""
    import yaml

    config_path = run_dir / "config.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.exists() else {}
    config = config if isinstance(config, dict) else {}
    adapter = config.get("adapter") if isinstance(config.get("adapter"), dict) else {}
    precision = run.get("precision") or config.get("precision") or "bf16"
    if "quantize_embeddings" in run:
        embeddings = bool(run["quantize_embeddings"])
    else:
        embeddings = "quantize_embeddings" in adapter and adapter["quantize_embeddings"] is not False
    return {"dtype": run.get("base_dtype") or precision,
            "double_quant": bool(run.get("double_quant", adapter.get("double_quant", True))),
            "quantize_embeddings": embeddings}
