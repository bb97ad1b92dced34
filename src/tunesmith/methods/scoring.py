"""Comparing a model's text answer with what it should be: normalisation, JSON answers (a markdown code
fence allowed), JSON Schemas, label lists, token F1. The eval's metrics (eval/metrics.py) and the rewards of
online training (methods/rewards.py) score answers with these same functions."""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import TunesmithError

_QUOTE_PAIRS = {'"': '"', "'": "'", "`": "`", "\u201c": "\u201d", "\u2018": "\u2019", "\u00ab": "\u00bb"}
_FENCE = re.compile(r"^```[A-Za-z0-9_-]*\s*\n?(.*?)\n?```$", re.DOTALL)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """Strip, casefold, collapse whitespace, then peel surrounding quotes and a trailing period."""
    out = " ".join(text.split()).casefold()
    previous = None
    while out != previous:
        previous = out
        if out.endswith(".") and not out.endswith(".."):
            out = out[:-1].rstrip()
        if len(out) >= 2 and _QUOTE_PAIRS.get(out[0]) == out[-1]:
            out = out[1:-1].strip()
    return out


def strip_code_fence(text: str) -> str:
    """`json` output wrapped in a single markdown code fence (```json ... ```) is judged on its content."""
    text = text.strip()
    match = _FENCE.match(text)
    return match.group(1).strip() if match else text


def parse_json(text: str) -> tuple[bool, Any]:
    """(True, value) when the text (or the content of its one code fence) is JSON, else (False, None)."""
    try:
        return True, json.loads(strip_code_fence(text))
    except ValueError:
        return False, None


def answer_tokens(text: str) -> list[str]:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, split on whitespace."""
    return _ARTICLES.sub(" ", text.casefold().translate(_PUNCT)).split()


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall (SQuAD's F1); two empty answers agree."""
    pred, ref = answer_tokens(prediction), answer_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def read_json_file(path: Path, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TunesmithError(f"{what} file not found: {path}", "check the path after the ':'") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise TunesmithError(f"cannot read {what} file {path}: {exc}", "it must be a valid UTF-8 JSON file") from None


def load_schema(path: Path) -> dict[str, Any]:
    import jsonschema

    schema = read_json_file(path, "JSON schema")
    if not isinstance(schema, dict):
        raise TunesmithError(f"invalid JSON schema in {path}: the top level must be an object")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.exceptions.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path) or "(root)"
        raise TunesmithError(f"invalid JSON schema in {path} at {where}: {exc.message}",
                             "fix the schema so that it is valid JSON Schema") from None
    return schema


def schema_error(schema: dict[str, Any], text: str) -> tuple[Any, str | None]:
    """The parsed answer and why it fails the schema (None when it parses and validates)."""
    import jsonschema

    ok, value = parse_json(text)
    if not ok:
        return None, "not valid JSON"
    validator = jsonschema.validators.validator_for(schema)(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    return value, None if error is None else error.message


def load_labels(path: Path) -> frozenset[str]:
    labels = read_json_file(path, "choice labels")
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise TunesmithError(f"choice labels file {path} must hold a non-empty JSON list of strings",
                             'e.g. ["positive", "negative", "neutral"]')
    return frozenset(normalize(x) for x in labels)
