"""Per-example eval metrics, parsed from short specs such as `exact`, `regex:PATTERN` or `json_schema:FILE`.

Every metric turns one (prediction, reference) pair into a float: 0/1 for binary metrics, a per-example
NLL for `loss`. Aggregation and significance live in `stats.py`; nothing here knows about models.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.errors import TunesmithError
from tunesmith.methods.scoring import (  # noqa: F401 - the eval's names for them
    answer_tokens,
    load_labels,
    load_schema,
    normalize,
    schema_error,
    strip_code_fence,
    token_f1,
)
from tunesmith.methods.scoring import parse_json as _parse_json

METRIC_SPECS = (
    "exact",
    "choice",
    "choice:LABELS.json",
    "contains",
    "f1",
    "regex:PATTERN",
    "json",
    "json_schema:SCHEMA.json",
    "json_fields",
    "python:MODULE:FUNCTION",
    "loss",
    "perplexity",
    "tool_call",
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

    def score_example(self, prediction: str, reference: str, example: Any = None) -> float:
        """The score with the whole eval example at hand (only user metrics look at it)."""
        return self.score(prediction, reference)

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
class TokenF1(Metric):
    def score(self, prediction: str, reference: str) -> float:
        return token_f1(prediction, reference)


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


def flat_fields(value: Any, prefix: str = "") -> dict[str, Any]:
    """A JSON object as {dotted.path: leaf value}; lists and scalars are leaves."""
    if not isinstance(value, dict):
        return {prefix: value} if prefix else {}
    out: dict[str, Any] = {}
    for key, inner in value.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        out.update(flat_fields(inner, path) if isinstance(inner, dict) and inner else {path: inner})
    return out


def field_counts(prediction: str, reference: str) -> dict[str, tuple[int, int, int]]:
    """Per field of either side: (true positive, false positive, false negative). A field is right when
    the prediction has it with the reference's value; an unparseable prediction has no fields."""
    ok, ref = _parse_json(reference)
    if not ok or not isinstance(ref, dict):
        raise TunesmithError(f"json_fields: the reference {reference[:80]!r} is not a JSON object",
                             "json_fields needs references that are JSON objects; use exact or json otherwise")
    ok, pred = _parse_json(prediction)
    got, want = flat_fields(pred) if ok else {}, flat_fields(ref)
    counts = {}
    for key in {*got, *want}:
        right = key in got and key in want and got[key] == want[key]
        counts[key] = (int(right), int(key in got and not right), int(key in want and not right))
    return counts


def f1_from_counts(tp: int, fp: int, fn: int) -> float:
    return 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


@dataclass(frozen=True)
class JsonFields(Metric):
    """Per-example F1 over the fields (dotted paths) of a JSON answer against a JSON reference; `details`
    keeps each field's counts so the report can give per-field precision, recall and F1."""

    def score(self, prediction: str, reference: str) -> float:
        counts = field_counts(prediction, reference).values()
        return f1_from_counts(*(sum(c[i] for c in counts) for i in range(3)))

    def details(self, prediction: str, reference: str) -> dict[str, Any]:
        counts = field_counts(prediction, reference)
        return {"parsed": _parse_json(prediction)[0], "fields": {k: list(v) for k, v in sorted(counts.items())}}


def per_field_scores(metric: Metric, predictions: Sequence[str], references: Sequence[str]
                     ) -> dict[str, dict[str, float]]:
    """json_fields: precision, recall, F1 and support of every field over the whole set."""
    totals: dict[str, list[int]] = {}
    for p, r in zip(predictions, references, strict=True):
        for key, c in field_counts(p, r).items():
            t = totals.setdefault(key, [0, 0, 0])
            for i in range(3):
                t[i] += c[i]
    out = {}
    for key, (tp, fp, fn) in sorted(totals.items()):
        out[key] = {"precision": tp / (tp + fp) if tp + fp else 0.0, "recall": tp / (tp + fn) if tp + fn else 0.0,
                    "f1": f1_from_counts(tp, fp, fn), "support": tp + fn}
    return out


@dataclass(frozen=True)
class PythonMetric(Metric):
    """A user's function `fn(prediction, reference, example) -> float in [0, 1]`."""

    fn: Any = None

    def score(self, prediction: str, reference: str) -> float:
        return self.score_example(prediction, reference, None)

    def score_example(self, prediction: str, reference: str, example: Any = None) -> float:
        try:
            value = self.fn(prediction, reference, example)
        except Exception as exc:  # the user's code: say which metric and what it raised
            raise TunesmithError(f"metric {self.name} raised {type(exc).__name__}: {exc}",
                                 "fix the function; it gets (prediction, reference, example)") from exc
        if isinstance(value, bool):
            value = float(value)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0.0 <= value <= 1.0:
            raise TunesmithError(f"metric {self.name} returned {value!r} for prediction {prediction[:60]!r}",
                                 "a python: metric must return a number in [0, 1]")
        return float(value)


def load_function(spec: str) -> Any:
    """`python:package.module:function` or `python:path/to/file.py:function` → the function."""
    body = spec.partition(":")[2]
    module_name, sep, fn_name = body.rpartition(":")
    if not sep or not module_name or not fn_name:
        raise _bad_spec(spec, "write python:MODULE:FUNCTION (a module or a .py file, then the function)")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.exists():
                raise TunesmithError(f"metric {spec}: file not found: {path}", "check the path before ':FUNCTION'")
            loaded = importlib.util.spec_from_file_location(f"tunesmith_metric_{path.stem}", path)
            module = importlib.util.module_from_spec(loaded)  # type: ignore[arg-type]
            sys.modules[loaded.name] = module  # type: ignore[union-attr]
            loaded.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            module = importlib.import_module(module_name)
    except TunesmithError:
        raise
    except Exception as exc:
        raise TunesmithError(f"metric {spec}: cannot import {module_name}: {type(exc).__name__}: {exc}",
                             "the module must be importable (on PYTHONPATH) or be a path to a .py file") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise TunesmithError(f"metric {spec}: {module_name} has no function {fn_name}",
                             "name a function defined in that module")
    return fn


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
    from .metrics_extra import parse_extra  # perplexity, tool_call

    extra = parse_extra(kind, bool(sep))
    if extra is not None:
        return extra
    path = Path(arg) if base_dir is None or Path(arg).is_absolute() else Path(base_dir) / arg
    simple = {"exact": ExactMatch, "contains": Contains, "json": JsonValid}
    if kind == "python":
        return PythonMetric(spec, binary=False, fn=load_function(spec))
    if kind in ("f1", "json_fields"):
        if sep:
            raise _bad_spec(spec, f"'{kind}' takes no argument")
        return TokenF1("f1", binary=False) if kind == "f1" else JsonFields("json_fields", binary=False)
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


def score_all(metric: Metric, predictions: Sequence[str], references: Sequence[str],
              examples: Sequence[Any] | None = None) -> list[float]:
    if len(predictions) != len(references):
        raise TunesmithError(f"{len(predictions)} predictions but {len(references)} references")
    extra = list(examples) if examples is not None else [None] * len(predictions)
    return [metric.score_example(p, r, x) for p, r, x in zip(predictions, references, extra, strict=True)]


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
