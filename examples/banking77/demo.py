"""`make demo`: fine-tune the default model (SmolLM2-135M-Instruct) on banking77 intents on this machine's CPU,
then compare it with the base model on held-out messages.

Everything here is the public API; the CLI equivalent is `tunesmith train examples/banking77/config.yaml`.
"""

import sys
import time
from pathlib import Path

import tunesmith

HERE = Path(__file__).parent


def main() -> int:
    started = time.time()
    run = tunesmith.train(HERE / "config.yaml", overrides=sys.argv[1:])
    minutes = (time.time() - started) / 60
    summary = run.info.get("eval", {})
    print()
    print(f"banking77 demo finished in {minutes:.1f} min; adapter in {run.adapter}")
    for line in summary.get("verdicts", []):
        print(line)
    for name, score in summary.get("scores", {}).items():
        print(f"  {name:>12}: {score}")
    print(f"full report: {run.path / 'eval' / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
