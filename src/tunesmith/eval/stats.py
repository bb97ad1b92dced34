"""Confidence intervals, paired significance tests and the win/lose verdict. numpy only.

A binary mean (accuracy) gets a Wilson score interval, which stays inside [0, 1] and is not empty at 0% or
100% (a percentile bootstrap of all-zero scores is "0.0 ... 0.0"); other means get a percentile bootstrap.
Scores are per-example floats in the same example order for every candidate, so every comparison is
paired: bootstrap resamples example indices jointly, McNemar uses the discordant pairs of binary scores,
and continuous metrics use an exact-or-Monte-Carlo sign-flip permutation test on the differences.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol

import numpy as np

from tunesmith.errors import TunesmithError

Outcome = Literal["win", "worse", "no_difference"]
_CHUNK_CELLS = 2_000_000  # resampling works in blocks of at most this many index cells (~16 MB)
_EXACT_SIGN_FLIP_MAX_N = 16


class MetricInfo(Protocol):
    name: str
    binary: bool
    higher_is_better: bool
    unit: str


def _as_scores(scores: Sequence[float] | np.ndarray, what: str = "scores") -> np.ndarray:
    x = np.asarray(scores, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise TunesmithError(f"{what}: need a non-empty 1-D list of per-example scores, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise TunesmithError(f"{what}: {int(np.sum(~np.isfinite(x)))} scores are NaN or infinite")
    return x


def _bootstrap_means(x: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK_CELLS // x.size)
    out = np.empty(n_boot)
    for start in range(0, n_boot, rows):
        stop = min(n_boot, start + rows)
        out[start:stop] = x[rng.integers(0, x.size, size=(stop - start, x.size))].mean(axis=1)
    return out


def bootstrap_ci(scores: Sequence[float] | np.ndarray, n_boot: int = 2000, alpha: float = 0.05,
                 seed: int = 0) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap (1 - alpha) confidence interval."""
    x = _as_scores(scores)
    means = _bootstrap_means(x, n_boot, seed)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(x.mean()), float(lo), float(hi)


def wilson_ci(scores: Sequence[float] | np.ndarray, alpha: float = 0.05) -> tuple[float, float, float]:
    """Mean of 0/1 scores and its Wilson score (1 - alpha) interval."""
    x = _as_scores(scores)
    if not np.isin(x, (0.0, 1.0)).all():
        raise TunesmithError("a Wilson interval needs binary 0/1 scores", "use bootstrap_ci for other scores")
    n, p = x.size, float(x.mean())
    z = _normal_quantile(1 - alpha / 2)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return p, max(0.0, float(centre - half)), min(1.0, float(centre + half))


def _normal_quantile(q: float) -> float:
    """Inverse standard normal CDF (Acklam's rational approximation, |error| < 1.2e-9)."""
    a = (-3.969683028665376e1, 2.209460984245205e2, -2.759285104469687e2, 1.383577518672690e2,
         -3.066479806614716e1, 2.506628277459239e0)
    b = (-5.447609879822406e1, 1.615858368580409e2, -1.556989798598866e2, 6.680131188771972e1,
         -1.328068155288572e1)
    c = (-7.784894002430293e-3, -3.223964580411365e-1, -2.400758277161838e0, -2.549732539343734e0,
         4.374664141464968e0, 2.938163982698783e0)
    d = (7.784695709041462e-3, 3.224671290700398e-1, 2.445134137142996e0, 3.754408661907416e0)
    if q < 0.02425 or q > 1 - 0.02425:
        t = np.sqrt(-2 * np.log(q if q < 0.5 else 1 - q))
        num = ((((c[0] * t + c[1]) * t + c[2]) * t + c[3]) * t + c[4]) * t + c[5]
        x = num / ((((d[0] * t + d[1]) * t + d[2]) * t + d[3]) * t + 1)
        return float(x if q < 0.5 else -x)
    r = q - 0.5
    t = r * r
    num = (((((a[0] * t + a[1]) * t + a[2]) * t + a[3]) * t + a[4]) * t + a[5]) * r
    return float(num / (((((b[0] * t + b[1]) * t + b[2]) * t + b[3]) * t + b[4]) * t + 1))


def mean_ci(scores: Sequence[float] | np.ndarray, binary: bool, n_boot: int = 2000, alpha: float = 0.05,
            seed: int = 0) -> tuple[float, float, float]:
    """Wilson for binary scores, percentile bootstrap otherwise."""
    return wilson_ci(scores, alpha) if binary else bootstrap_ci(scores, n_boot, alpha, seed)


def paired_bootstrap_diff(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, n_boot: int = 2000,
                          alpha: float = 0.05, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a - b with a CI from resampling example indices jointly (= bootstrapping the differences)."""
    x, y = _paired(a, b)
    return bootstrap_ci(x - y, n_boot=n_boot, alpha=alpha, seed=seed)


def _paired(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = _as_scores(a, "a"), _as_scores(b, "b")
    if x.size != y.size:
        raise TunesmithError(f"paired scores differ in length: {x.size} vs {y.size}",
                             "every candidate must be scored on the same examples")
    return x, y


def binom_two_sided(k: int, n: int) -> float:
    """Two-sided exact binomial test of k successes in n trials against p = 0.5."""
    if n == 0:
        return 1.0
    m = min(k, n - k)
    steps = np.arange(m)
    # log pmf(j+1) - log pmf(j) = log((n - j) / (j + 1)); start from log pmf(0) = -n log 2.
    log_pmf = -n * np.log(2.0) + np.concatenate([[0.0], np.cumsum(np.log(n - steps) - np.log(steps + 1))])
    top = log_pmf.max()
    cdf = np.exp(top) * np.exp(log_pmf - top).sum()
    return float(min(1.0, 2.0 * cdf))


def mcnemar_exact(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Two-sided exact McNemar test for paired 0/1 scores (binomial test on the discordant pairs)."""
    x, y = _paired(a, b)
    if not (np.isin(x, (0.0, 1.0)).all() and np.isin(y, (0.0, 1.0)).all()):
        raise TunesmithError("McNemar's test needs binary 0/1 scores", "use paired_pvalue(..., binary=False)")
    only_b = int(np.sum((x == 0) & (y == 1)))
    only_a = int(np.sum((x == 1) & (y == 0)))
    return binom_two_sided(only_a, only_a + only_b)


def sign_flip_pvalue(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, n_perm: int = 9999,
                     seed: int = 0) -> float:
    """Two-sided paired permutation test: under H0 each difference a_i - b_i is equally likely to flip sign.
    Exact enumeration for up to 16 non-zero differences, Monte Carlo with n_perm draws otherwise."""
    x, y = _paired(a, b)
    d = (x - y)[x != y]
    if d.size == 0:
        return 1.0
    observed = abs(d.sum()) * (1 - 1e-12)
    if d.size <= _EXACT_SIGN_FLIP_MAX_N:
        bits = (np.arange(2 ** d.size)[:, None] >> np.arange(d.size)) & 1
        return float(np.mean(np.abs((1 - 2 * bits) @ d) >= observed))
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK_CELLS // d.size)
    hits = 0
    for start in range(0, n_perm, rows):
        signs = rng.choice((-1.0, 1.0), size=(min(rows, n_perm - start), d.size))
        hits += int(np.sum(np.abs(signs @ d) >= observed))
    return (hits + 1) / (n_perm + 1)


def paired_pvalue(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, binary: bool,
                  seed: int = 0) -> float:
    return mcnemar_exact(a, b) if binary else sign_flip_pvalue(a, b, seed=seed)


@dataclass(frozen=True)
class Aggregate:
    name: str
    mean: float
    lo: float
    hi: float
    n: int


@dataclass(frozen=True)
class PairResult:
    tuned: str
    baseline: str
    diff: float  # mean of tuned - baseline, in metric units (fraction or nats)
    lo: float
    hi: float
    p: float
    n: int
    outcome: Outcome
    verdict: str


@dataclass(frozen=True)
class Comparison:
    metric: str
    unit: str
    binary: bool
    higher_is_better: bool
    alpha: float
    aggregates: dict[str, Aggregate]
    pairs: list[PairResult]

    def verdict(self) -> list[str]:
        return [pair.verdict for pair in self.pairs]

    def summary(self) -> list[str]:
        return [format_aggregate(agg, self.unit, self.alpha) for agg in self.aggregates.values()]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _scale(unit: str) -> tuple[float, int]:
    return (100.0, 1) if unit == "pts" else (1.0, 3)


def _num(value: float, unit: str, signed: bool) -> str:
    scale, digits = _scale(unit)
    rounded = round(value * scale, digits) + 0.0  # + 0.0 turns -0.0 into 0.0
    return f"{rounded:+.{digits}f}" if signed else f"{rounded:.{digits}f}"


def format_p(p: float) -> str:
    if p < 0.001:
        return "p < 0.001"
    return f"p = {p:.3f}" if p < 0.1 else f"p = {p:.2f}"


def _level(alpha: float) -> str:
    return f"{(1 - alpha) * 100:g}%"


def format_verdict(tuned: str, baseline: str, diff: float, lo: float, hi: float, p: float, n: int,
                   outcome: Outcome, unit: str, higher_is_better: bool, alpha: float = 0.05) -> str:
    stats = (f"{_level(alpha)} CI {_num(lo, unit, True)} \u2026 {_num(hi, unit, True)}, {format_p(p)}, n = {n}"
             + ("" if higher_is_better else "; lower is better"))
    by = f"{_num(diff, unit, True)} {unit}"
    if outcome == "win":
        return f"{tuned} beats {baseline} by {by} ({stats})"
    if outcome == "worse":
        return f"{tuned} is WORSE than {baseline} by {by} ({stats})"
    return f"{tuned} does NOT beat {baseline} ({by}, {stats}): no significant difference"


def format_aggregate(agg: Aggregate, unit: str, alpha: float = 0.05) -> str:
    scale, digits = _scale(unit)
    shown = "%" if unit == "pts" else " nats"
    return (f"{agg.name}: {agg.mean * scale:.{digits}f}{shown} ({_level(alpha)} CI {agg.lo * scale:.{digits}f} "
            f"\u2026 {agg.hi * scale:.{digits}f}, n = {agg.n})")


def _outcome(lo: float, hi: float, p: float, higher_is_better: bool, alpha: float) -> Outcome:
    if p >= alpha:
        return "no_difference"
    better_side = lo > 0 if higher_is_better else hi < 0
    worse_side = hi < 0 if higher_is_better else lo > 0
    return "win" if better_side else "worse" if worse_side else "no_difference"


def compare(candidates: Mapping[str, Sequence[float]], tuned: Sequence[str], baselines: Sequence[str],
            metric: MetricInfo, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0,
            pairs: Sequence[tuple[str, str]] | None = None) -> Comparison:
    """Aggregate every candidate and test every (tuned, baseline) pair on the same examples; `pairs` (when
    given) lists the (tuned, baseline) pairs to test instead, e.g. each stage of a run against the one before."""
    wanted = list(pairs) if pairs is not None else [(t, b) for t in tuned for b in baselines]
    for name in {*tuned, *baselines, *(n for pair in wanted for n in pair)}:
        if name not in candidates:
            raise TunesmithError(f"no scores for candidate '{name}'", f"scored: {', '.join(candidates)}")
    if set(tuned) & set(baselines):
        raise TunesmithError(f"candidates both tuned and baseline: {sorted(set(tuned) & set(baselines))}")
    arrays = {name: _as_scores(s, f"{metric.name} scores of {name}") for name, s in candidates.items()}
    lengths = {name: x.size for name, x in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise TunesmithError(f"candidates were scored on different numbers of examples: {lengths}")
    aggregates = {name: Aggregate(name, *mean_ci(x, metric.binary, n_boot, alpha, seed), n=x.size)
                  for name, x in arrays.items()}
    results = [compare_pair(arrays[t], arrays[b], t, b, metric, n_boot, alpha, seed) for t, b in wanted]
    return Comparison(metric.name, metric.unit, metric.binary, metric.higher_is_better, alpha, aggregates, results)


def compare_pair(a: np.ndarray, b: np.ndarray, tuned: str, baseline: str, metric: MetricInfo, n_boot: int = 2000,
                 alpha: float = 0.05, seed: int = 0) -> PairResult:
    diff, lo, hi = paired_bootstrap_diff(a, b, n_boot, alpha, seed)
    p = paired_pvalue(a, b, metric.binary, seed)
    outcome = _outcome(lo, hi, p, metric.higher_is_better, alpha)
    verdict = format_verdict(tuned, baseline, diff, lo, hi, p, a.size, outcome, metric.unit,
                             metric.higher_is_better, alpha)
    return PairResult(tuned, baseline, diff, lo, hi, p, a.size, outcome, verdict)


def require_win(comparison: Comparison | Sequence[Comparison]) -> tuple[bool, list[str]]:
    """ok only when every tuned candidate significantly beats every baseline on every given metric;
    reasons are the verdicts of the pairs that did not."""
    comparisons = [comparison] if isinstance(comparison, Comparison) else list(comparison)
    pairs = [(c.metric, pair) for c in comparisons for pair in c.pairs]
    if not pairs:
        return False, ["nothing to compare: need at least one tuned candidate and one baseline"]
    multi = len(comparisons) > 1
    reasons = [f"[{metric}] {pair.verdict}" if multi else pair.verdict
               for metric, pair in pairs if pair.outcome != "win"]
    return not reasons, reasons
