"""How long a run takes: the FLOPs its micro-batches execute, at a throughput that is either measured on this
machine (`calibrate`: a few real steps of the run through the training code) or a device's published peak
times a stated utilisation."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import RunConfig
from .devices import Device
from .flops import SeqStats, Shapes, forward_flops, matmul_rate, recompute_flops, training_flops
from .memory import BatchShape

ASSUMED_UTILISATION = {"cuda": 0.35, "cpu": 0.40}  # share of the peak a step's executed FLOPs reach
DDP_EFFICIENCY = 0.90  # per-rank throughput kept when ranks exchange gradients (an assumption, not measured)


@dataclass
class TimeEstimate:
    train_s: float
    reference_s: float
    flops_per_s: float  # executed FLOPs per second the estimate uses (per rank)
    source: str  # how the throughput was obtained, in words
    model_flops: float  # MFU FLOPs of the whole run (bench/mfu.py definition)
    executed_flops: float  # what the micro-batches run: padding and full attention rows, recomputation
    startup_s: float | None = None  # model load and data, when measured

    @property
    def total_s(self) -> float:
        return self.train_s + self.reference_s + (self.startup_s or 0.0)


def executed_flops(shapes: Shapes, batches: list[BatchShape], lora_r: int | None, checkpointing: bool) -> float:
    """FLOPs the micro-batches execute: every position of every row (padding included), attention over each
    whole row, the head on trained positions, one more forward of the body with gradient checkpointing."""
    total = 0.0
    for b in batches:
        seqs = SeqStats((b.width,) * b.rows, (b.targets,))
        total += training_flops(shapes, seqs, lora_r)
        if checkpointing:
            total += recompute_flops(shapes, seqs)
    return total


def model_flops(shapes: Shapes, sequences: SeqStats, lora_r: int | None) -> float:
    return training_flops(shapes, sequences, lora_r)


def reference_flops(shapes: Shapes, sequences: SeqStats | None) -> float:
    return forward_flops(shapes, sequences) if sequences is not None else 0.0


def peak_rate(device: Device, precision: str, shapes: Shapes) -> tuple[float, str]:
    """(executed FLOP/s, how it was obtained) without running the model: the published peak of a listed GPU,
    or this CPU's matmul rate on the model's own shapes (a fraction of a second), times the stated share."""
    share = ASSUMED_UTILISATION[device.kind]
    peak = device.peak_flops(precision)
    if peak is not None:
        return peak * share, (f"{device.name}: published {precision} peak {peak / 1e12:.0f} TFLOP/s x assumed "
                              f"{share:.0%} utilisation")
    if device.kind == "cpu" and device.here:
        import torch

        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        rows = 512 if dtype == torch.float32 or device.native_bf16 else 32  # emulated bf16: ~1 GFLOP/s
        rate = matmul_rate(rows, shapes.hidden, shapes.intermediate, dtype, seconds=0.05)
        return rate * share, (f"this CPU: measured {precision} matmul rate {rate / 1e9:.0f} GFLOP/s x assumed "
                              f"{share:.0%} utilisation (--calibrate measures real steps)")
    return 0.0, f"{device.name}: no published peak in the price table"


def estimate(shapes: Shapes, batches: list[BatchShape], scale: float, sequences: SeqStats,
             ref_sequences: SeqStats | None, lora_r: int | None, checkpointing: bool, rate: float, source: str,
             world: int = 1, startup_s: float | None = None) -> TimeEstimate:
    executed = executed_flops(shapes, batches, lora_r, checkpointing) * scale
    ref = reference_flops(shapes, ref_sequences)
    per_rank = rate * (DDP_EFFICIENCY if world > 1 else 1.0)
    if world > 1:
        source += f"; {world} ranks at an assumed {DDP_EFFICIENCY:.0%} of a lone rank's throughput each"
    train_s = executed / (per_rank * world) if per_rank else float("nan")
    ref_s = ref / (per_rank * world) if per_rank else float("nan")
    return TimeEstimate(train_s, ref_s, rate, source, model_flops(shapes, sequences, lora_r), executed,
                        startup_s)


@dataclass
class Calibration:
    flops_per_s: float  # executed FLOPs per second over the timed steps
    step_s: list[float]  # wall time of each timed step
    steps: int
    startup_s: float  # load, render and (for DPO/KTO) the subset's reference pass
    peak_rss_bytes: int | None


def calibrate(cfg: RunConfig, steps: int = 3, console=None) -> Calibration:
    """Run `steps` + 1 real optimizer steps of this run (the first one warms up and is not timed) through
    `train.recipe.train_stage` on a seeded sample of its examples, in a temporary run folder, and measure the
    executed FLOPs per second of the timed steps."""
    import resource

    from rich.console import Console

    from ..methods import get_method
    from ..model.load import load_tokenizer
    from ..train.recipe import train_stage
    from .data import profile

    n = steps + 1
    t = cfg.train
    examples = n * t.micro_batch_size * t.grad_accum
    with tempfile.TemporaryDirectory(prefix="tunesmith-calibrate-") as tmp:
        sub = cfg.model_copy(update={
            "name": "calibrate", "output_dir": tmp, "eval": None, "stages": [],
            "data": cfg.data.model_copy(update={"max_examples": min(examples, cfg.data.max_examples or examples),
                                                "eval": None, "eval_split": 0.0}),
            "train": t.model_copy(update={"max_steps": n, "eval_every": None, "save_every": None}),
            "method_args": cfg.method_args.model_copy(update={"reference_cache": False})})
        quiet = console if console is not None else Console(quiet=True)
        started = time.perf_counter()
        run = train_stage(sub, Path(tmp) / "calibrate", quiet, progress=False)
        wall = time.perf_counter() - started
    history = run.state.history if run.state else []
    times = [r["time"] for r in history]
    dts = [b - a for a, b in zip([0.0] + times[:-1], times, strict=True)]
    timed = dts[1:] or dts
    method = get_method(sub.method, sub.method_args)
    prof = profile(sub, load_tokenizer(sub.model, sub.trust_remote_code, sub.revision), method)
    per_step = len(prof.shapes) // max(len(dts), 1)
    lora_r = None if cfg.adapter.kind == "full" else cfg.adapter.r
    shapes = shapes_of(cfg)
    timed_batches = prof.shapes[per_step * (len(dts) - len(timed)):]
    flops = executed_flops(shapes, timed_batches, lora_r, t.grad_checkpointing)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return Calibration(flops / sum(timed), timed, len(timed), max(0.0, wall - sum(dts)), rss)


def shapes_of(cfg: RunConfig) -> Shapes:
    from .architecture import load_architecture

    return Shapes.of_architecture(load_architecture(cfg.model, cfg.trust_remote_code))
