"""Shared helpers for the preference-method tests: tiny data sets and run configs."""

from __future__ import annotations

import io
import json
from pathlib import Path

from rich.console import Console

WORDS = ["hello world", "quick brown fox", "lazy dog", "card balance", "transfer arrive", "exchange rate",
         "top up", "refund"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pair_rows(n: int = 8, shift: int = 3) -> list[dict]:
    """Prompt 'say X': chosen X, rejected another example's X, so the preference depends on the prompt."""
    return [{"prompt": f"say {WORDS[i % 8]}", "chosen": WORDS[i % 8], "rejected": WORDS[(i + shift) % 8]}
            for i in range(n)]


def kto_rows(n_prompts: int = 8) -> list[dict]:
    rows = []
    for i in range(n_prompts):
        rows.append({"prompt": f"say {WORDS[i]}", "completion": WORDS[i], "label": True})
        rows.append({"prompt": f"say {WORDS[i]}", "completion": WORDS[(i + 3) % 8], "label": False})
    return rows


def run_config(model_dir: Path, out: Path, method: str, train_file: Path, name: str | None = None,
               **sections) -> dict:
    cfg = {"name": name or method, "output_dir": str(out), "model": str(model_dir), "device": "cpu",
           "precision": "fp32", "method": method, "data": {"train": str(train_file), "max_length": 64},
           "train": {"max_steps": 2, "micro_batch_size": 8, "lr": 3e-3, "warmup_ratio": 0.0,
                     "schedule": "constant"}}
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def quiet() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=200), buf


def steps(run) -> list[dict]:
    return [m for m in run.metrics if "step" in m]
