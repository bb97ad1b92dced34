"""What each of tunesmith's DPO speed techniques buys: the tunesmith side of `compare_trl.py --method dpo`,
run with one technique switched off at a time (and all of them off), each in a fresh process, alternating,
for several rounds. Same data, model, LoRA and settings as the TRL comparison.

    python bench/ablation.py [--steps 5] [--rounds 2] [--threads 2] [--no-write]

Writes the `## DPO: what each technique buys` section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SCRIPT = Path(__file__).resolve().parent / "compare_trl.py"
SECTION = "DPO: what each technique buys"
# name -> (config overrides, environment)
VARIANTS = {
    "all on (defaults)": ({}, {}),
    "share_prompt off": ({"method_args": {"share_prompt": False}}, {}),
    "fused off": ({"train": {"fused": False}}, {}),
    "glibc malloc defaults": ({}, {"TUNESMITH_MALLOC": "default"}),
    "all three off": ({"method_args": {"share_prompt": False}, "train": {"fused": False}},
                      {"TUNESMITH_MALLOC": "default"}),
}


def run(name: str, base_spec: dict, work: Path, timeout: int) -> dict:
    overrides, env = VARIANTS[name]
    spec_file = work / f"spec-{re.sub(r'[^a-z]+', '-', name)}.json"
    spec_file.write_text(json.dumps({**base_spec, "overrides": overrides}))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return common.run_child(SCRIPT, "tunesmith", spec_file, work / "children.log", timeout)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout", type=int, default=1800)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    from tunesmith.model.default import default_model_dir

    work = Path(tempfile.mkdtemp(prefix="tunesmith-ablation-"))
    data = common.prepare("dpo", args.steps * args.batch, args.max_length, work)
    spec = {"method": "dpo", "steps": args.steps, "batch": args.batch, "max_length": args.max_length, "lr": 5e-5,
            "seed": 0, "threads": args.threads, "model_dir": str(default_model_dir()), "workdir": str(work),
            "train_file": str(data.train_file), "trl_file": str(data.trl_file),
            "expect_file": str(data.expect_file)}
    tokens = sum(data.lengths)
    names = list(VARIANTS)
    results: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.time()
            results[name].append(run(name, spec, work, args.timeout))
            print(f"  round {r + 1}/{args.rounds} {name}: {time.time() - t0:.0f}s wall", flush=True)
    rows = []
    base = None
    for name in names:
        runs = results[name]
        tok_s = statistics.median(tokens / (x["ref_s"] + x["stamps"][-1] - x["stamps"][0]) for x in runs)
        base = base or tok_s
        rows.append(f"| {name} | {tok_s:.0f} | {tok_s / base:.2f}× | "
                    f"{statistics.median(x['ref_s'] for x in runs):.2f} | "
                    f"{statistics.median(x['peak_rss_mib'] for x in runs):.0f} | "
                    f"{statistics.mean(runs[0]['losses']):.4f} |")
    info = common.machine()
    v = info["versions"]
    text = "\n".join([
        f"{common.today()} · {info['cpu']}, {info['cores']} cores · torch {v['torch']}, transformers "
        f"{v['transformers']} · hh-rlhf, {args.steps} steps x {args.batch} pairs, max length {args.max_length}, "
        f"{args.rounds} rounds, torch threads {args.threads} · {tokens} real tokens per run (shared prompts "
        f"compute {data.computed}) · median tokens/s over the reference pass plus all steps",
        "",
        "| tunesmith DPO | tokens/s | vs defaults | reference pass s | peak RSS MiB | mean loss |",
        "|---|---:|---:|---:|---:|---:|",
        *rows])
    print("\n" + text)
    if args.no_write:
        print("(nothing written)")
        return
    intro = ("`python bench/ablation.py` — the tunesmith side of the DPO comparison above, with shared prompts "
             "(`method_args.share_prompt`), the fused layers and matmul attention (`train.fused`) and the glibc "
             "allocator settings (`TUNESMITH_MALLOC`) switched off one at a time, and all together. Each is "
             "exact in fp32; in bf16 a sequence's summed log-prob moves by tenths of a nat between "
             "implementations (as far from the fp32 value either way), which is what moves the DPO losses "
             "in the third decimal.")
    doc = common.DOC.read_text()
    new = f"## {SECTION}\n\n{intro}\n\n{text}\n\n"
    pattern = re.compile(rf"^## {re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    doc = pattern.sub(lambda _: new, doc, count=1) if pattern.search(doc) else doc.rstrip() + "\n\n" + new
    common.DOC.write_text(doc.rstrip() + "\n")
    print(f"wrote {common.DOC}")


if __name__ == "__main__":
    main()
