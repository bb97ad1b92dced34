"""`make demo`: fine-tune the default model (SmolLM2-135M-Instruct) on banking77 intents on this machine's CPU,
then climb the ladder on held-out messages: a vote of the five most similar training messages (knn:5, no
language model), the base model, the base model told the labels, five fixed examples in the prompt, the five
most similar training examples (BM25), and the fine-tune, with what each costs per 1,000 queries on this
machine and whether the fine-tune is worth it.

Everything here is the public API; the CLI equivalent is `tunesmith train examples/banking77/config.yaml`.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import tunesmith

HERE = Path(__file__).parent


def ladder_table(results: dict) -> list[str]:
    rows = [("rung", "exact (95% CI)", "$ per 1k queries", "p50 latency", "cut off")]
    for r in results.get("ladder", []):
        usd = r["usd_per_1k"]
        cost = "n/a" if usd is None else f"${usd:.4f}" if usd >= 0.001 else f"${usd:.1e}"
        latency = "n/a" if r["latency_p50"] is None else f"{r['latency_p50']:.3f} s"
        rows.append((r["name"] + (" (fine-tuned)" if r["tuned"] else ""),
                     f"{100 * r['mean']:5.1f}% ({100 * r['lo']:.1f} … {100 * r['hi']:.1f})", cost, latency,
                     str(r["cut_off"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value of examples/banking77/config.yaml, e.g. --set eval.max_examples=50")
    args = parser.parse_args()
    started = time.time()
    run = tunesmith.train(HERE / "config.yaml", overrides=args.overrides)
    minutes = (time.time() - started) / 60
    results = json.loads((run.path / "eval" / "results.json").read_text(encoding="utf-8"))
    eval_minutes = sum(u["seconds"] for u in results["usage"].values()) / 60
    print()
    print(f"banking77 demo finished in {minutes:.1f} min (of which answering the eval: {eval_minutes:.1f} min); "
          f"adapter in {run.adapter}")
    print(f"{results['n']} held-out messages, cheapest rung first:")
    for line in ladder_table(results):
        print("  " + line)
    worth = results.get("worth") or {}
    for note in worth.get("close", []):
        print(f"note: {note}")
    if worth:
        print(worth["line"])
    print(f"full report: {run.path / 'eval' / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
