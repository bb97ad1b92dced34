"""Peak memory of this process: resident set size (every device) and, on CUDA, what PyTorch's allocator
allocated (tensors alive at the peak) and reserved (what the GPU had to hold, cached blocks included: the
figure that decides whether a run fits). Reported in run.json and by the benchmarks."""

from __future__ import annotations

import resource

import torch

MIB = 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


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
