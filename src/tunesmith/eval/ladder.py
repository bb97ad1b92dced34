"""The ladder: every rung (prompting, few-shot, retrieval, a big model behind an endpoint, a vote of neighbours,
the fine-tune) from cheapest to most expensive with its score and cost, then one plain verdict: is the
fine-tune worth it against the best rung without fine-tuning, and what did it fix and break there."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .cost import Usage, format_usd
from .stats import Comparison, PairResult, _num, compare_pair, format_p

CLOSE_PTS = 0.05  # a baseline within 5 points of the fine-tune "comes close"


@dataclass(frozen=True)
class Rung:
    name: str
    tuned: bool
    mean: float
    lo: float
    hi: float
    usd_per_1k: float | None
    usd_per_1k_cached: float | None
    latency_p50: float | None
    latency_p95: float | None
    cut_off: int
    ran_on: str


@dataclass(frozen=True)
class Worth:
    tuned: str
    baseline: str
    pair: PairResult
    worth_it: bool
    line: str
    close: list[str] = field(default_factory=list)  # notes on baselines that come close
    fixed: list[int] = field(default_factory=list)  # example indices the fine-tune got right and the baseline not
    broke: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "pair": asdict(self.pair)}


def ladder(comparison: Comparison, usage: Mapping[str, Usage], tuned: Sequence[str]) -> list[Rung]:
    """One rung per candidate, cheapest first (candidates without a price last, by time per query)."""
    rungs = []
    for name, agg in comparison.aggregates.items():
        u = usage.get(name)
        rungs.append(Rung(name, name in tuned, agg.mean, agg.lo, agg.hi, u.usd_per_1k if u else None,
                          u.usd_per_1k_cached if u else None, u.latency_p50 if u else None,
                          u.latency_p95 if u else None, u.cut_off if u else 0, u.ran_on if u else ""))

    def key(r: Rung) -> tuple:
        u = usage.get(r.name)
        per_query = u.seconds / u.n if u and u.n else 0.0
        return (r.usd_per_1k is None, r.usd_per_1k or 0.0, per_query)

    return sorted(rungs, key=key)


def _best(names: Sequence[str], comparison: Comparison) -> str:
    sign = 1.0 if comparison.higher_is_better else -1.0
    return max(names, key=lambda n: sign * comparison.aggregates[n].mean)


def worth(comparison: Comparison, scores: Mapping[str, Sequence[float]], tuned: Sequence[str],
          baselines: Sequence[str], usage: Mapping[str, Usage], endpoints: Sequence[str] = ()) -> Worth | None:
    """The best fine-tune against the best rung without fine-tuning, on this comparison's metric."""
    if not tuned or not baselines:
        return None
    t, b = _best(tuned, comparison), _best(baselines, comparison)
    arrays = {n: np.asarray(scores[n], dtype=np.float64) for n in (*tuned, *baselines)}
    pair = compare_pair(arrays[t], arrays[b], t, b, comparison, alpha=comparison.alpha)
    unit = comparison.unit
    stats = (f"{_num(pair.diff, unit, True)} {unit}, {int(round((1 - comparison.alpha) * 100))}% CI "
             f"{_num(pair.lo, unit, True)} \u2026 {_num(pair.hi, unit, True)}, {format_p(pair.p)}, n = {pair.n}")
    if pair.outcome == "win":
        line = (f"fine-tuning is worth it: {t} scores {_num(pair.diff, unit, True)} {unit} over the best rung "
                f"without it ({b}), {stats.split(', ', 1)[1]}{_cost_phrase(t, b, endpoints, comparison, usage)}")
    elif pair.outcome == "worse":
        line = f"fine-tuning is not worth it: {b} is better than {t} ({stats}), at no training cost"
    else:
        line = f"fine-tuning is not worth it: {b} is within the interval of {t} ({stats}), at no training cost"
    fixed, broke = flips(arrays[t], arrays[b], comparison.higher_is_better)
    return Worth(t, b, pair, pair.outcome == "win", line, close_notes(comparison, arrays, t, baselines),
                 fixed, broke)


def _cost_phrase(t: str, b: str, endpoints: Sequence[str], comparison: Comparison,
                 usage: Mapping[str, Usage]) -> str:
    """", at 12x lower cost per query than <the best-scoring endpoint, else the best rung>"."""
    priced = [e for e in endpoints if usage.get(e) and usage[e].usd_per_1k]
    other = _best(priced, comparison) if priced else b
    mine, theirs = usage.get(t), usage.get(other)
    if not mine or not theirs or not mine.usd_per_1k or not theirs.usd_per_1k:
        return ""
    ratio = theirs.usd_per_1k / mine.usd_per_1k
    if ratio >= 1:
        return f", at {ratio:.3g}x lower cost per query than {other} ({format_usd(mine.usd_per_1k)} vs " \
               f"{format_usd(theirs.usd_per_1k)} per 1k queries)"
    return f", at {1 / ratio:.3g}x the cost per query of {other} ({format_usd(mine.usd_per_1k)} vs " \
           f"{format_usd(theirs.usd_per_1k)} per 1k queries)"


def close_notes(comparison: Comparison, arrays: Mapping[str, np.ndarray], t: str,
                baselines: Sequence[str]) -> list[str]:
    """Baselines that come close to the best fine-tune (within CLOSE_PTS, or not significantly worse), and
    those that do better (significantly: "is better than"; not significantly: "is ahead of")."""
    notes = []
    level = int(round((1 - comparison.alpha) * 100))
    for b in baselines:
        pair = compare_pair(arrays[t], arrays[b], t, b, comparison, alpha=comparison.alpha)
        gap = pair.diff if comparison.higher_is_better else -pair.diff
        if pair.outcome == "win" and not (comparison.unit == "pts" and gap < CLOSE_PTS):
            continue
        how = ("is better than" if pair.outcome == "worse" else
               "is ahead of" if gap < 0 else "comes close to")
        why = ": a vote of similar training examples, you may not need a language model" \
            if b.startswith("knn:") else ""
        notes.append(f"{b} {how} {t}: {_num(-pair.diff, comparison.unit, True)} {comparison.unit} "
                     f"({level}% CI {_num(-pair.hi, comparison.unit, True)} \u2026 "
                     f"{_num(-pair.lo, comparison.unit, True)}){why}")
    return notes


def flips(tuned: np.ndarray, baseline: np.ndarray, higher_is_better: bool = True) -> tuple[list[int], list[int]]:
    """Examples the fine-tune fixed (better than the baseline) and broke (worse), by index."""
    better = tuned > baseline if higher_is_better else tuned < baseline
    worse = tuned < baseline if higher_is_better else tuned > baseline
    return [int(i) for i in np.flatnonzero(better)], [int(i) for i in np.flatnonzero(worse)]
