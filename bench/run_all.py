"""Every CPU benchmark that writes a section of docs/BENCHMARKS.md, one after another (`make bench`). Run it on
an otherwise idle machine: each script times real training and generation. Takes hours on a 2-core CPU; run
one script alone to refresh one section."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = [
    ["memory.py"],
    ["eval_speed.py"],
    ["compare_trl.py", "--method", "sft"],
    ["compare_trl.py", "--method", "dpo"],
    ["compare_trl.py", "--method", "orpo"],
    ["ablation.py"],
    ["plan_accuracy.py", "--time"],
    ["distributed.py"],
]


def main() -> int:
    failed = []
    for args in SCRIPTS:
        print(f"== bench/{' '.join(args)}", flush=True)
        if subprocess.call([sys.executable, str(HERE / args[0]), *args[1:]]) != 0:
            failed.append(" ".join(args))
    if failed:
        print("failed: " + "; ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
