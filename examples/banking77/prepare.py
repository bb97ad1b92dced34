"""Convert the banking77 CSV files (text,category) into tunesmith's `messages` JSONL.

Usage: python examples/banking77/prepare.py SRC_DIR  (SRC_DIR holds train.csv, test.csv)
"""

import csv
import json
import sys
from pathlib import Path

SYSTEM = "Classify the customer's banking message into one of 77 intents. Answer with the intent label only."


def convert(src: Path, dst: Path) -> int:
    rows = list(csv.DictReader(src.open(newline="", encoding="utf-8")))
    with dst.open("w", encoding="utf-8") as out:
        for row in rows:
            messages = [{"role": "system", "content": SYSTEM},
                        {"role": "user", "content": row["text"].strip()},
                        {"role": "assistant", "content": row["category"]}]
            out.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    return len(rows)


if __name__ == "__main__":
    src_dir = Path(sys.argv[1])
    here = Path(__file__).parent
    for split in ("train", "test"):
        print(split, convert(src_dir / f"{split}.csv", here / f"{split}.jsonl"))
