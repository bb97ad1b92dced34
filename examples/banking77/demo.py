"""`make demo`: fine-tune the default model (SmolLM2-135M-Instruct) on banking77 intents on this machine's CPU,
then compare it with the base model on held-out messages.

Everything here is the public API; the CLI equivalent is `tunesmith train examples/banking77/config.yaml`.
"""

import argparse
import sys
import time
from pathlib import Path

import tunesmith

HERE = Path(__file__).parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value of examples/banking77/config.yaml, e.g. --set train.epochs=2")
    args = parser.parse_args()
    started = time.time()
    run = tunesmith.train(HERE / "config.yaml", overrides=args.overrides)
    minutes = (time.time() - started) / 60
    summary = run.info.get("eval", {})
    print()
    print(f"banking77 demo finished in {minutes:.1f} min; adapter in {run.adapter}")
    for line in summary.get("verdicts", []):
        print(line)
    for metric, by_candidate in summary.get("scores", {}).items():
        for name, s in by_candidate.items():
            print(f"  {metric} accuracy, {name:>6}: {100 * s['mean']:5.1f}%  (95% CI {100 * s['lo']:.1f} … "
                  f"{100 * s['hi']:.1f})")
    print(f"full report: {run.path / 'eval' / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
