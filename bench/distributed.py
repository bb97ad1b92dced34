"""Training throughput in one process and under torchrun: the same config (SFT with LoRA on the default
model, banking77, global batch 16) in one process, in one process under torchrun with DDP (the cost of the
distributed path itself), and in 2 processes with DDP and with FSDP2. Writes the "Distributed training"
section of docs/BENCHMARKS.md.

    python bench/distributed.py                # on an otherwise idle machine
    python bench/distributed.py --steps 2 --no-write   # a smoke run

Steady-state tokens/s is the median of the per-step rates after the first step (which includes warm-up)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECTION = "Distributed training"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]

VARIANTS = [  # name, processes (None: no torchrun), engine, threads per process
    ("1 process", None, "auto", 2),
    ("torchrun, 1 process, ddp", 1, "ddp", 2),
    ("torchrun, 2 processes, ddp", 2, "ddp", 1),
    ("torchrun, 2 processes, fsdp", 2, "fsdp", 1),
]


def config(out: Path, name: str, engine: str, threads: int, steps: int, model: str | None) -> dict:
    cfg = {"name": name, "output_dir": str(out), "device": "cpu", "precision": "auto", "threads": threads,
           "method": "sft", "adapter": {"kind": "lora", "r": 16},
           "data": {"train": str(ROOT / "examples" / "banking77" / "train.jsonl"), "max_length": 128,
                    "max_examples": 16 * steps},  # one epoch: rendering the whole file would dominate
           "train": {"micro_batch_size": 4, "global_batch_size": 16, "max_steps": steps, "lr": 2e-4,
                     "parallel": engine, "save_every": None}}
    if model:
        cfg["model"] = model
    return cfg


def run_variant(work: Path, label: str, procs: int | None, engine: str, threads: int, steps: int,
                model: str | None) -> dict:
    name = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
    path = work / f"{name}.yaml"  # JSON is YAML
    path.write_text(json.dumps(config(work / "runs", name, engine, threads, steps, model)))
    launcher = [sys.executable, "-m", "tunesmith"] if procs is None else \
        [*TORCHRUN, f"--nproc-per-node={procs}", "-m", "tunesmith"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([*launcher, "train", str(path), "--no-progress", "--no-eval"], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed:\n{proc.stderr[-4000:]}")
    run = work / "runs" / name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    info = json.loads((run / "run.json").read_text())
    return {"variant": label, "steps": len(rates), "wall_s": info["wall_time_s"],
            "tokens_per_s": statistics.median(rates[1:] or rates), "final_loss": info["final"].get("loss"),
            "precision": info["precision"]}


def table(results: list[dict]) -> str:
    base = results[0]["tokens_per_s"]
    lines = ["| variant | steps | tokens/s (median, after step 1) | vs 1 process | training wall s | final loss |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['variant']} | {r['steps']} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base:.2f}x"
                     f" | {r['wall_s']:.1f} | {r['final_loss']:.4f} |")
    return "\n".join(lines)



def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--model", help="a local model folder (default: tunesmith's default model)")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    args = p.parse_args()
    import platform

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        results = [run_variant(Path(tmp), *v, args.steps, args.model) for v in VARIANTS]
    body = (f"{dt.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
            f"{torch.__version__}, gloo; `python bench/distributed.py --steps {args.steps}`. SFT with LoRA r=16 on "
            f"{args.model or 'SmolLM2-135M-Instruct'}, banking77, micro-batch 4, global batch 16 (accumulation "
            f"4 in one process, 2 per process with 2), precision {results[0]['precision']}. Every variant "
            "computes the same steps (the final losses agree to rounding); the CPU has 2 cores, so two "
            "processes with one thread each share the same compute as one process with two: the table "
            "measures the cost of the distributed path, not a speed-up.\n\n" + table(results))
    print(body)
    if not args.no_write:
        write_section(SECTION, body)


if __name__ == "__main__":
    main()
