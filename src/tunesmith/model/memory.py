"""Peak memory of this process: resident set size (every device) and, on CUDA, what PyTorch's allocator
allocated (tensors alive at the peak) and reserved (what the GPU had to hold, cached blocks included: the
figure that decides whether a run fits). Reported in run.json and by the benchmarks."""

from __future__ import annotations

import resource
from pathlib import Path

import torch
from torch import nn

MIB = 2**20


def peak_rss_mib() -> float:
    """This process's own peak RSS. Linux's VmHWM where there is one: ru_maxrss carries a parent's peak across
    fork and exec into a child, so a run started by a large process would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _mapped_checkpoints() -> list[tuple[int, int]]:
    """Address ranges where this process maps a safetensors file (Linux; empty elsewhere)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].endswith(".safetensors"):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((lo, hi))
    return ranges


def release_checkpoint_mapping(model: nn.Module) -> int:
    """Copy out the tensors that still point into the memory-mapped checkpoint, so the mapping can go.

    After a load that converted the weights (NF4 quantisation, another dtype), the few tensors left as they
    were (norms, rotary buffers) are views of the mapped file and keep all of it mapped: every page the
    conversion read stays in the process's RSS (514 MiB on SmolLM2-135M's fp32 file under QLoRA). Tied
    tensors stay tied. A model whose weights are the mapped file (loaded in the file's own dtype) is left as it
    is: there the mapping is the weights. Returns the bytes copied."""
    ranges = _mapped_checkpoints()
    if not ranges:
        return 0

    def mapping(t: torch.Tensor) -> tuple[int, int] | None:
        ptr = t.data_ptr()
        return next(((lo, hi) for lo, hi in ranges if lo <= ptr < hi), None) if t.device.type == "cpu" else None

    found = [(store, name, t, mapping(t)) for module in model.modules()
             for store in (module._parameters, module._buffers) for name, t in store.items() if t is not None]
    found = [x for x in found if x[3] is not None]
    in_file: dict[tuple[int, int], int] = {}
    for t, where in {id(t): (t, where) for _, _, t, where in found}.values():
        in_file[where] = in_file.get(where, 0) + t.numel() * t.element_size()
    # per mapped file (other models of the process may map theirs): copy out only where this model's tensors
    # are a small part of the file
    release = {where for where, n in in_file.items() if n * 2 <= where[1] - where[0]}
    copies: dict[int, torch.Tensor] = {}
    copied = 0
    for store, name, t, where in found:
        if where not in release:
            continue
        if id(t) not in copies:
            data = t.detach().clone()
            copies[id(t)] = nn.Parameter(data, t.requires_grad) if isinstance(t, nn.Parameter) else data
            copied += t.numel() * t.element_size()
        store[name] = copies[id(t)]
    return copied


def cuda_peaks(device: torch.device | str | None = None) -> dict[str, float] | None:
    """Peak allocated and reserved CUDA memory since the process started (or the last reset), with the
    device's total, in MiB; None when `device` is not a CUDA device or CUDA is not available."""
    device = torch.device(device) if device is not None else None
    if (device is not None and device.type != "cuda") or not torch.cuda.is_available():
        return None
    return {"peak_allocated_mib": round(torch.cuda.max_memory_allocated(device) / MIB, 1),
            "peak_reserved_mib": round(torch.cuda.max_memory_reserved(device) / MIB, 1),
            "total_mib": round(torch.cuda.get_device_properties(device).total_memory / MIB, 1)}


def reset_peaks(device: torch.device | str | None = None) -> None:
    """Start the CUDA peak counters afresh (the RSS peak cannot be reset portably)."""
    device = torch.device(device) if device is not None else None
    if (device is None or device.type == "cuda") and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(device)


def memory_report(device: torch.device | str | None = None) -> dict:
    """{"peak_rss_mib": ..., "cuda": {peak_allocated_mib, peak_reserved_mib, total_mib} or None}."""
    return {"peak_rss_mib": round(peak_rss_mib(), 1), "cuda": cuda_peaks(device)}
