"""The shipped price table (prices.yaml) and user overrides. Two sections: `devices` (hourly prices and
the capabilities `plan` needs, by device name) and `models` (hosted models' per-token prices, by name)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import TunesmithError

SHIPPED = Path(__file__).with_name("prices.yaml")
SECTIONS = ("devices", "models")


def _read(path: Path) -> dict[str, dict[str, Any]]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise TunesmithError(f"cannot read the price table {path}: {e}",
                             f"give a YAML file with the sections {', '.join(SECTIONS)}") from None
    unknown = set(raw) - set(SECTIONS) if isinstance(raw, dict) else {"(not a mapping)"}
    if unknown:
        raise TunesmithError(f"{path}: unknown section(s) {', '.join(sorted(unknown))}",
                             f"a price table has the sections {', '.join(SECTIONS)}")
    return {s: dict(raw.get(s) or {}) for s in SECTIONS}


def load_prices(path: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """The shipped table, with the entries of `path` (when given) replacing or adding to it."""
    table = _read(SHIPPED)
    if path is not None:
        for section, entries in _read(Path(path)).items():
            table[section].update(entries)
    return table
