"""The devices a plan can be made for: this machine's CPU or GPU, or a device of the price table's `devices:`
section (memory, published peak, hourly price)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import TunesmithError
from ..prices import load_prices

GIB = 2**30
# What CUDA keeps beside PyTorch's allocations: the context, cuBLAS workspaces, the caching allocator's slack.
CUDA_RESERVE_GIB = 1.0


@dataclass(frozen=True)
class Device:
    name: str
    kind: str  # cpu | cuda
    memory_bytes: int  # what a run may use
    description: str
    bf16_flops: float | None = None  # published dense peak, FLOP/s
    fp32_flops: float | None = None
    native_bf16: bool = True
    hourly_usd: float | None = None
    price_source: str | None = None
    price_read: str | None = None
    here: bool = False  # this machine's own device
    available_bytes: int | None = None  # this machine: memory not in use by other processes right now

    def peak_flops(self, precision: str) -> float | None:
        return self.fp32_flops if precision == "fp32" else self.bf16_flops

    def resolved_precision(self, requested: str) -> str:
        """What `precision: auto` becomes on this device (model.device.resolve_precision, without the device)."""
        if requested != "auto":
            return "bf16" if requested == "fp16" and self.kind == "cpu" else requested
        if self.kind == "cuda":
            return "bf16" if self.native_bf16 else "fp16"
        return "bf16" if self.native_bf16 else "fp32"


def _meminfo(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def this_cpu() -> Device:
    from ..model.device import cpu_has_native_bf16

    total = _meminfo("MemTotal") or 0
    return Device("cpu", "cpu", total, f"this machine's CPU ({os.cpu_count()} cores)",
                  native_bf16=cpu_has_native_bf16(), here=True, available_bytes=_meminfo("MemAvailable"))


def this_gpu(table: dict) -> Device:
    import torch

    if not torch.cuda.is_available():
        raise TunesmithError("--device cuda: this machine has no CUDA GPU",
                             f"plan for a listed device instead: {', '.join(sorted(table))}")
    props = torch.cuda.get_device_properties(0)
    known = _match_table(props.name, props.total_memory, table)
    memory = int(props.total_memory - CUDA_RESERVE_GIB * GIB)
    base = _from_table(known, table[known], memory) if known else None
    return Device("cuda", "cuda", memory, f"this machine's {props.name}",
                  base.bf16_flops if base else None, base.fp32_flops if base else None,
                  torch.cuda.is_bf16_supported(), base.hourly_usd if base else None,
                  base.price_source if base else None, base.price_read if base else None, here=True)


def _match_table(gpu_name: str, total_memory: int, table: dict) -> str | None:
    """The table entry for a GPU this machine reports, by its name and memory (e.g. 'NVIDIA H100 80GB HBM3')."""
    low = gpu_name.lower().replace(" ", "")
    for name, entry in table.items():
        model = name.split("-")[0]
        mem = float(entry.get("memory_gib", 0))
        if model in low and abs(total_memory / GIB - mem) / max(mem, 1) < 0.1:
            return name
    return None


def _from_table(name: str, entry: dict, memory_bytes: int | None = None) -> Device:
    def flops(key: str) -> float | None:
        return float(entry[key]) * 1e12 if entry.get(key) is not None else None

    memory = memory_bytes if memory_bytes is not None else int((float(entry["memory_gib"]) - CUDA_RESERVE_GIB) * GIB)
    return Device(name, "cuda", memory, str(entry.get("description", name)), flops("bf16_tflops"),
                  flops("fp32_tflops"), bool(entry.get("native_bf16", True)),
                  float(entry["hourly_usd"]) if entry.get("hourly_usd") is not None else None,
                  entry.get("price_source"), str(entry["price_read"]) if entry.get("price_read") else None)


def get_device(name: str | None, prices: str | Path | None = None) -> Device:
    """`cpu` / `cuda` (this machine), `auto` (this machine's GPU if it has one), or a price-table device."""
    table = load_prices(prices)["devices"]
    if name in (None, "auto"):
        import torch

        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return this_cpu()
    if name in ("cuda", "gpu"):
        return this_gpu(table)
    if name == "mps":
        raise TunesmithError("plans for Apple MPS devices are not supported yet",
                             "plan for cpu, or for a listed GPU with --device")
    if name not in table:
        import difflib

        close = difflib.get_close_matches(name, list(table), n=1)
        raise TunesmithError(f"unknown device '{name}'", (f"did you mean '{close[0]}'? " if close else "")
                             + f"devices: cpu, cuda, {', '.join(sorted(table))} (add your own with --prices FILE)")
    try:
        return _from_table(name, table[name])
    except (KeyError, TypeError, ValueError) as e:
        raise TunesmithError(f"price table entry devices.{name} is incomplete or invalid ({e})",
                             "an entry needs memory_gib, bf16_tflops, fp32_tflops and may give hourly_usd") from None


def device_names(prices: str | Path | None = None) -> list[str]:
    return ["cpu", "cuda", *sorted(load_prices(prices)["devices"])]
