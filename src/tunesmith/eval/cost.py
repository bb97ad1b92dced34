"""Cost and latency per candidate, from its answers and the price table (`tunesmith/prices.yaml`, overridable).

- Local candidates (the base model, runs, knn) cost the device's hourly price times the time they took:
  dollars per 1,000 queries = price per hour x (seconds per query) x 1000 / 3600, with the measured time on the
  machine that ran the eval (batched, the shared prompt prefix run once per batch).
- Endpoints cost their per-token list prices: prompt tokens x input price + generated tokens x output price;
  "with caching" prices the prompt tokens a prompt cache serves at the cached-input price. Those are the
  tokens the server reported as cached (0 included) or, when it reports no count, the share of the prompt that
  is a prefix common to every prompt (system message, labels, few-shot examples), measured with the local
  tokenizer: an upper bound, since providers cache only prompts past a minimum length.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..errors import TunesmithError
from .answers import Answer

PER_TOKENS = 1_000_000  # model prices are per 1M tokens


@dataclass(frozen=True)
class Usage:
    candidate: str
    ran_on: str
    n: int
    prompt_tokens: float | None  # means per query
    cacheable_tokens: float | None
    new_tokens: float | None
    cut_off: int  # answers that stopped at the token limit
    latency_p50: float | None  # seconds
    latency_p95: float | None
    seconds: float  # wall time of the whole candidate
    usd_per_1k: float | None
    usd_per_1k_cached: float | None
    price: str | None  # the price entry used, with its date
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mean(values: Sequence[float | int | None]) -> float | None:
    known = [float(v) for v in values if v is not None]
    return float(np.mean(known)) if known else None


def latency(answers: Sequence[Answer]) -> tuple[float | None, float | None]:
    times = [a.seconds for a in answers if a.seconds > 0]
    if not times:
        return None, None
    p50, p95 = np.percentile(times, [50, 95])
    return float(p50), float(p95)


def _gpu_entry(devices: Mapping[str, Any], device_name: str) -> str | None:
    """The entry for a GPU by the name it reports ('NVIDIA H100 80GB HBM3'): its model (the key's first part,
    'h100') must occur in the name; among those, the one with most of the key's parts ('pcie', '80gb'), then
    the longest model ('a100' over 'a10' in 'NVIDIA A100-SXM4-80GB')."""
    low = device_name.lower().replace(" ", "").replace("-", "")
    scored = [((sum(part in low for part in key.lower().split("-")), len(key.split("-")[0])), key)
              for key in devices if key != "cpu" and key.lower().split("-")[0] in low]
    return max(scored, key=lambda s: s[0])[1] if scored else None


def device_rate(prices: Mapping[str, Any], name: str | None, device: str, device_name: str = ""
                ) -> tuple[float, str] | None:
    """(dollars per hour, label) of the device the local candidates ran on: the entry `name`, else the
    `cpu` entry on a CPU or the GPU entry that matches the device's name; None when unknown."""
    devices = prices.get("devices") or {}
    if name is None:
        name = "cpu" if device == "cpu" else _gpu_entry(devices, device_name)
    if name is None:
        return None
    entry = devices.get(name)
    if not isinstance(entry, dict) or not isinstance(entry.get("hourly_usd"), (int, float)):
        raise TunesmithError(f"no hourly price for device '{name}' in the price table",
                             f"known devices: {', '.join(devices) or 'none'}; add one with --prices FILE")
    return float(entry["hourly_usd"]), f"{name} ${entry['hourly_usd']}/h ({entry.get('price_read', 'undated')})"


def local_usage(name: str, ran_on: str, answers: Sequence[Answer], cacheable: float | None,
                rate: tuple[float, str] | None) -> Usage:
    n = len(answers)
    seconds = sum(a.machine_seconds for a in answers)
    p50, p95 = latency(answers)
    usd = rate[0] * seconds / 3600 / n * 1000 if rate is not None and n else None
    return Usage(name, ran_on, n, _mean([a.prompt_tokens for a in answers]), cacheable,
                 _mean([a.new_tokens for a in answers]), sum(a.hit_limit for a in answers), p50, p95, seconds,
                 usd, usd, rate[1] if rate else None,
                 None if rate else "no device price: pass --device-price NAME (see the price table)")


def endpoint_usage(name: str, url: str, model: str, answers: Sequence[Answer], seconds: float,
                   local_prompt: float | None, cacheable: float | None, prices: Mapping[str, Any]) -> Usage:
    n = len(answers)
    p50, p95 = latency(answers)
    prompt = _mean([a.prompt_tokens for a in answers])
    new = _mean([a.new_tokens for a in answers])
    note = None
    if prompt is None:
        prompt, note = local_prompt, "the server reported no token counts: counted with the local tokenizer"
    reported = _mean([a.cached_tokens for a in answers])  # a server that reports 0 cached tokens cached none
    cached = reported if reported is not None else (cacheable / local_prompt * prompt
                                                    if cacheable and local_prompt and prompt else 0.0)
    entry = (prices.get("models") or {}).get(model)
    usd = usd_cached = None
    label = None
    if isinstance(entry, dict) and prompt is not None and new is not None:
        per_in, per_out = float(entry["input"]), float(entry["output"])
        per_cached = float(entry.get("cached_input", per_in))
        usd = (prompt * per_in + new * per_out) / PER_TOKENS * 1000
        usd_cached = ((prompt - cached) * per_in + cached * per_cached + new * per_out) / PER_TOKENS * 1000
        label = f"{model} ${per_in}/${per_cached}/${per_out} per 1M in/cached/out ({entry.get('price_read', 'undated')})"
    elif not isinstance(entry, dict):
        note = f"no price for model '{model}' in the price table: add it with --prices FILE"
    return Usage(name, url, n, prompt, cached, new, sum(a.hit_limit for a in answers), p50, p95, seconds, usd,
                 usd_cached, label, note)


def format_usd(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value == 0:
        return "$0"
    return f"${value:.2f}" if value >= 1 else f"${value:.3g}"


def format_seconds(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value < 0.0005:
        return "<1 ms"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"
