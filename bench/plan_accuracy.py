"""How right `tunesmith plan` is: predicted against measured peak RSS and step time of real training runs of the
default model (SmolLM2-135M-Instruct) on this CPU.

Rows: full / LoRA / DoRA / QLoRA x SFT / DPO x two sequence lengths x gradient checkpointing off / on, in the
precision `auto` gives here (fp32 on CPUs without native bf16), optionally bf16 rows too. Data: Anthropic
hh-rlhf harmless pairs (examples/hh-rlhf), long enough that every row is cut to the sequence length (left
truncation keeps the answers); SFT trains on the chosen conversations. Each row runs `tunesmith.train` (plan
first, then the run, as `tunesmith train` does) in a fresh process, `nice`, and reports the process's peak RSS
(VmHWM) and its step times; the prediction is `tunesmith.plan` for the same config. With --time each row's
plan is calibrated (`plan --calibrate`, a few real steps on a separate sample) and its predicted time per step
is compared with the run's median step time — measure that on an idle machine.

    nice python bench/plan_accuracy.py [--time] [--precision fp32 bf16] [--rows lora-sft-128 ...] [--no-write]
    python bench/plan_accuracy.py --smoke       # one small row: checks the script, writes nothing
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "BENCHMARKS.md"
HH = ROOT / "examples" / "hh-rlhf" / "harmless-test.jsonl.gz"
SECTION = "Plan accuracy"
ADAPTERS = ("full", "lora", "dora", "qlora")
METHODS = ("sft", "dpo")
LENGTHS = {128: 4, 512: 2}  # sequence length -> micro-batch size (examples, or pairs for DPO)
HELD_OUT = {256: 3}  # --held-out: a length and batch the plan's measured constants were not fitted on
MIB = 2**20


def write_data(workdir: Path) -> dict[str, Path]:
    """hh-rlhf pairs as they are (DPO) and their chosen conversations as chat messages (SFT)."""
    sys.path.insert(0, str(ROOT / "src"))
    from tunesmith.data.load import load_examples

    ds = load_examples(str(HH), format="hh_rlhf", skip_invalid=True)
    sft = workdir / "sft.jsonl"
    with sft.open("w") as f:
        for ex in ds.examples:
            msgs = [{"role": m.role, "content": m.content} for m in ex.prompt + ex.chosen]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return {"sft": sft, "dpo": HH}


def row_config(adapter: str, method: str, length: int, ckpt: bool, precision: str, data: dict[str, Path],
               steps: int, out: Path) -> dict:
    mbs = {**LENGTHS, **HELD_OUT}[length]
    cfg = {
        "name": f"{adapter}-{method}-{length}{'-ckpt' if ckpt else ''}-{precision}", "output_dir": str(out),
        "model": "default", "precision": precision, "method": method, "threads": 1,
        "data": {"train": str(data[method]), "max_length": length, "truncation": "left",
                 "max_examples": mbs * (steps + 8)},
        "adapter": {"kind": adapter},
        "train": {"lr": 1e-5, "micro_batch_size": mbs, "max_steps": steps, "grad_checkpointing": ckpt,
                  "warmup_steps": 0, "schedule": "constant"},
    }
    if method == "dpo":
        cfg["data"].update({"format": "hh_rlhf", "skip_invalid": True})
        cfg["method_args"] = {"reference_cache": False}
    return cfg


def peak_rss() -> int:
    """This process's own peak RSS (VmHWM, model/memory.py: not ru_maxrss, which Linux carries from the parent
    that ran the --calibrate steps into each child)."""
    from tunesmith.model.memory import peak_rss_mib

    return round(peak_rss_mib() * MIB)


def child(cfg_file: Path) -> None:
    """One real run, as `tunesmith train` runs it; prints its peak RSS and step times as JSON."""
    from rich.console import Console

    import tunesmith

    cfg = tunesmith.load_config(cfg_file)
    run = tunesmith.train(cfg, console=Console(stderr=True), progress=False, evaluate=False, force=True)
    times = [r["time"] for r in run.state.history]
    steps = [b - a for a, b in zip([0.0] + times[:-1], times, strict=True)]
    print("RESULT " + json.dumps({"peak_rss": peak_rss(),
                                  "step_s": steps, "plan_peak": run.info.get("plan", {}).get("peak_bytes")}))


def run_child(cfg: dict, workdir: Path) -> dict:
    path = workdir / f"{cfg['name']}.yaml"
    path.write_text(json.dumps(cfg))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["nice", sys.executable, __file__, "--child", str(path)], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    marked = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not marked:
        raise SystemExit(f"{cfg['name']} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(marked[-1][len("RESULT "):])


def predict(cfg: dict, calibrate: bool) -> dict:
    import tunesmith

    plan = tunesmith.plan(cfg, device="cpu", calibrate=calibrate)
    step = plan.time.train_s / plan.data.steps if plan.time else None
    return {"peak": plan.peak_bytes, "step_s": step, "phase": plan.memory.peak_phase}


def signed(pred: float, meas: float) -> float:
    return (pred - meas) / meas


def table(rows: list[dict], with_time: bool) -> str:
    head = "| run | predicted peak MiB | measured peak RSS MiB | error | at |"
    rule = "|---|---:|---:|---:|---|"
    if with_time:
        head += " predicted step s | measured step s | error |"
        rule += "---:|---:|---:|"
    lines = [head, rule]
    for r in rows:
        line = (f"| {r['name']} | {r['pred_peak'] / MIB:,.0f} | {r['peak_rss'] / MIB:,.0f} | "
                f"{100 * r['mem_error']:+.1f}% | {r['phase']} |")
        if with_time:
            line += f" {r['pred_step']:.2f} | {r['step']:.2f} | {100 * r['time_error']:+.1f}% |"
        lines.append(line)
    return "\n".join(lines)


def band(values: list[float]) -> str:
    return f"{100 * min(values):+.1f}% … {100 * max(values):+.1f}% (largest |error| {100 * max(map(abs, values)):.1f}%)"



def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child")
    p.add_argument("--time", action="store_true", help="also calibrate each plan and compare step times")
    p.add_argument("--precision", nargs="+", default=["auto"], help="auto (fp32 here), fp32, bf16")
    p.add_argument("--rows", nargs="+", help="only these rows, e.g. lora-sft-128 qlora-dpo-512-ckpt")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per measured run (>= 2)")
    p.add_argument("--held-out", action="store_true",
                   help=f"the rows at {', '.join(map(str, HELD_OUT))} tokens instead: a check of the plan's "
                        "measured constants (heap slack) on shapes they were not fitted on")
    p.add_argument("--smoke", action="store_true", help="one short row; prints, writes nothing")
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    args = p.parse_args()
    if args.child:
        child(Path(args.child))
        return
    sys.path.insert(0, str(ROOT / "src"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    lengths = HELD_OUT if args.held_out else LENGTHS
    combos = list(itertools.product(args.precision, ADAPTERS, METHODS, lengths, (False, True)))
    if args.smoke:
        combos, args.steps, args.no_write = [("auto", "lora", "sft", 128, False)], 2, True
    results = []
    with tempfile.TemporaryDirectory(prefix="plan-accuracy-") as tmp:
        workdir = Path(tmp)
        data = write_data(workdir)
        for precision, adapter, method, length, ckpt in combos:
            cfg = row_config(adapter, method, length, ckpt, precision, data, args.steps, workdir / "runs")
            short = cfg["name"].rsplit("-", 1)[0]
            if args.rows and short not in args.rows and cfg["name"] not in args.rows:
                continue
            print(f"running {cfg['name']} ...", file=sys.stderr, flush=True)
            pred = predict(cfg, args.time)
            meas = run_child(cfg, workdir)
            row = {"name": cfg["name"], "pred_peak": pred["peak"], "peak_rss": meas["peak_rss"],
                   "mem_error": signed(pred["peak"], meas["peak_rss"]), "phase": pred["phase"]}
            if args.time:
                step = statistics.median(meas["step_s"][1:] or meas["step_s"])
                row.update(pred_step=pred["step_s"], step=step, time_error=signed(pred["step_s"], step))
            results.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    if not results:
        raise SystemExit("no row matched --rows")
    body = [table(results, args.time), "", f"Memory: signed error of every row {band([r['mem_error'] for r in results])}."]
    if args.time:
        body.append(f"Time per step with --calibrate: {band([r['time_error'] for r in results])}.")
    print("\n".join(body))
    if not args.no_write:
        write_section(SECTION, intro(args) + "\n\n" + "\n".join(body))
        print(f"wrote the {SECTION} section of {DOC}", file=sys.stderr)


def intro(args) -> str:
    import datetime as dt
    import platform

    import torch

    return (f"`nice python bench/plan_accuracy.py{' --time' if args.time else ''}` — `tunesmith plan` against real "
            f"`tunesmith train` runs of the default model on this CPU, each in a fresh process: hh-rlhf harmless "
            f"(SFT on the chosen conversations, DPO on the pairs), every row cut to its sequence length, micro-batch "
            f"{LENGTHS[128]} at 128 tokens and {LENGTHS[512]} at 512 (pairs for DPO), {args.steps} steps, AdamW, "
            f"LoRA/DoRA/QLoRA r=16 on all linear layers. Measured: the process's peak RSS (loading included); "
            f"predicted: the plan's total for `--device cpu`. \"at\" is the phase the plan puts the peak in. "
            f"Error = (predicted - measured) / measured.\n\n"
            f"Measured {dt.date.today().isoformat()} on {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores, torch {torch.__version__}, 1 torch thread.")


if __name__ == "__main__":
    main()
