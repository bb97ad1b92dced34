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
        model, _ = load_model_and_tokenizer(info["model"], device=device, precision=precision, dtype=dtype,
                                            quantize_nf4=info.get("adapter_kind") == "qlora")
        model = load_adapter(model, adapter, trainable=False)
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, info
