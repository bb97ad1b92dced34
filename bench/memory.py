"""Peak memory and step time of full / LoRA / DoRA / QLoRA fine-tuning of the default model on CPU.

Each variant runs in a fresh subprocess (so peaks do not leak between variants): load the model the way
training does (tunesmith's loader, fused layers, its log-prob path), apply the adapter, run a few AdamW steps
on random tokens (every token trained) under bf16 autocast, report peak RSS and the median step time. Prints a table and rewrites the `## Memory` section of docs/BENCHMARKS.md.

    nice python bench/memory.py [--steps 3] [--batch 4] [--seq 128] [--threads 1] [--no-write]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "BENCHMARKS.md"
VARIANTS = ["full", "lora", "dora", "qlora", "qlora-bf16-emb"]
# What each variant stores: trained weights in fp32 (AdamW needs it), a frozen base in bf16 or NF4.
SETUP = {"full": "fp32 weights + AdamW", "lora": "bf16 base, fp32 adapters", "dora": "bf16 base, fp32 adapters",
         "qlora": "NF4 base incl. embedding/head, fp32 adapters",
         "qlora-bf16-emb": "NF4 linear layers, bf16 embedding/head (quantize_embeddings: false)"}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _release_and_reset_peak() -> bool:
    """Return freed heap to the OS and restart the kernel's peak-RSS counter (VmHWM), so the training peak
    is measured apart from the loading transient. False where Linux does not allow it."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(kind: str, steps: int, batch: int, seq: int, threads: int) -> dict:
    import torch

    from tunesmith.config import AdapterConfig
    from tunesmith.data.batching import collate
    from tunesmith.data.render import Tokenized
    from tunesmith.methods.logps import sequence_logps
    from tunesmith.model.adapters import apply_adapter, optimizer_param_groups, trainable_summary
    from tunesmith.model.device import make_runtime
    from tunesmith.model.load import load_model_and_tokenizer
    from tunesmith.model.quantize import base_footprint_bytes
    from tunesmith.train.recipe import choose_attention

    torch.manual_seed(0)
    rt = make_runtime("cpu", "bf16", threads)
    after_imports = _rss_mib()
    cfg = AdapterConfig(kind="qlora", quantize_embeddings=False) if kind == "qlora-bf16-emb" \
        else AdapterConfig(kind=kind)
    model, tok = load_model_and_tokenizer("default", device="cpu", precision="bf16",
                                          dtype="fp32" if kind == "full" else "bf16",
                                          quantize_nf4=cfg.kind == "qlora",
                                          quantize_embeddings=cfg.embeddings_in_4bit)
    model = apply_adapter(model, cfg)
    choose_attention(model, rt)
    with torch.no_grad():  # page in weights that loading left memory-mapped, so RSS counts them
        for p in model.parameters():
            p.view(-1)[::1024].sum()
    load_peak = _peak_mib()
    reset = _release_and_reset_peak()
    after_load = _rss_mib()
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, cfg, lr=1e-5, weight_decay=0.0))
    vocab = len(tok)
    times, cpu_times, losses = [], [], []
    model.train()
    for step in range(steps + 1):  # step 0 warms up (allocator, kernels) and is not timed
        g = torch.Generator().manual_seed(step)
        seqs = [Tokenized(tuple(ids), tuple(ids)) for ids in torch.randint(0, vocab, (batch, seq), generator=g).tolist()]
        start, cpu_start = time.perf_counter(), time.process_time()
        with rt.autocast():
            out = sequence_logps(model, collate(seqs, tok.pad_token_id, None))
        loss = -out.logp_sum.sum() / out.n_tokens.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
        losses.append(loss.item())
    summary = trainable_summary(model)
    train_peak = _hwm_mib() if reset else _peak_mib()
    return {"kind": kind, "load_peak_mib": round(load_peak), "train_peak_mib": round(train_peak),
            "rss_after_imports_mib": round(after_imports),
            "rss_after_load_mib": round(after_load), "base_mib": round(base_footprint_bytes(model) / 2**20, 1),
            "trainable": summary["trainable"], "median_step_s": round(statistics.median(times), 2),
            "median_step_cpu_s": round(statistics.median(cpu_times), 2),
            "losses_finite": all(math.isfinite(x) for x in losses)}


def run_variant(kind: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--steps", str(args.steps), "--batch", str(args.batch),
           "--seq", str(args.seq), "--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = re.search(r"Model name:\s*(.+)", lscpu).group(1).strip()
    except (OSError, AttributeError):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} cores"


def table(rows: list[dict]) -> str:
    lines = ["| variant | setup | trainable params | base weights MiB | RSS after load MiB "
             "| peak RSS training MiB | peak RSS loading MiB | median step s (wall) | median step CPU s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['kind']} | {SETUP[r['kind']]} | {r['trainable']:,} | {r['base_mib']} "
                     f"| {r['rss_after_load_mib']:,} | {r['train_peak_mib']:,} | {r['load_peak_mib']:,} "
                     f"| {r['median_step_s']} | {r['median_step_cpu_s']} |")
    return "\n".join(lines)


def write_section(body: str) -> None:
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    section = f"## Memory\n\n{body.strip()}\n"
    pattern = re.compile(r"^## Memory\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 keeps CPU times honest on a shared machine")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.batch, args.seq, args.threads)))
        return
    rows = []
    for kind in args.variants:
        print(f"running {kind} ...", file=sys.stderr, flush=True)
        rows.append(run_variant(kind, args))
    import torch

    body = "\n".join([
        f"Default model (SmolLM2-135M-Instruct), CPU, batch {args.batch} x {args.seq} tokens, bf16 autocast, "
        f"AdamW, median of {args.steps} steps after one warm-up step; each variant in a fresh process "
        f"(`nice python bench/memory.py`). Adapters: r=16, alpha=32, all linear layers. Loaded and run as "
        f"training runs them: tunesmith's loader, fused layers, every token's log-prob through the chunked "
        f"LM head.",
        "",
        f"Measured {dt.date.today().isoformat()} on {machine()}; torch {torch.__version__}, {args.threads} torch "
        f"thread(s). Peak RSS includes "
        f"the Python process itself (~{rows[0]['rss_after_imports_mib']} MiB after imports); the training peak "
        f"is measured after loading (peak counter reset), the loading peak separately. Wall-clock step times "
        f"vary with whatever else the machine runs; process CPU seconds per step are the steadier comparison.",
        "",
        table(rows),
    ])
    print(table(rows))
    if not all(r["losses_finite"] for r in rows):
        raise SystemExit("a variant produced a non-finite loss; numbers not written")
    if not args.no_write:
        write_section(body)
        print(f"wrote the Memory section of {DOC}", file=sys.stderr)


if __name__ == "__main__":
    main()
