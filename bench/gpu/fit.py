"""The fit steps of the GPU run: the longest sequence one LoRA / QLoRA training step of the 8B-class model
fits in (tunesmith's training path: its adapters, attention choice, chunked head and fused AdamW; one
sequence, every token trained), found by a bounded search; and the planner comparison."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
from models import build, quantize_in_memory


def bounded_search(fits: Callable[[int], bool], lo: int, hi: int, probes: int, step: int = 1024) -> dict:
    """The largest n in [lo, hi] with fits(n), for a fits that is true up to some n and false beyond:
    doubling from lo until a failure or hi, then bisection to a multiple of `step`, calling fits at most
    `probes` times. "largest" is None when lo itself does not fit; "first_failure" None when hi fit."""
    tried: dict[int, bool] = {}

    def probe(n: int) -> bool:
        tried[n] = fits(n)
        return tried[n]

    if not probe(lo):
        return {"largest": None, "first_failure": lo, "tried": tried}
    good, bad = lo, None
    while len(tried) < probes and good < hi:
        n = min(2 * good, hi)
        if not probe(n):
            bad = n
            break
        good = n
    while bad is not None and len(tried) < probes:
        mid = (good + bad) // 2 // step * step
        if mid <= good:
            break
        if probe(mid):
            good = mid
        else:
            bad = mid
    return {"largest": good, "first_failure": bad, "tried": tried}


def fit(ctx: dict, kind: str) -> dict:
    from tunesmith.config import AdapterConfig
    from tunesmith.data.batching import collate
    from tunesmith.data.render import Tokenized
    from tunesmith.methods.logps import sequence_logps
    from tunesmith.model.adapters import apply_adapter, optimizer_param_groups
    from tunesmith.model.device import make_runtime
    from tunesmith.model.memory import memory_report, reset_peaks
    from tunesmith.train.optim import make_optimizer
    from tunesmith.train.recipe import choose_attention

    device = ctx["device"]
    if kind == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        return {"status": "skipped: bitsandbytes is not installed (make gpu-wheels ships it)"}
    rt = make_runtime(device, "auto", 1 if ctx["dry"] else "auto")
    model = build(ctx["large"], device, torch.bfloat16 if rt.precision == "bf16" else torch.float32)
    if kind == "qlora":
        model = quantize_in_memory(model, compute_dtype=rt.autocast_dtype or torch.float32)
    cfg = AdapterConfig(kind=kind, r=16, alpha=32)
    model = apply_adapter(model, cfg)
    attention = choose_attention(model, rt)
    opt = make_optimizer(optimizer_param_groups(model, cfg, 1e-5, 0.0), "adamw", 1e-5, device)
    vocab = model.config.vocab_size if hasattr(model, "config") else 1000
    peaks: dict[int, dict] = {}
    model.train()

    def fits(n: int) -> bool:
        ids = torch.randint(4, vocab, (n,), generator=torch.Generator().manual_seed(n)).tolist()
        batch = collate([Tokenized(tuple(ids), tuple(ids))], 2).to(torch.device(device))
        reset_peaks(device)
        try:
            with rt.autocast():
                out = sequence_logps(model, batch)
            (-out.logp_sum.sum() / out.n_tokens.sum()).backward()
            opt.step()
            if device == "cuda":
                torch.cuda.synchronize()
            peaks[n] = memory_report(device)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            opt.zero_grad(set_to_none=True)
            del batch
            if device == "cuda":
                torch.cuda.empty_cache()

    f = ctx["fit"]
    found = bounded_search(fits, f["lo"], f["hi"], f["probes"])
    bound = "" if found["first_failure"] else f" (every length tried fit; the search stops at {f['hi']})"
    return {"status": "ok", "model": ctx["large"], "adapter": kind, "attention": attention,
            "largest_fitting_length": found["largest"], "first_failure": found["first_failure"],
            "tried": {str(k): v for k, v in found["tried"].items()}, "note": bound.strip() or None,
            "peaks": {str(k): v for k, v in peaks.items()}}


def planner(ctx: dict) -> dict:
    """tunesmith.plan's predicted peak memory against the measured one: for the speed steps, the plan
    `tunesmith.train` made before each run (run.json's "plan", with what the run measured); for the fit
    steps, the plan's step memory of the same model, adapter and sequence at every length that fit. On CUDA
    the measure is PyTorch's peak allocated memory (reserved beside it); on a CPU the process's peak RSS."""
    if importlib.util.find_spec("tunesmith.plan") is None:
        return {"status": "skipped: tunesmith.plan is not in this tree"}
    results = ctx.get("results", {})
    rows = [_speed_row(name, r) for name, r in results.items()
            if name.startswith("speed:") and r.get("status") == "ok" and r.get("plan")]
    for kind in ("lora", "qlora"):
        r = results.get(f"fit:{kind}") or {}
        if r.get("status") == "ok":
            rows += _fit_rows(ctx, kind, r)
    if not rows:
        return {"status": "skipped: no speed or fit step recorded a measurement to compare"}
    errors = [abs(x["error"]) for x in rows if x["error"] is not None]
    lines = ["| run | predicted peak MiB | measured peak MiB | error | measured |", "|---|---:|---:|---:|---|"]
    for x in rows:
        err = "—" if x["error"] is None else f"{100 * x['error']:+.1f}%"
        lines.append(f"| {x['run']} | {x['predicted_mib']:,.0f} | "
                     f"{'—' if x['measured_mib'] is None else format(x['measured_mib'], ',.0f')} | {err} | "
                     f"{x['measured']} |")
    note = ("dry run: every step shares one process, so a run's peak RSS includes the steps before it"
            if ctx["dry"] else None)
    return {"status": "ok", "rows": rows, "table": "\n".join(lines),
            "max_abs_error": max(errors) if errors else None, "note": note}


def _row(run: str, predicted: float, measured: float | None, what: str, **extra) -> dict:
    error = (predicted - measured) / measured if measured else None
    return {"run": run, "predicted_mib": predicted / 2**20, "measured_mib": None if measured is None else
            measured / 2**20, "error": error, "measured": what, **extra}


def _speed_row(name: str, r: dict) -> dict:
    plan = r["plan"]
    measured = plan.get("measured", {})
    cuda = measured.get("peak_cuda_allocated_bytes")
    got, what = (cuda, "CUDA peak allocated") if cuda is not None else (measured.get("peak_rss_bytes"), "peak RSS")
    return _row(name.removeprefix("speed:"), plan["peak_bytes"], got, what, phase=plan.get("peak_phase"),
                reserved_mib=None if measured.get("peak_cuda_reserved_bytes") is None else
                measured["peak_cuda_reserved_bytes"] / 2**20)


def _fit_rows(ctx: dict, kind: str, r: dict) -> list[dict]:
    """The plan's step memory for each length the fit step measured (one row, every next token trained)."""
    import tempfile
    from pathlib import Path

    from models import llama_config

    from tunesmith.config import AdapterConfig
    from tunesmith.model.adapters import resolve_targets
    from tunesmith.plan.architecture import load_architecture
    from tunesmith.plan.memory import BatchShape, Setting, step_memory

    with tempfile.TemporaryDirectory() as d:
        llama_config(ctx["large"]).save_pretrained(d)
        arch = load_architecture(str(Path(d)))
    cfg, cuda = AdapterConfig(kind=kind, r=16, alpha=32), ctx["device"] == "cuda"
    s = Setting(adapter=kind, precision="bf16" if cuda else "fp32", r=cfg.r,
                targets=tuple(resolve_targets(arch.meta_model, cfg.target)), double_quant=cfg.double_quant,
                embeddings_4bit=cfg.embeddings_in_4bit, optimizer="adamw", device=ctx["device"])
    rows = []
    for n, peaks in sorted(r.get("peaks", {}).items(), key=lambda kv: int(kv[0])):
        mem = step_memory(arch, s, BatchShape(1, int(n), int(n) - 1))
        cuda_peaks = peaks.get("cuda") or {}
        got = cuda_peaks.get("peak_allocated_mib")
        rows.append(_row(f"fit:{kind} {n} tokens", mem.peak, None if got is None else got * 2**20,
                         "CUDA peak allocated" if got is not None else "none (no CUDA: RSS is the whole process)",
                         phase=mem.peak_phase))
    return rows
