"""The prepared GPU run: every check and measurement of tunesmith's CUDA path, in one command that fits in a
few minutes of one GPU (bench/gpu/run.sh installs the wheels folder and calls this).

Steps, in order; each runs in its own process under its own time limit (what remains of --budget caps it),
appends its result to results.json and results.md in --out, and degrades to "skipped: reason":
  env            versions, GPU, installed kernels, the measured bf16 matmul peak
  correctness    varlen logits / log-probs / gradients against each sequence alone and the mask path
                 (packed and shared prompts); DPO step-0 loss = ln 2; a QLoRA step; fused AdamW, 8-bit and
                 paged optimizers; a LoRA SFT run resumed from a checkpoint ends bit-identical; Liger's fused
                 cross-entropy against the chunked head (values, gradients, time, memory)
  speed:*        SFT-LoRA and DPO-LoRA on the Llama-3.2-1B shapes: tunesmith (varlen), tunesmith with SDPA
                 and the mask, transformers' Trainer padding-free (SFT), TRL's fastest correct setting (when
                 TRL is importable), tunesmith with torch.compile (SFT): tokens/s, peak CUDA memory, MFU
  summary        the speed table with ratios
  fit:*          the longest sequence a LoRA and a QLoRA step of the 8B-class model fits in (bounded search)
  planner        tunesmith.plan's predicted peak memory against the measured one: the speed runs' own plans
                 (run.json) and the plan's step memory at every length the fit steps measured

--dry-run runs every step that can run without CUDA on the CPU, in this process, with a tiny model and a few
steps (the varlen path through kernels.reference_varlen): the test suite runs it.

    bash bench/gpu/run.sh                    # on the GPU machine (writes to $OUT or bench/out/gpu)
    python bench/gpu/run.py --dry-run --out /tmp/gpu-dry
    python bench/gpu/publish.py RESULTS.json # its results into docs/BENCHMARKS.md, "On a GPU"
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for p in (str(ROOT / "src"), str(ROOT / "bench"), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

MARK = "GPU_STEP_RESULT "
# modules tunesmith's training path must not need: the GPU machine has none of them
NOT_ON_GPU_MACHINE = ("gguf", "datasets", "jsonschema", "trl", "pyarrow", "pandas")
# (step, seconds it may take on the GPU); the dry run ignores the limits
STEPS = [("env", 45), ("correctness", 150), ("speed:sft:tunesmith", 60), ("speed:sft:tunesmith-sdpa", 50),
         ("speed:dpo:tunesmith", 60), ("speed:dpo:tunesmith-sdpa", 50), ("speed:sft:hf", 50),
         ("speed:sft:trl", 60), ("speed:dpo:trl", 60), ("summary", 10), ("fit:lora", 70), ("fit:qlora", 70),
         ("planner", 30), ("speed:sft:tunesmith-compile", 90)]
IN_PROCESS = {"summary", "planner"}


def settings(dry: bool) -> dict:
    """What each step runs: full size on the GPU, tiny on the CPU dry run."""
    if dry:
        return {"small": "tiny", "speed_model": "tiny", "large": "tiny", "tokenizer_vocab": 1024,
                "sft": {"batch": 4, "steps": 3, "warmup": 1, "max_length": 128, "lr": 2e-4},
                "dpo": {"batch": 2, "steps": 3, "warmup": 1, "max_length": 160, "lr": 5e-5},
                "fit": {"lo": 64, "hi": 256, "probes": 3}, "peak_seconds": 0.02}
    return {"small": "smollm2-135m", "speed_model": "llama-3.2-1b", "large": "llama-3.1-8b",
            "tokenizer_vocab": 8192,
            "sft": {"batch": 128, "steps": 14, "warmup": 4, "max_length": 256, "lr": 2e-4},
            "dpo": {"batch": 32, "steps": 10, "warmup": 3, "max_length": 512, "lr": 5e-5},
            "fit": {"lo": 4096, "hi": 65536, "probes": 6}, "peak_seconds": 0.5}


# ---------------------------------------------------------------- results

def append(out: Path, record: dict) -> None:
    path = out / "results.json"
    records = json.loads(path.read_text()) if path.exists() else []
    records.append(record)
    path.write_text(json.dumps(records, indent=1))
    (out / "results.md").write_text(markdown(records))


def markdown(records: list[dict]) -> str:
    lines = ["# tunesmith GPU run", ""]
    for r in records:
        lines.append(f"## {r['step']} — {r['status']} ({r.get('seconds', 0):.0f} s)")
        lines.append("")
        if r.get("table"):
            lines += [r["table"], ""]
        details = {k: v for k, v in r.items() if k not in ("step", "status", "seconds", "table")}
        if details:
            lines += ["```json", json.dumps(details, indent=1, default=str)[:6000], "```", ""]
    return "\n".join(lines)


def emit(result: dict) -> None:
    print(MARK + json.dumps(result, default=str), flush=True)


# ---------------------------------------------------------------- running the steps

def step_function(name: str):
    kind = name.split(":")[0]
    if kind == "prepare":
        return prepare
    if kind == "env":
        from checks import env
        return env
    if kind == "correctness":
        from checks import correctness
        return correctness
    if kind == "speed":
        from speed import variant
        return lambda ctx: variant(ctx, *name.split(":")[1:])
    if kind == "summary":
        from speed import summary
        return summary
    if kind == "fit":
        from fit import fit
        return lambda ctx: fit(ctx, name.split(":")[1])
    if kind == "planner":
        from fit import planner
        return planner
    raise SystemExit(f"unknown step {name}")


def run_in_process(name: str, ctx: dict) -> dict:
    try:
        return step_function(name)(ctx)
    except Exception as e:  # noqa: BLE001  a failed step is a result, the next step still runs
        return {"status": f"failed: {type(e).__name__}: {str(e)[:400]}", "traceback": traceback.format_exc()[-3000:]}


def run_child(name: str, ctx_file: Path, limit: float, log: Path) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if name == "correctness":  # cuBLAS is deterministic (the resume check) only with a fixed workspace
        env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    cmd = [sys.executable, str(Path(__file__)), "--child", name, "--ctx", str(ctx_file)]
    with open(log, "a") as err:
        err.write(f"\n==== {name}\n")
        err.flush()
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, timeout=limit, env=env)
        except subprocess.TimeoutExpired:
            return {"status": f"failed: over its time limit of {limit:.0f} s"}
    marked = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if not marked:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        return {"status": f"failed: exit {proc.returncode} without a result", "log_tail": tail}
    return json.loads(marked[-1][len(MARK):])


def prepare(ctx: dict) -> dict:
    """Tokenizer, model folders and data, made once before the steps; returns what the steps need to know
    of them under "ctx"."""
    import common
    from models import save_model_dir, tokenizer_dir

    work, update = Path(ctx["work"]), {}
    tok = tokenizer_dir(work / "tokenizer", ctx["tokenizer_vocab"], shipped=not ctx["dry"])
    for key in ("small", "speed_model"):
        update[f"{key}_dir"] = str(save_model_dir(ctx[key], work / "models" / ctx[key], tok))
    for method in ("sft", "dpo"):
        s = dict(ctx[method])
        d = work / f"data-{method}"
        d.mkdir(parents=True, exist_ok=True)
        p = common.prepare(method, s["batch"] * s["steps"], s["max_length"], d, tokenizer=update["speed_model_dir"])
        s.update(train_file=str(p.train_file), trl_file=str(p.trl_file), expect_file=str(p.expect_file),
                 lengths=p.lengths, trained=p.trained, trl_tokens=p.trl_tokens, computed=p.computed)
        update[method] = s
    return {"status": "ok", "ctx": update, "tokenizer": type(tok).__name__, "vocab": len(tok),
            "sft_tokens": sum(update["sft"]["lengths"]), "dpo_tokens": sum(update["dpo"]["lengths"])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model, in this process")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "out" / "gpu"))
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for all steps together")
    ap.add_argument("--steps", nargs="*", help="run only these steps (names as listed in the module docstring)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--ctx", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        emit(run_in_process(args.child, json.loads(Path(args.ctx).read_text())))
        return 0
    started = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").unlink(missing_ok=True)
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    if device == "cpu" and not args.dry_run:
        append(out, {"step": "all", "status": "skipped: no CUDA device (use --dry-run on a CPU)", "seconds": 0})
        return 1
    ctx = {"dry": args.dry_run, "device": device, "out": str(out), **settings(args.dry_run),
           "work": tempfile.mkdtemp(prefix="tunesmith-gpu-")}
    ctx_file = Path(ctx["work"]) / "ctx.json"
    t0 = time.time()
    if args.dry_run:
        done = run_in_process("prepare", ctx)
    else:  # in a child like every step, so this process never holds GPU memory
        ctx_file.write_text(json.dumps(ctx))
        done = run_child("prepare", ctx_file, 120, out / "steps.log")
    ctx.update(done.pop("ctx", {}))
    append(out, {"step": "prepare", **done, "seconds": time.time() - t0, "device": device,
                 "models": {k: ctx[k] for k in ("small", "speed_model", "large")}})
    if done["status"] != "ok":
        return 1
    wanted = [(n, lim) for n, lim in STEPS if not args.steps or n in args.steps]
    failed = 0
    for name, limit in wanted:
        if args.dry_run and name.split(":")[-1] in ("hf", "trl") and "imported_before_baselines" not in ctx:
            # the baselines import what tunesmith's own path must not need: look before the first of them
            ctx["imported_before_baselines"] = sorted(m for m in NOT_ON_GPU_MACHINE if m in sys.modules)
        left = args.budget - (time.time() - started)
        t0 = time.time()
        if not args.dry_run and left < 15:
            result = {"status": f"skipped: the run's budget of {args.budget:.0f} s is spent"}
        elif args.dry_run or name in IN_PROCESS:
            result = run_in_process(name, ctx)
        else:
            ctx_file.write_text(json.dumps(ctx))
            result = run_child(name, ctx_file, min(limit, left), out / "steps.log")
        result = {"step": name, **result, "seconds": time.time() - t0}
        ctx.setdefault("results", {})[name] = result
        failed += result["status"].startswith("failed")
        append(out, result)
        print(f"{name}: {result['status']} ({result['seconds']:.0f} s)", flush=True)
    if args.dry_run:
        append(out, {"step": "imports", "status": "ok", "seconds": 0,
                     "imported_before_baselines": ctx.get("imported_before_baselines")})
    print(f"results: {out / 'results.md'} ({time.time() - started:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
