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
    """Hook: tunesmith.plan's predicted peak CUDA memory for the fit steps' setups against their measured
    peaks. Runs only when this tree has tunesmith.plan."""
    if importlib.util.find_spec("tunesmith.plan") is None:
        return {"status": "skipped: tunesmith.plan is not in this tree (hook: compare its predicted peak CUDA "
                          "memory with the fit steps' measured peaks)"}
    return {"status": "skipped: tunesmith.plan exists, but this script does not call it yet"}
