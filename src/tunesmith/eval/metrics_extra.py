"""Metrics for the two newer data shapes: `perplexity` (raw documents, and the reference answers of
conversations) and `tool_call` (the right function with the reference's arguments).

`perplexity` is a log-prob metric like `loss`: each example's score is its mean negative log-likelihood per
trained token, in nats (a document: every token, scored in windows as training sees it, eval/documents.py; a
conversation: the reference answer's tokens). Comparisons and intervals are over examples (documents), paired
across candidates. exp(mean score) is the geometric mean of the per-document perplexities; the eval reports it
next to the nats (`perplexities`).

`tool_call` parses the calls written in a prediction with the syntax of the common chat templates
(`data.tools.parse_calls`: Hermes / Qwen2.5 `<tool_call>` blocks, Llama-3.1 JSON, Mistral `[TOOL_CALLS]`) and
scores 1 when they are the reference's calls: the same functions with equal arguments (as JSON values; the order
of several calls does not matter). A reference without calls scores 1 when the prediction makes none.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from ..data.tools import parse_calls
from ..errors import TunesmithError
from .metrics import Metric

EXTRA_SPECS = ("perplexity", "tool_call")


@dataclass(frozen=True)
class Perplexity(Metric):
    def score(self, prediction: str, reference: str) -> float:
        raise TypeError("perplexity is computed from log-probs; call score_nll(nll) instead")

    def score_nll(self, nll: float) -> float:
        if not math.isfinite(nll) or nll < 0:
            raise TunesmithError(f"perplexity got a per-example NLL of {nll}",
                                 "NLL must be a finite, non-negative number of nats")
        return float(nll)


def _key(calls: list[tuple[str, Any]]) -> list[str]:
    return sorted(json.dumps([name, args], sort_keys=True, ensure_ascii=False) for name, args in calls)


@dataclass(frozen=True)
class ToolCallMatch(Metric):
    def score(self, prediction: str, reference: str) -> float:
        wanted = parse_calls(reference)
        if wanted is None:
            raise TunesmithError(f"tool_call: the reference {reference[:80]!r} does not parse as tool calls",
                                 "references come from the eval data's assistant tool_calls")
        got = parse_calls(prediction)
        return float(got is not None and _key(got) == _key(wanted))

    def details(self, prediction: str, reference: str) -> dict[str, Any]:
        got, wanted = parse_calls(prediction), parse_calls(reference) or []
        return {"unparsed": got is None,
                "right_functions": got is not None and sorted(n for n, _ in got) == sorted(n for n, _ in wanted)}


def parse_extra(kind: str, has_arg: bool) -> Metric | None:
    """The metric of `kind` when it is one of these, else None."""
    if kind not in EXTRA_SPECS:
        return None
    if has_arg:
        raise TunesmithError(f"unknown metric '{kind}:...': '{kind}' takes no argument",
                             "valid metrics include perplexity and tool_call")
    if kind == "perplexity":
        return Perplexity("perplexity", binary=False, higher_is_better=False, needs_logprobs=True, unit="nats")
    return ToolCallMatch("tool_call")


def perplexities(aggregates: dict) -> dict[str, dict[str, float]]:
    """exp of each candidate's mean NLL and of its interval: the geometric mean of per-example perplexities."""
    return {name: {"perplexity": math.exp(a.mean), "lo": math.exp(a.lo), "hi": math.exp(a.hi)}
            for name, a in aggregates.items()}
