"""Build banking77 preference pairs for the SFT -> DPO example: chosen = the right intent label, rejected = a
wrong label that is easy to confuse with it (the label sharing the most words with the right one, e.g.
card_arrival vs card_delivery_estimate; ties broken by a seeded draw).

Usage: python examples/banking77/make_pairs.py [N]   (default 1000 pairs; writes pairs.jsonl next to this file)
"""

import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).parent


def confusable(label: str, labels: list[str], rng: random.Random) -> str:
    """A wrong label sharing the most '_'-separated words with `label` (any wrong label if none shares one)."""
    words = set(label.split("_"))
    others = [x for x in labels if x != label]
    best = max(len(words & set(x.split("_"))) for x in others)
    return rng.choice([x for x in others if len(words & set(x.split("_"))) == best])


def make_pairs(n: int, seed: int = 0) -> list[dict]:
    labels = json.loads((HERE / "labels.json").read_text())
    rows = [json.loads(line) for line in (HERE / "train.jsonl").read_text().splitlines() if line.strip()]
    rng = random.Random(seed)
    pairs = []
    for row in rng.sample(rows, min(n, len(rows))):
        *prompt, answer = row["messages"]
        right = answer["content"]
        pairs.append({"prompt": prompt,
                      "chosen": [{"role": "assistant", "content": right}],
                      "rejected": [{"role": "assistant", "content": confusable(right, labels, rng)}]})
    return pairs


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    out = HERE / "pairs.jsonl"
    with out.open("w", encoding="utf-8") as f:
        for pair in make_pairs(count):
            f.write(json.dumps(pair, ensure_ascii=False) + "\n")
    print(f"wrote {count} pairs to {out}")
