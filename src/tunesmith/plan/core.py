"""`plan_run(cfg, ...)`: the memory, time and cost of a run before it starts, with a verdict for the device it
is meant for and, when it does not fit, the changes that make it fit. `check_fits(plan)` is what
`tunesmith train` calls before loading the model."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..config import RunConfig
from ..errors import TunesmithError
from .architecture import Architecture, load_architecture
from .data import DataProfile, load_plan_tokenizer, profile
from .devices import GIB, Device, get_device
from .flops import Shapes
from .memory import BatchShape, Setting, StepMemory, step_memory
from .timing import Calibration, TimeEstimate, estimate, peak_rate

PARALLEL = ("auto", "none", "ddp", "fsdp")
# A CPU training process beyond its tensors, measured on this project's machine (SmolLM2-135M, fp32, tunesmith's
# glibc settings, 2 to 8 rows of 128 tokens, LoRA and full): the libraries, tokenizer and model skeleton (510 MiB
# before the weights are paged in), and the heap glibc keeps beyond the live tensors (see heap_slack).
CPU_PROCESS_BYTES = 510 * 2**20
CPU_HEAP_SLACK = 0.85
CPU_HEAP_SLACK_CHECKPOINTED = 0.55
CPU_HEAP_SLACK_DEQUANT = 0.65
# the examples and their rendering as Python objects: measured 40 bytes a token for the token ids and labels
# (pointers in two tuples, the int objects) and 20 for the parsed examples (banking77, 2,000 examples)
PYTHON_BYTES_PER_TOKEN = 60


@dataclass
class Alternative:
    sets: tuple[str, ...]  # config changes, e.g. ("adapter.kind=qlora",)
    peak_bytes: int
    fits: bool

    @property
    def change(self) -> str:
        return " with ".join(self.sets)

    @property
    def flags(self) -> str:
        return " ".join(f"--set {x}" for x in self.sets)


@dataclass
class Plan:
    name: str
    method: str
    model: str
    architecture: str
    adapter: str
    precision: str
    device: Device
    nproc: int
    parallel: str
    memory: StepMemory
    worst_batch: BatchShape
    overhead: dict[str, int]
    peak_bytes: int  # per device (per rank)
    fits: bool
    data: DataProfile
    time: TimeEstimate | None
    cost_usd: float | None
    advice: list[Alternative] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stages: list[Plan] = field(default_factory=list)
    calibration: Calibration | None = None

    @property
    def verdict(self) -> str:
        where = f"{self.device.name} ({self.device.memory_bytes / GIB:.1f} GiB usable)"
        per = " per rank" if self.nproc > 1 else ""
        if self.fits:
            return f"fits on {where}: est. {self.peak_bytes / GIB:.1f} GiB{per}"
        fixes = [a for a in self.advice if a.fits]
        text = f"does not fit on {where}: est. {self.peak_bytes / GIB:.1f} GiB{per}"
        if fixes:
            text += "; fits with " + " or ".join(f"{a.change} (est. {a.peak_bytes / GIB:.1f} GiB)" for a in fixes[:3])
        return text

    def as_dict(self) -> dict:
        from .report import plan_dict

        return plan_dict(self)


def setting_for(cfg: RunConfig, arch: Architecture, device: Device) -> Setting:
    from ..model.adapters import resolve_targets

    a, t = cfg.adapter, cfg.train
    targets = () if a.kind == "full" else tuple(resolve_targets(arch.meta_model, a.target))
    saved = 0
    if a.modules_to_save and a.kind != "full":
        for entry in a.modules_to_save:
            for n, m in arch.meta_model.named_modules():
                if n == entry or n.endswith("." + entry):
                    saved += sum(p.numel() for p in m.parameters())
    return Setting(adapter="dora" if a.use_dora and a.kind != "full" else a.kind,
                   precision=device.resolved_precision(cfg.precision), r=a.r, targets=targets,
                   double_quant=a.double_quant, embeddings_4bit=a.embeddings_in_4bit,
                   modules_to_save_numel=saved, optimizer=t.optimizer, grad_checkpointing=t.grad_checkpointing,
                   fused=t.fused, logits_chunk=t.logits_chunk, device=device.kind)


def resolve_parallel(parallel: str, nproc: int, arch: Architecture, s: Setting, device: Device) -> str:
    """auto: DDP when a replica fits one device, FSDP otherwise (what train.parallel: auto chooses)."""
    if nproc <= 1:
        return "none"
    if parallel not in ("auto", None):
        return parallel
    weights = sum(step_memory(arch, s, BatchShape(1, 8, 1)).weights.values())
    return "ddp" if weights < device.memory_bytes / 2 else "fsdp"


def total_bytes(arch: Architecture, s: Setting, data: DataProfile, device: Device, nproc: int, parallel: str
                ) -> tuple[int, StepMemory, BatchShape, dict[str, int]]:
    """Peak bytes per device over the run's micro-batches, the step's parts at that peak, and the overheads."""
    best: tuple[int, StepMemory, BatchShape] | None = None
    for shape in set(data.shapes):
        mem = step_memory(arch, s, shape, nproc, parallel)
        if best is None or mem.peak > best[0]:
            best = (mem.peak, mem, shape)
    peak, mem, shape = best
    overhead: dict[str, int] = {}
    if device.kind == "cpu":
        overhead["process (libraries)"] = CPU_PROCESS_BYTES
        overhead["rendered data"] = PYTHON_BYTES_PER_TOKEN * sum(data.sequences.lengths)
        overhead["allocator heap slack"] = heap_slack(arch, s, mem, shape, nproc, parallel)
        load = _cpu_load_peak(arch, s, mem)
        train = peak + sum(overhead.values())
        if load > train:
            overhead["loading (checkpoint mapped while converting)"] = load - train
    return peak + sum(overhead.values()), mem, shape, overhead


def heap_slack(arch: Architecture, s: Setting, mem: StepMemory, shape: BatchShape, nproc: int, parallel: str
               ) -> int:
    """Freed memory glibc's heap holds at the peak, beyond the live tensors: holes left where short-lived
    buffers were allocated between long-lived ones, which a later, larger buffer cannot reuse. Measured (VmRSS
    against the allocator's live bytes and mallinfo, bench/plan_accuracy.py): about 0.85 times the saved
    activations; under gradient checkpointing the recomputation allocates each layer's activations again
    between the kept layer inputs, and the heap grew to about 0.55 times what the step would save without
    checkpointing (only 0.03-0.05 times the checkpointed activations are live); and the 4-bit layers of QLoRA
    dequantise their weights for every matmul, which added about 0.65 times those weights in the compute dtype."""
    if s.grad_checkpointing:
        plain = step_memory(arch, replace(s, grad_checkpointing=False), shape, nproc, parallel)
        slack = CPU_HEAP_SLACK_CHECKPOINTED * plain.activations_total
    else:
        slack = CPU_HEAP_SLACK * mem.activations_total
    if s.adapter == "qlora":
        slack += CPU_HEAP_SLACK_DEQUANT * arch.linear_numel * s.compute_bytes
    return round(slack)


def _cpu_load_peak(arch: Architecture, s: Setting, mem: StepMemory) -> int:
    """Loading maps the checkpoint file and converts it: both exist at once when the dtypes differ."""
    weights = sum(mem.weights.values())
    file_bytes = arch.total_numel * arch.checkpoint_bytes_per_param
    converted = s.adapter == "qlora" or arch.checkpoint_bytes_per_param != s.base_bytes
    return CPU_PROCESS_BYTES + weights + (file_bytes if converted else 0)


ALTERNATIVES = (
    (("adapter.kind=qlora",), lambda c: c.adapter.kind not in ("qlora", "full"),
     lambda c: {"adapter": c.adapter.model_copy(update={"kind": "qlora"})}),
    (("adapter.kind=lora",), lambda c: c.adapter.kind == "full",
     lambda c: {"adapter": c.adapter.model_copy(update={"kind": "lora"})}),
    (("train.grad_checkpointing=true",), lambda c: not c.train.grad_checkpointing,
     lambda c: {"train": c.train.model_copy(update={"grad_checkpointing": True})}),
    (("train.micro_batch_size={half}", "train.grad_accum={double}"), lambda c: c.train.micro_batch_size > 1,
     lambda c: {"train": c.train.model_copy(update={"micro_batch_size": max(1, c.train.micro_batch_size // 2),
                                                   "grad_accum": c.train.grad_accum * 2})}),
    (("train.optimizer=adamw_8bit",), lambda c: c.train.optimizer == "adamw",
     lambda c: {"train": c.train.model_copy(update={"optimizer": "adamw_8bit"})}),
)


def alternatives(cfg: RunConfig, arch: Architecture, data: DataProfile, device: Device, nproc: int, parallel: str,
                 tokenizer, method) -> list[Alternative]:
    """Single changes that lower the peak, each planned in full, smallest peak first."""
    out = []
    for label, applies, change in ALTERNATIVES:
        if not applies(cfg):
            continue
        alt = cfg.model_copy(update=change(cfg))
        prof = data
        if alt.train.micro_batch_size != cfg.train.micro_batch_size:
            prof = profile(alt, tokenizer, method, world=nproc)
        s = setting_for(alt, arch, device)
        peak, _, _, _ = total_bytes(arch, s, prof, device, nproc, resolve_parallel(parallel, nproc, arch, s, device))
        sets = tuple(x.format(half=alt.train.micro_batch_size, double=alt.train.grad_accum) for x in label)
        out.append(Alternative(sets, peak, peak <= device.memory_bytes))
    if cfg.adapter.kind != "qlora" and not cfg.train.grad_checkpointing and cfg.adapter.kind != "full":
        both = cfg.model_copy(update={"adapter": cfg.adapter.model_copy(update={"kind": "qlora"}),
                                      "train": cfg.train.model_copy(update={"grad_checkpointing": True})})
        s = setting_for(both, arch, device)
        peak, _, _, _ = total_bytes(arch, s, data, device, nproc, parallel)
        out.append(Alternative(("adapter.kind=qlora", "train.grad_checkpointing=true"), peak,
                               peak <= device.memory_bytes))
    return sorted(out, key=lambda a: a.peak_bytes)


def plan_run(cfg: RunConfig, device: str | None = None, nproc: int = 1, parallel: str = "auto",
             prices: str | Path | None = None, calibrate: bool = False, calibrate_steps: int = 3,
             console=None) -> Plan:
    """Plan a run config for `device` (None: the config's own device): memory per device, time and cost.
    Multi-stage configs get one plan per stage; the returned plan is the stage with the highest peak, with
    every stage's plan in `.stages`."""
    if nproc < 1:
        raise TunesmithError(f"--nproc {nproc}: needs at least one process", "use --nproc 1 or more")
    if parallel not in PARALLEL:
        raise TunesmithError(f"unknown parallel mode '{parallel}'", f"choose one of: {', '.join(PARALLEL)}")
    dev = get_device(device or cfg.device, prices)
    if cfg.stages:
        from ..config import stage_config

        plans = [_plan_stage(stage_config(cfg, i), dev, nproc, parallel, calibrate, calibrate_steps, console)
                 for i in range(len(cfg.stages))]
        worst = max(plans, key=lambda p: p.peak_bytes)
        main = Plan(**{**worst.__dict__, "name": cfg.name, "stages": plans})
        main.time = _sum_times([p.time for p in plans])
        costs = [p.cost_usd for p in plans]
        main.cost_usd = sum(costs) if all(c is not None for c in costs) else None
        return main
    return _plan_stage(cfg, dev, nproc, parallel, calibrate, calibrate_steps, console)


def _plan_stage(cfg: RunConfig, dev: Device, nproc: int, parallel: str, calibrate: bool, calibrate_steps: int,
                console) -> Plan:
    from ..methods import get_method

    arch = load_architecture(cfg.model, cfg.trust_remote_code)
    method = get_method(cfg.method, cfg.method_args)
    tokenizer, tok_note = load_plan_tokenizer(cfg)
    data = profile(cfg, tokenizer, method, tok_note, nproc)
    s = setting_for(cfg, arch, dev)
    mode = resolve_parallel(parallel, nproc, arch, s, dev)
    peak, mem, shape, overhead = total_bytes(arch, s, data, dev, nproc, mode)
    fits = peak <= dev.memory_bytes
    notes = [n for n in (tok_note, *data.notes) if n]
    if method.online:
        notes.append(f"{cfg.method} samples its batches: memory and time are for training on answers of "
                     "max_new_tokens each; sampling them adds time and a KV cache (up to method_args.sample_rows rows) "
                     "that are not counted here")
    if s.precision != cfg.precision and cfg.precision == "auto":
        notes.append(f"precision auto is {s.precision} on {dev.name}")
    if fits and dev.available_bytes is not None and peak > dev.available_bytes:
        notes.append(f"other processes hold memory now: {dev.available_bytes / GIB:.1f} GiB of "
                     f"{dev.memory_bytes / GIB:.1f} GiB are available, the run needs {peak / GIB:.1f} GiB")
    if dev.kind == "cpu" and s.precision in ("bf16", "fp16") and not dev.native_bf16:
        notes.append("this CPU emulates bf16 matmuls (no AVX512-BF16/AMX): about 90x slower than fp32")
    calibration = None
    if calibrate:
        calibration = _calibrate_here(cfg, dev, console)
    time_est = _time(cfg, arch, s, data, dev, nproc, calibration)
    cost = None
    if time_est is not None and dev.hourly_usd is not None and math.isfinite(time_est.total_s):
        cost = time_est.total_s / 3600 * dev.hourly_usd * nproc
    plan = Plan(cfg.name, cfg.method, cfg.model, arch.source, s.adapter, s.precision, dev, nproc, mode, mem, shape,
                overhead, peak, fits, data, time_est, cost, notes=notes, calibration=calibration)
    if not fits:
        plan.advice = alternatives(cfg, arch, data, dev, nproc, parallel, tokenizer, method)
    return plan


def _calibrate_here(cfg: RunConfig, dev: Device, console) -> Calibration:
    if not dev.here:
        raise TunesmithError(f"--calibrate measures steps on this machine, but the plan is for {dev.name}",
                             "calibrate with --device cpu (or cuda on a GPU machine), or leave out --calibrate")
    from .timing import calibrate

    run_cfg = cfg.model_copy(update={"device": dev.kind})
    return calibrate(run_cfg, console=console)


def _time(cfg: RunConfig, arch: Architecture, s: Setting, data: DataProfile, dev: Device, nproc: int,
          calibration: Calibration | None) -> TimeEstimate | None:
    shapes = Shapes.of_architecture(arch)
    if calibration is not None:
        rate = calibration.flops_per_s
        steps = ", ".join(f"{x:.2f}" for x in calibration.step_s)
        source = (f"calibrated on this machine: {calibration.steps} real steps ({steps} s) after a warm-up step, "
                  f"{rate / 1e9:.1f} GFLOP/s executed")
        startup = calibration.startup_s
    else:
        rate, source = peak_rate(dev, s.precision, shapes)
        startup = None
    if not rate:
        return None
    scale = data.micro_batches / max(len(data.shapes), 1)
    lora_r = None if s.is_full else s.r
    return estimate(shapes, data.shapes, scale, data.sequences, data.reference_sequences, lora_r,
                    s.grad_checkpointing, rate, source, nproc, startup)


def _sum_times(times: list[TimeEstimate | None]) -> TimeEstimate | None:
    if any(t is None for t in times) or not times:
        return None
    return TimeEstimate(sum(t.train_s for t in times), sum(t.reference_s for t in times), times[0].flops_per_s,
                        "; ".join(dict.fromkeys(t.source for t in times)), sum(t.model_flops for t in times),
                        sum(t.executed_flops for t in times),
                        sum(t.startup_s for t in times) if all(t.startup_s is not None for t in times) else None)


def check_fits(plan: Plan) -> None:
    """Raise (before any model is loaded) when the plan says the run cannot fit on its device."""
    if plan.fits:
        return
    fixes = [a for a in plan.advice if a.fits]
    hint = " or ".join(a.flags for a in fixes[:3]) if fixes else \
        "a device with more memory, more processes (--nproc with train.parallel), or a smaller model"
    raise TunesmithError(f"the plan says this run cannot fit: {plan.verdict}",
                         f"try {hint}; or run anyway with --force (train.ignore_plan: true) if you know better")
