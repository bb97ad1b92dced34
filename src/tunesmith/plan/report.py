"""A plan as text (what `tunesmith plan` and the start of `tunesmith train` print) and as JSON (run.json)."""

from __future__ import annotations

import math

GIB = 2**30


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n < 10 * GIB else f"{n / GIB:.1f} GiB"


def duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "unknown"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def memory_lines(plan) -> list[str]:
    m = plan.memory
    per = f" per rank ({plan.nproc} ranks, {plan.parallel})" if plan.nproc > 1 else ""
    b = plan.worst_batch
    lines = [f"memory{per}, at the largest micro-batch ({b.rows} rows x {b.width} positions, {b.targets} trained):"]
    for part, v in m.weights.items():
        lines.append(f"  weights, {part:<28} {gib(v):>11}")
    if plan.adapter != "full":
        lines.append(f"  {'adapters (fp32)':<38} {gib(m.trainable * 4):>11}   {m.trainable:,} weights")
    lines.append(f"  {'gradients (fp32)':<38} {gib(m.gradients):>11}")
    lines.append(f"  {'optimizer states':<38} {gib(m.optimizer):>11}")
    for part, v in sorted(m.activations.items(), key=lambda kv: -kv[1]):
        if v >= 2**20:
            lines.append(f"  activations, {part:<25} {gib(v):>11}")
    lines.append(f"  {'transient at the peak':<38} {gib(m.transient):>11}   ({m.peak_phase})")
    for part, v in {**m.extra, **plan.overhead}.items():
        lines.append(f"  {part:<38} {gib(v):>11}")
    lines.append(f"  {'total':<38} {gib(plan.peak_bytes):>11}")
    return lines


def time_lines(plan) -> list[str]:
    d, t = plan.data, plan.time
    lines = [f"data: {d.examples:,} training examples ({d.render.get('truncated', 0)} truncated, "
             f"{d.render.get('dropped', 0)} dropped), {d.steps:,} optimizer steps of {d.micro_batches:,} "
             f"micro-batches, {d.tokens:,} tokens ({d.target_tokens:,} trained), {d.epochs:.2f} epochs"]
    if t is None:
        lines.append("time: unknown (no throughput for this device: give its peak in --prices, or --calibrate)")
        return lines
    lines.append(f"compute: {t.model_flops / 1e12:,.1f} TFLOP model FLOPs, {t.executed_flops / 1e12:,.1f} TFLOP "
                 f"executed (padding, whole attention rows, recomputation)")
    total = f"time: {duration(t.total_s)}"
    parts = [f"training {duration(t.train_s)}"]
    if t.reference_s:
        parts.append(f"reference pass {duration(t.reference_s)}")
    if t.startup_s is not None:
        parts.append(f"startup {duration(t.startup_s)}")
    lines.append(f"{total} ({', '.join(parts)}); {t.source}")
    if plan.cost_usd is not None:
        dev = plan.device
        lines.append(f"cost: ${plan.cost_usd:,.2f} ({plan.nproc} x {dev.name} at ${dev.hourly_usd:.2f}/h; "
                     f"{dev.price_source}, read {dev.price_read})")
    return lines


def format_plan(plan) -> str:
    head = (f"plan for {plan.name}: {plan.method} with {plan.adapter} on {plan.model} ({plan.architecture}), "
            f"{plan.precision}, {plan.device.name}" + (f" x {plan.nproc}" if plan.nproc > 1 else ""))
    lines = [head]
    if plan.stages:
        for st in plan.stages:
            lines.append(f"  stage {st.method}: {gib(st.peak_bytes)}, "
                         f"{duration(st.time.total_s) if st.time else 'time unknown'}")
    lines += memory_lines(plan) + time_lines(plan)
    lines += [f"note: {n}" for n in plan.notes]
    lines.append(("verdict: " if plan.fits else "verdict: ") + plan.verdict)
    return "\n".join(lines)


def plan_dict(plan) -> dict:
    """JSON-ready: what run.json records as "plan"."""
    m, t, d = plan.memory, plan.time, plan.data
    out = {
        "device": plan.device.name, "device_memory_bytes": plan.device.memory_bytes, "nproc": plan.nproc,
        "parallel": plan.parallel, "precision": plan.precision, "adapter": plan.adapter,
        "architecture": plan.architecture, "fits": plan.fits, "verdict": plan.verdict,
        "peak_bytes": plan.peak_bytes,
        "memory": {"weights": m.weights, "adapters": m.trainable * 4 if plan.adapter != "full" else 0,
                   "gradients": m.gradients, "optimizer": m.optimizer, "activations": m.activations,
                   "transient": m.transient, "peak_phase": m.peak_phase, "parallel": m.extra,
                   "overhead": plan.overhead},
        "worst_batch": {"rows": plan.worst_batch.rows, "width": plan.worst_batch.width,
                        "targets": plan.worst_batch.targets},
        "data": {"examples": d.examples, "steps": d.steps, "micro_batches": d.micro_batches, "tokens": d.tokens,
                 "target_tokens": d.target_tokens, "epochs": round(d.epochs, 4)},
        "advice": [{"change": a.change, "peak_bytes": a.peak_bytes, "fits": a.fits} for a in plan.advice],
        "notes": plan.notes,
    }
    if t is not None:
        out["time"] = {"total_s": round(t.total_s, 1), "train_s": round(t.train_s, 1),
                       "reference_s": round(t.reference_s, 1), "startup_s": t.startup_s,
                       "flops_per_s": t.flops_per_s, "model_flops": t.model_flops,
                       "executed_flops": t.executed_flops, "source": t.source}
    if plan.cost_usd is not None:
        out["cost_usd"] = round(plan.cost_usd, 2)
        out["price"] = {"hourly_usd": plan.device.hourly_usd, "source": plan.device.price_source,
                        "read": plan.device.price_read}
    if plan.stages:
        out["stages"] = [plan_dict(st) for st in plan.stages]
    return out
