"""What a run leaves behind: config.yaml, run.json, metrics.jsonl, adapter/ and the tokenizer."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from ..config import RunConfig, dump_config


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("tunesmith", "torch", "transformers", "peft", "safetensors", "bitsandbytes", "gguf"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def data_hash(paths: list[str]) -> str:
    """sha256 over the training data files (names and bytes), streamed."""
    h = hashlib.sha256()
    for p in sorted(set(paths)):
        path = Path(p)
        files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
        for f in files:
            if not f.exists():
                h.update(f"hub:{f}".encode())
                continue
            h.update(str(f.name).encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (tmp file + rename), so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


class RunDir:
    def __init__(self, path: Path, is_main: bool = True):
        self.path = Path(path)
        self.is_main = is_main
        if is_main:
            self.path.mkdir(parents=True, exist_ok=True)
        self._metrics = None
        # Called with every record written to metrics.jsonl (experiment trackers: train/trackers.py).
        self.sinks: list = []

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    def write_config(self, cfg: RunConfig) -> None:
        if self.is_main:
            (self.path / "config.yaml").write_text(dump_config(cfg))

    def write_run_json(self, info: dict) -> None:
        if self.is_main:
            info = {"command": " ".join(sys.argv), "versions": library_versions(), **info}
            write_json(self.path / "run.json", info)

    def read_run_json(self) -> dict:
        p = self.path / "run.json"
        return json.loads(p.read_text()) if p.exists() else {}

    def log(self, record: dict, truncate: bool = False) -> None:
        if not self.is_main:
            return
        if self._metrics is None:
            self._metrics = open(self.path / "metrics.jsonl", "w" if truncate else "a")
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        for sink in self.sinks:
            sink(record, truncate)

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None


def read_metrics(run_dir: Path) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
