"""Per-example eval metrics, parsed from short specs such as `exact`, `regex:PATTERN` or `json_schema:FILE`.

Every metric turns one (prediction, reference) pair into a float: 0/1 for binary metrics, a per-example
NLL for `loss`. Aggregation and significance live in `stats.py`; nothing here knows about models.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.errors import TunesmithError
from tunesmith.methods.scoring import load_labels, load_schema, normalize, schema_error, strip_code_fence  # noqa: F401
from tunesmith.methods.scoring import parse_json as _parse_json

METRIC_SPECS = (
    "exact",
    "choice",
    "choice:LABELS.json",
    "contains",
    "regex:PATTERN",
    "json",
    "json_schema:SCHEMA.json",
    "loss",
)

@dataclass(frozen=True)
class Metric:
    """Base class. `unit` is "pts" for scores in [0, 1] (reported in percentage points) or "nats"."""

    name: str
    binary: bool = True
    higher_is_better: bool = True
    needs_logprobs: bool = False
    unit: str = "pts"

    def score(self, prediction: str, reference: str) -> float:
        raise NotImplementedError

    def details(self, prediction: str, reference: str) -> dict[str, Any]:
        """Extra per-example facts for results.json (e.g. `invalid` for choice); empty by default."""
        return {}


@dataclass(frozen=True)
class ExactMatch(Metric):
    def score(self, prediction: str, reference: str) -> float:
        return float(normalize(prediction) == normalize(reference))


@dataclass(frozen=True)
class Contains(Metric):
    def score(self, prediction: str, reference: str) -> float:
        ref = normalize(reference)
        pred = normalize(prediction)
        # An empty reference would otherwise be "contained" in every prediction.
        return float(ref in pred) if ref else float(pred == "")


@dataclass(frozen=True)
class Choice(Metric):
    """Prediction must be one of `labels` (normalised); scores 1 when it equals the reference."""

    labels: frozenset[str] = field(default_factory=frozenset)

    def score(self, prediction: str, reference: str) -> float:
        pred = normalize(prediction)
        return float(pred in self.labels and pred == normalize(reference))

    def details(self, prediction: str, reference: str) -> dict[str, Any]:
        return {"invalid": normalize(prediction) not in self.labels}


@dataclass(frozen=True)
class RegexMatch(Metric):
    """Fullmatch against the stripped prediction; with a named group `answer`, that group must equal
    the reference (normalised). Without it, the metric checks format only and ignores the reference."""

    pattern: re.Pattern[str] = field(default_factory=lambda: re.compile(""))

    def _answer(self, prediction: str) -> tuple[bool, str | None]:
        match = self.pattern.fullmatch(prediction.strip())
        if match is None:
            return False, None
        answer = match.group("answer") if "answer" in self.pattern.groupindex else None
        return True, answer

    def score(self, prediction: str, reference: str) -> float:
        matched, answer = self._answer(prediction)
        if "answer" not in self.pattern.groupindex:
            return float(matched)
        return float(answer is not None and normalize(answer) == normalize(reference))

    def details(self, prediction: str, reference: str) -> dict[str, Any]:
        matched, answer = self._answer(prediction)
        return {"matched": matched, "answer": answer}


@dataclass(frozen=True)
class JsonValid(Metric):
    def score(self, prediction: str, reference: str) -> float:
        return float(_parse_json(prediction)[0])


def field_accuracy(predicted: Any, reference: Any) -> float | None:
    """Fraction of the reference object's top-level fields that the prediction reproduces exactly;
    None when the reference is not a non-empty JSON object."""
    if not isinstance(reference, dict) or not reference:
        return None
    if not isinstance(predicted, dict):
        return 0.0
    same = sum(1 for key, value in reference.items() if key in predicted and predicted[key] == value)
    return same / len(reference)


@dataclass(frozen=True)
class JsonSchemaValid(Metric):
    """Scores 1 when the prediction parses as JSON and validates; `details` adds per-field accuracy."""

    schema: dict[str, Any] = field(default_factory=dict)
    schema_path: str = ""

    def _errors(self, prediction: str) -> tuple[Any, str | None]:
        return schema_error(self.schema, prediction)

    def score(self, prediction: str, reference: str) -> float:
        return float(self._errors(prediction)[1] is None)

    def details(self, prediction: str, reference: str) -> dict[str, Any]:
        value, error = self._errors(prediction)
        ref_ok, ref_value = _parse_json(reference)
        accuracy = field_accuracy(value, ref_value) if ref_ok else None
        return {"valid": error is None, "error": error, "field_accuracy": accuracy}


@dataclass(frozen=True)
class HeldOutLoss(Metric):
    """Per-example held-out NLL (mean nats per reference token), computed from log-probs elsewhere."""

    def score(self, prediction: str, reference: str) -> float:
        raise TypeError("the loss metric is computed from log-probs; call score_nll(nll) instead")

    def score_nll(self, nll: float) -> float:
        if not math.isfinite(nll) or nll < 0:
            raise TunesmithError(f"loss metric got a per-example NLL of {nll}",
                                 "NLL must be a finite, non-negative number of nats")
        return float(nll)


def _bad_spec(spec: str, why: str) -> TunesmithError:
    return TunesmithError(f"unknown metric '{spec}': {why}", "valid metrics: " + ", ".join(METRIC_SPECS))


def parse_metric(spec: str, references: Iterable[str] | None = None, base_dir: Path | None = None) -> Metric:
    """Build a metric from its spec. `references` (all references of the eval data) give `choice` its
    default label set; relative file paths are resolved against `base_dir` (default: the working dir)."""
    kind, sep, arg = spec.strip().partition(":")
    path = Path(arg) if base_dir is None or Path(arg).is_absolute() else Path(base_dir) / arg
    simple = {"exact": ExactMatch, "contains": Contains, "json": JsonValid}
    if kind in simple or kind == "loss":
        if sep:
            raise _bad_spec(spec, f"'{kind}' takes no argument")
        if kind == "loss":
            return HeldOutLoss("loss", binary=False, higher_is_better=False, needs_logprobs=True, unit="nats")
        return simple[kind](kind)
    if kind == "choice":
        if sep:
            return Choice(spec, labels=load_labels(path))
        if references is None:
            raise TunesmithError("the 'choice' metric needs a label set",
                                 "pass the eval references, or use choice:LABELS.json")
        return Choice("choice", labels=frozenset(normalize(r) for r in references))
    if kind == "regex":
        try:
            return RegexMatch(spec, pattern=re.compile(arg))
        except re.error as exc:
            raise TunesmithError(f"invalid regular expression in metric '{spec}': {exc}") from None
    if kind == "json_schema":
        if not arg:
            raise _bad_spec(spec, "json_schema needs a file: json_schema:SCHEMA.json")
        return JsonSchemaValid(spec, schema=load_schema(path), schema_path=str(path))
    raise _bad_spec(spec, f"'{kind}' is not a metric")


def score_all(metric: Metric, predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    if len(predictions) != len(references):
        raise TunesmithError(f"{len(predictions)} predictions but {len(references)} references")
    return [metric.score(p, r) for p, r in zip(predictions, references, strict=True)]


def summarize_details(metric: Metric, predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean of every numeric/boolean detail over the examples where it applies (e.g. invalid rate)."""
    if len(predictions) != len(references):
        raise TunesmithError(f"{len(predictions)} predictions but {len(references)} references")
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for p, r in zip(predictions, references, strict=True):
        for key, value in metric.details(p, r).items():
            if isinstance(value, (bool, int, float)):
                sums[key] = sums.get(key, 0.0) + float(value)
                counts[key] = counts.get(key, 0) + 1
    return {key: sums[key] / counts[key] for key in sums}
