"""The env and correctness steps of the GPU run (bench/gpu/run.py). Every check returns its numbers and an
"ok" verdict, or {"skipped": reason}; the correctness step fails when any check that ran failed."""

from __future__ import annotations

import importlib.metadata as md
import math
import platform
import time
from pathlib import Path

import torch
from models import build, llama_config

LN2 = math.log(2)


def _version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------- env

def env(ctx: dict) -> dict:
    import mfu

    from tunesmith.model.kernels import installed_varlen_kernels, liger_linear_ce

    info = {"python": platform.python_version(),
            "versions": {n: _version(n) for n in ("torch", "transformers", "peft", "accelerate", "trl",
                                                  "bitsandbytes", "liger-kernel", "triton", "flash-attn",
                                                  "pydantic", "datasets")},
            "varlen_kernels": list(installed_varlen_kernels()), "liger": liger_linear_ce() is not None}
    device = ctx["device"]
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability=list(torch.cuda.get_device_capability(0)),
                    memory_mib=round(props.total_memory / 2**20), cuda=torch.version.cuda)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # this CPU only emulates bf16
    shapes = mfu.Shapes.of(llama_config(ctx["speed_model"]))
    peak = mfu.measured_peak(shapes, dtype, ctx["peak_seconds"], device=device)
    info.update(peak_dtype=peak["dtype"], peak_flops=peak["peak_flops"], peak_by_shape=peak["by_shape"])
    if device == "cuda":
        info["square_8192_flops"] = mfu.matmul_rate(8192, 8192, 8192, dtype, ctx["peak_seconds"], device)
    return {"status": "ok", **info}


# ---------------------------------------------------------------- correctness

def correctness(ctx: dict) -> dict:
    checks = {"varlen": varlen_vs_alone, "dpo_step0_ln2": dpo_step0, "qlora_step": qlora_step,
              "optimizers": optimizers, "resume_bit_identical": resume, "liger_head": liger_head}
    results, failed = {}, []
    for name, check in checks.items():
        t0 = time.time()
        try:
            r = check(ctx)
        except Exception as e:  # noqa: BLE001  one broken check must not hide the others
            import traceback

            r = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}", "traceback": traceback.format_exc()[-1500:]}
        r["seconds"] = round(time.time() - t0, 1)
        results[name] = r
        if r.get("ok") is False:
            failed.append(name)
        if ctx["device"] == "cuda":
            torch.cuda.empty_cache()
    return {"status": f"failed: {', '.join(failed)}" if failed else "ok", "checks": results}


def _runtime(ctx: dict):
    from tunesmith.model.device import make_runtime

    return make_runtime(ctx["device"], "auto", 1 if ctx["dry"] else "auto")


def _random_seqs(n_tokens: list[int], vocab: int, seed: int, prompt_frac: float = 0.4):
    from tunesmith.data.render import IGNORE, Tokenized

    g = torch.Generator().manual_seed(seed)
    out = []
    for n in n_tokens:
        ids = torch.randint(4, vocab, (n,), generator=g).tolist()
        cut = max(1, int(n * prompt_frac))
        out.append(Tokenized(tuple(ids), tuple([IGNORE] * cut + ids[cut:])))
    return out


def _pairs(n: int, vocab: int, seed: int, scale: int):
    from tunesmith.data.render import TokenizedPair

    out = []
    for k in range(n):
        prompt, a, b = _random_seqs([scale * (2 + k), scale + 3 * k, 2 * scale - k], vocab, seed + k, 1.0)
        ca = type(prompt)(prompt.input_ids + a.input_ids, prompt.labels + a.input_ids)
        cb = type(prompt)(prompt.input_ids + b.input_ids, prompt.labels + b.input_ids)
        out.append(TokenizedPair(ca, cb))
    return out


def _lora_model(ctx: dict, rt):
    from tunesmith.config import AdapterConfig
    from tunesmith.model.adapters import apply_adapter

    model = build(ctx["small"], ctx["device"], torch.bfloat16 if rt.precision == "bf16" else torch.float32, seed=1)
    model = apply_adapter(model, AdapterConfig(kind="lora", r=16, alpha=32))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # non-zero B, so the adapters change every output and get every gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.device))
    return model


def _alone_logps(model, seq, device: str, rt) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob of the trained tokens, [T, V] logits) of one sequence through the model's own
    forward, with transformers' causal mask and SDPA."""
    ids = torch.tensor([seq.input_ids], device=device)
    with rt.autocast(), torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0].float()
    logp = logits.log_softmax(-1)[:-1].gather(-1, ids[0, 1:, None]).squeeze(-1)
    trained = torch.tensor(seq.labels[1:], device=device) != -100
    return logp[trained].sum(), logits


def varlen_vs_alone(ctx: dict) -> dict:
    """Packed and prompt-shared batches through the varlen kernel against each sequence alone: log-probs,
    logits, and gradients against the SDPA-with-mask path. A deliberately leaking layout (every row one
    causal sequence) shows how large a leak between sequences would be on this model."""
    from tunesmith.data.batching import collate
    from tunesmith.methods.logps import hidden_states, sequence_logps
    from tunesmith.model.attention import POLICY, setup
    from tunesmith.model.unwrap import unwrap

    device, rt = ctx["device"], _runtime(ctx)
    model = _lora_model(ctx, rt)
    kernels = ("reference",) if ctx["dry"] else None  # the CPU has no flash kernel: the same maths, written out
    desc = setup(model, torch.device(device), rt.precision, kernels=kernels)
    lm = unwrap(model)
    policy = getattr(lm, POLICY)
    if not policy.varlen:
        return {"ok": False, "why": f"the varlen path was not chosen: {desc}"}
    vocab, scale = lm.config.vocab_size, 8 if ctx["dry"] else 64
    seqs = _random_seqs([scale * k + 5 for k in (3, 8, 1, 5, 2, 7)], vocab, seed=3)
    pairs = _pairs(3, vocab, 11, scale)
    pair_seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    batches = {"packed": (seqs, collate(seqs, 2, pack_length=16 * scale)),
               "shared": (pair_seqs, collate(pair_seqs, 2, pack_length=16 * scale, share=[(i, i + 3) for i in range(3)]))}
    out = {"kernel": policy.capability.kernels[0], "setup": desc}
    ok = True
    for name, (ss, batch) in batches.items():
        batch = batch.to(torch.device(device))
        policy.used.clear()
        with rt.autocast(), torch.no_grad():
            fast = sequence_logps(model, batch).logp_sum.float()
        used = dict(policy.used)
        alone = torch.stack([_alone_logps(model, s, device, rt)[0] for s in ss])
        n = torch.tensor([sum(1 for x in s.labels[1:] if x != -100) for s in ss], device=device).clamp(min=1)
        r = {"kernels_used": used, "max_logp_diff_per_token": float(((fast - alone).abs() / n).max())}
        r["leak_logp_diff_per_token"] = _leak(model, batch, rt, alone, n)
        policy.mode = "sdpa"
        with rt.autocast(), torch.no_grad():  # the same batch through SDPA and the 4D mask: its rounding
            masked = sequence_logps(model, batch).logp_sum.float()
        policy.mode = "auto"
        r["mask_logp_diff_per_token"] = float(((masked - alone).abs() / n).max())
        if name == "packed":
            r["max_logit_diff"] = _logit_diff(model, batch, ss, device, rt, hidden_states)
        r["grad_rel_err_vs_mask"] = _grad_err(model, batch, rt, policy)
        tol = 2e-4 if ctx["dry"] else 3e-2  # fp32 reference maths on the CPU, bf16 flash kernels on CUDA
        r["ok"] = (used.get(out["kernel"], 0) >= 1 and r["max_logp_diff_per_token"] <= tol
                   and r["grad_rel_err_vs_mask"] <= (1e-4 if ctx["dry"] else 5e-2)
                   and r["max_logp_diff_per_token"] * 5 <= r["leak_logp_diff_per_token"])
        ok &= r["ok"]
        out[name] = r
    return {"ok": ok, **out}


def _leak(model, batch, rt, alone, n) -> float:
    """The per-token log-prob error of a layout that lets every token of a row see the whole row before it:
    how large a leak between sequences would be on this model (the varlen error must be far below it)."""
    import dataclasses

    from tunesmith.methods.logps import sequence_logps

    leaky = dataclasses.replace(batch, attn_ids=torch.where(batch.seq_ids >= 0, 0, -1), branch=None)
    with rt.autocast(), torch.no_grad():
        got = sequence_logps(model, leaky).logp_sum.float()
    return float(((got - alone).abs() / n).max())


def _logit_diff(model, batch, seqs, device, rt, hidden_states) -> float:
    from tunesmith.model.unwrap import unwrap

    head = unwrap(model).get_output_embeddings()
    worst = 0.0
    with rt.autocast(), torch.no_grad():
        h = hidden_states(model, batch)
        for i, s in enumerate(seqs):
            where = (batch.seq_ids == i).nonzero()
            packed = head(h[where[:, 0], where[:, 1]]).float()
            worst = max(worst, float((packed - _alone_logps(model, s, device, rt)[1]).abs().max()))
    return worst


def _grad_err(model, batch, rt, policy) -> float:
    from tunesmith.methods.logps import sequence_logps

    params = [p for p in model.parameters() if p.requires_grad]
    flat = []
    for mode in ("auto", "sdpa"):
        policy.mode = mode
        with rt.autocast():
            loss = sequence_logps(model, batch).logp_sum.float().sum()
        flat.append(torch.cat([g.float().flatten() for g in torch.autograd.grad(loss, params)]))
    policy.mode = "auto"
    return float((flat[0] - flat[1]).norm() / flat[1].norm().clamp(min=1e-30))


def _train(ctx: dict, name: str, method: str = "sft", resume: str | None = None, **sections):
    import tunesmith

    s = ctx[method]
    cfg = {"name": name, "model": ctx["small_dir"], "output_dir": str(Path(ctx["work"]) / "runs"), "method": method,
           "device": "auto", "precision": "auto", "threads": 1 if ctx["dry"] else "auto",
           "data": {"train": s["train_file"], "max_length": s["max_length"], "max_examples": 32},
           **({"method_args": {"reference_cache": False}} if method != "sft" else {}),
           "train": {"max_steps": 2, "micro_batch_size": 8, "lr": 1e-4, "schedule": "constant", "warmup_ratio": 0.0}}
    for key, values in sections.items():
        cfg[key] = {**cfg.get(key, {}), **values} if isinstance(values, dict) else values
    return tunesmith.train(cfg, progress=False, evaluate=False, resume=resume)


def dpo_step0(ctx: dict) -> dict:
    """At step 0 the policy is the reference, so every pair's margin is 0 and the DPO loss is ln 2."""
    run = _train(ctx, "dpo-ln2", "dpo", train={"max_steps": 1, "lr": 1e-7})
    loss = run.state.history[0]["loss"]
    return {"ok": abs(loss - LN2) <= (1e-4 if ctx["dry"] else 1e-2), "loss": loss, "ln2": LN2,
            "attention": run.info.get("attention"), "precision": run.info["precision"]}


def qlora_step(ctx: dict) -> dict:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return {"skipped": "bitsandbytes is not installed (make gpu-wheels ships it)"}
    run = _train(ctx, "qlora", adapter={"kind": "qlora"})
    losses = [r["loss"] for r in run.state.history]
    return {"ok": all(math.isfinite(x) for x in losses), "losses": losses, "memory": run.info["memory"],
            "quantize_embeddings": run.info["quantize_embeddings"], "attention": run.info.get("attention")}


def optimizers(ctx: dict) -> dict:
    from tunesmith.config import RunConfig
    from tunesmith.train.optim import build_optimizer

    out, ok = {}, True
    model = _lora_model(ctx, _runtime(ctx))
    cfg = RunConfig.model_validate({"data": {"train": "x.jsonl"}})
    fused = build_optimizer(model, cfg).param_groups[0].get("fused")
    out["adamw_fused"] = fused
    ok &= bool(fused) == (ctx["device"] == "cuda")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return {"ok": ok, **out, "bitsandbytes": "skipped: not installed"}
    for name in ("adamw_8bit", "paged_adamw_8bit"):
        run = _train(ctx, f"opt-{name}", train={"optimizer": name})
        losses = [r["loss"] for r in run.state.history]
        out[name] = {"losses": losses, "memory": run.info["memory"]}
        ok &= all(math.isfinite(x) for x in losses)
    return {"ok": ok, **out}


def resume(ctx: dict) -> dict:
    """4 steps straight against 2 steps, a checkpoint, and 2 more in a fresh run resumed from it: the
    trained weights must be bit-identical (deterministic algorithms on, as exact resume needs on CUDA)."""
    from safetensors.torch import load_file

    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        train = {"max_steps": 4, "save_every": 2, "keep_last": 2, "lr": 1e-3}
        straight = _train(ctx, "resume-straight", train=train)
        resumed = _train(ctx, "resume-resumed", train=train,
                         resume=str(straight.path / "checkpoints" / "step-000002"))
    finally:
        torch.use_deterministic_algorithms(False)
    a = load_file(straight.path / "checkpoints" / "step-000004" / "trainable.safetensors")
    b = load_file(resumed.path / "checkpoints" / "step-000004" / "trainable.safetensors")
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a) if a.keys() == b.keys() else None
    la = [r["loss"] for r in straight.state.history][2:]
    lb = [r["loss"] for r in resumed.state.history][2:]
    return {"ok": same and la == lb, "bit_identical": same, "max_abs_diff": worst, "losses_straight": la,
            "losses_resumed": lb, "attention": resumed.info.get("attention")}


def liger_head(ctx: dict) -> dict:
    """A trained LM head (full fine-tuning) on the Llama-3.2-1B shapes: Liger's fused linear cross-entropy
    against tunesmith's checkpointed chunks, log-probs, gradients, time and peak memory of forward+backward."""
    from tunesmith.model.kernels import liger_linear_ce

    if ctx["device"] != "cuda":
        return {"skipped": "Liger's kernels need CUDA (and Triton)"}
    fn = liger_linear_ce()
    if fn is None:
        return {"skipped": "liger-kernel is not importable"}
    from torch.utils.checkpoint import checkpoint

    from tunesmith.methods.logps import _chunk_logps

    cfg = llama_config(ctx["speed_model"])
    g = torch.Generator(device="cuda").manual_seed(0)
    n, d, v = 8192, cfg.hidden_size, cfg.vocab_size
    h0 = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, generator=g)
    w0 = (torch.randn(v, d, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    targets = torch.randint(0, v, (n,), device="cuda", generator=g)
    head = torch.nn.Linear(d, v, bias=False, device="cuda", dtype=torch.bfloat16)

    def chunked(h, w):
        head.weight = w
        return torch.cat([checkpoint(_chunk_logps, head, h[k:k + 1024], targets[k:k + 1024], use_reentrant=False)
                          for k in range(0, n, 1024)])

    def fused(h, w):
        return -fn(h, w, targets)

    res = {}
    for name, f in (("chunked", chunked), ("liger", fused)):
        times = []
        for _ in range(3):
            h, w = h0.clone().requires_grad_(True), torch.nn.Parameter(w0.clone())
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            logp = f(h, w)
            (logp * torch.linspace(-1, 1, n, device="cuda")).sum().backward()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        res[name] = {"logp": logp.detach().float(), "dh": h.grad.float(), "dw": w.grad.float(),
                     "s": sorted(times)[1], "peak_extra_mib": (torch.cuda.max_memory_allocated() - base) / 2**20}
    a, b = res["chunked"], res["liger"]
    rel = {k: float((a[k] - b[k]).norm() / a[k].norm()) for k in ("logp", "dh", "dw")}
    return {"ok": max(rel.values()) <= 2e-2, "rel_err": rel,
            "seconds": {k: round(res[k]["s"], 4) for k in res},
            "peak_extra_mib": {k: round(res[k]["peak_extra_mib"]) for k in res},
            "shape": {"tokens": n, "hidden": d, "vocab": v}}
