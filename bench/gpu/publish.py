"""Write a GPU run's results (bench/gpu/run.py's results.json) into the `## On a GPU` section of
docs/BENCHMARKS.md: date, GPU, versions, the correctness verdicts, the speed table, the fit search and
the planner's error.

    python bench/gpu/publish.py RESULTS.json [--doc docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SECTION = "On a GPU"


def section(records: list[dict], date: str) -> str:
    steps = {r["step"]: r for r in records}
    env = steps.get("env", {})
    v = env.get("versions", {})
    head = (f"{date} · {env.get('gpu', 'no GPU')} (compute capability "
            f"{'.'.join(map(str, env.get('capability', []))) or '—'}, {env.get('memory_mib', '—')} MiB), CUDA "
            f"{env.get('cuda', '—')} · torch {v.get('torch')}, transformers {v.get('transformers')}, peft "
            f"{v.get('peft')}, bitsandbytes {v.get('bitsandbytes')}, liger-kernel {v.get('liger-kernel')}, TRL "
            f"{v.get('trl') or 'not installed'} · varlen kernels: {', '.join(env.get('varlen_kernels', [])) or 'none'}"
            f" · bf16 matmul peak {env.get('peak_flops', 0) / 1e12:.0f} TFLOP/s on the model's shapes")
    lines = ["`bash bench/gpu/run.sh` (see [performance.md](performance.md#on-a-gpu)); models of the real "
             "architectures with random weights.", "", head, "", "**Correctness** (on CUDA):", ""]
    for name, r in (steps.get("correctness", {}).get("checks") or {}).items():
        verdict = "skipped: " + r["skipped"] if "skipped" in r else ("ok" if r.get("ok") else "FAILED")
        lines.append(f"- {name}: {verdict}{_detail(name, r)}")
    if "summary" in steps and steps["summary"].get("table"):
        lines += ["", steps["summary"]["table"]]
    fits = [steps[k] for k in ("fit:lora", "fit:qlora") if k in steps]
    if fits:
        lines += ["", "**Longest sequence one training step fits** (one sequence, every token trained, no gradient "
                  "checkpointing):", ""]
        for r in fits:
            if r["status"] != "ok":
                lines.append(f"- {r['step'].split(':')[1]}: {r['status']}")
                continue
            peak = (r["peaks"].get(str(r["largest_fitting_length"]), {}).get("cuda") or {}).get("peak_reserved_mib")
            parts = [f"peak reserved {peak} MiB" if peak else None, r.get("note"),
                     f"first failure at {r['first_failure']}" if r["first_failure"] else None]
            lines.append(f"- {r['adapter']} on {r['model']}: {r['largest_fitting_length']} tokens "
                         f"({'; '.join(p for p in parts if p)})")
    planner = steps.get("planner", {})
    if planner.get("table"):
        lines += ["", "**`tunesmith plan` against the measured peak** (error = (predicted - measured) / measured):", "",
                  planner["table"]]
    others = [r for r in records if r["status"].startswith(("failed", "skipped")) and r["step"] != "correctness"]
    if others:
        lines += ["", "Steps that did not run: " + "; ".join(f"{r['step']}: {r['status']}" for r in others)]
    return "\n".join(lines)


def _detail(name: str, r: dict) -> str:
    if name == "varlen" and "packed" in r:
        p, s = r["packed"], r.get("shared", {})
        return (f" (kernel {r['kernel']}; max log-prob difference per token vs each sequence alone: packed "
                f"{p['max_logp_diff_per_token']:.1e}, shared {s.get('max_logp_diff_per_token', float('nan')):.1e}; "
                f"the SDPA mask path {p['mask_logp_diff_per_token']:.1e}; a leaking layout "
                f"{p['leak_logp_diff_per_token']:.1e}; gradient relative error vs the mask path "
                f"{p['grad_rel_err_vs_mask']:.1e})")
    if name == "dpo_step0_ln2" and "loss" in r:
        return f" (loss {r['loss']:.6f})"
    if name == "resume_bit_identical" and "bit_identical" in r:
        return f" (bit-identical: {r['bit_identical']}, max difference {r['max_abs_diff']})"
    if name == "liger_head" and "seconds" in r and isinstance(r["seconds"], dict):
        return f" (forward+backward s {r['seconds']}, extra peak MiB {r['peak_extra_mib']}, rel. error {r['rel_err']})"
    return ""


def publish(results: Path, doc: Path, date: str | None = None) -> str:
    body = section(json.loads(results.read_text()), date or dt.date.today().isoformat())
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^## {re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = f"## {SECTION}\n\n{body}\n\n"
    text = pattern.sub(lambda _: new, text, count=1) if pattern.search(text) else text.rstrip() + "\n\n" + new
    doc.write_text(text.rstrip() + "\n")
    return body


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    args = ap.parse_args(argv)
    print(publish(args.results, args.doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
