"""Build the JSON-answer variant of banking77 for the SFT -> GRPO example from ../train.jsonl and ../test.jsonl.

Every answer is a JSON object {"intent": LABEL} that must validate against intent.schema.json (LABEL one of the
77 intents) and carry the right label. Rows are shuffled with a fixed seed and split into disjoint sets: SFT
examples, GRPO prompts (their label in a `label` column, which the rewards compare with) and held-out test rows.

    python examples/banking77/json/prepare.py   # writes sft.jsonl, grpo.jsonl, test.jsonl, intent.schema.json
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
SYSTEM = ('Classify the customer\'s banking message into one of 77 intents. Answer with a JSON object only: '
          '{"intent": "<intent label>"}.')
SIZES = {"sft": 400, "grpo": 1200}
TEST = 400


def rows(name: str) -> list[tuple[str, str]]:
    out = []
    for line in (HERE.parent / name).read_text(encoding="utf-8").splitlines():
        messages = json.loads(line)["messages"]
        out.append((messages[1]["content"], messages[2]["content"]))
    return out


def record(text: str, label: str) -> dict:
    answer = json.dumps({"intent": label})
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text},
                         {"role": "assistant", "content": answer}], "label": label}


def write(name: str, items: list[tuple[str, str]]) -> None:
    with (HERE / name).open("w", encoding="utf-8") as out:
        for text, label in items:
            out.write(json.dumps(record(text, label), ensure_ascii=False) + "\n")
    print(f"{name}: {len(items)} rows")


def main() -> None:
    rng = random.Random(0)
    train, test = rows("train.jsonl"), rows("test.jsonl")
    rng.shuffle(train)
    rng.shuffle(test)
    write("sft.jsonl", train[:SIZES["sft"]])
    write("grpo.jsonl", train[SIZES["sft"]:SIZES["sft"] + SIZES["grpo"]])
    write("test.jsonl", test[:TEST])
    labels = json.loads((HERE.parent / "labels.json").read_text())
    schema = {"type": "object", "properties": {"intent": {"enum": labels}}, "required": ["intent"],
              "additionalProperties": False}
    (HERE / "intent.schema.json").write_text(json.dumps(schema, indent=1) + "\n")
    print("intent.schema.json:", len(labels), "labels")


if __name__ == "__main__":
    main()
