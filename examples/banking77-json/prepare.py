"""Build the format-conformance example from the banking77 copy in ../banking77: the same customer messages,
answered as a JSON object {"intent": ..., "category": ...} that schema.json describes.

`intent` is banking77's own label. `category` is derived from the label by the keyword rules in CATEGORIES
(the first rule whose keyword occurs in the label wins), so it is a deterministic function of the label.
Usage: python examples/banking77-json/prepare.py   (writes train.jsonl, test.jsonl and schema.json here)
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
SOURCE = HERE.parent / "banking77"
TRAIN_ROWS, TEST_ROWS, SEED = 3000, 500, 0
CATEGORIES = (  # (category, keywords), tried in order
    ("top_up", ("top_up", "topping_up")),
    ("transfer", ("transfer", "beneficiary", "receiving_money")),
    ("currency", ("exchange", "currency", "fiat")),
    ("cash", ("cash", "atm", "cheque")),
    ("card", ("card", "pin", "contactless", "apple_pay", "visa")),
    ("security", ("verify", "identity", "passcode", "compromised", "phone", "source_of_funds")),
    ("payment", ("refund", "charge", "payment", "debit", "fee")),
)
OTHER = "account"
SYSTEM = ("Classify the customer's banking message. Answer with a JSON object only: "
          '{"intent": <one of the 77 banking77 intent labels>, "category": <one of '
          + ", ".join([c for c, _ in CATEGORIES] + [OTHER]) + ">}.")


def category(label: str) -> str:
    lowered = label.lower()
    return next((name for name, words in CATEGORIES if any(w in lowered for w in words)), OTHER)


def convert(src: Path, dst: Path, rows: int) -> int:
    lines = src.read_text(encoding="utf-8").splitlines()
    keep = sorted(random.Random(SEED).sample(range(len(lines)), rows))
    with dst.open("w", encoding="utf-8") as out:
        for i in keep:
            messages = json.loads(lines[i])["messages"]
            user = next(m["content"] for m in messages if m["role"] == "user")
            label = next(m["content"] for m in messages if m["role"] == "assistant")
            answer = json.dumps({"intent": label, "category": category(label)})
            row = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user},
                   {"role": "assistant", "content": answer}]
            out.write(json.dumps({"messages": row}, ensure_ascii=False) + "\n")
    return rows


def schema(labels: list[str]) -> dict:
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
            "properties": {"intent": {"enum": labels},
                           "category": {"enum": [c for c, _ in CATEGORIES] + [OTHER]}},
            "required": ["intent", "category"], "additionalProperties": False}


if __name__ == "__main__":
    labels = json.loads((SOURCE / "labels.json").read_text(encoding="utf-8"))
    (HERE / "schema.json").write_text(json.dumps(schema(labels), indent=2) + "\n", encoding="utf-8")
    print("train", convert(SOURCE / "train.jsonl", HERE / "train.jsonl", TRAIN_ROWS))
    print("test", convert(SOURCE / "test.jsonl", HERE / "test.jsonl", TEST_ROWS))
