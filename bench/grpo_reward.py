"""The reward both tools get in `compare_trl.py --method grpo`: how close the answer is to the JSON object
{"intent": LABEL} (difflib's similarity ratio, 0 to 1), plus 1 when it is a JSON object carrying the right
label. One function, two call conventions. It is continuous on purpose: answers to one prompt almost never
tie, so no group has all-equal rewards (tunesmith skips such groups, which gives the same update with less
work) and both tools do the same work."""

import difflib
import json


def label_reward(text: str, label: str) -> float:
    target = json.dumps({"intent": label})
    closeness = difflib.SequenceMatcher(None, text.strip(), target).ratio()
    try:
        value = json.loads(text.strip())
    except ValueError:
        return closeness
    return closeness + float(isinstance(value, dict) and value.get("intent") == label)


def tunesmith_reward(prediction, reference, example):
    return label_reward(prediction, example["label"])


def trl_reward(completions, label, **kw):
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [label_reward(t, y) for t, y in zip(texts, label, strict=True)]
