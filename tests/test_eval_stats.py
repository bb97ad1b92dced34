import re

import numpy as np
import pytest
from scipy import stats as sps

from tunesmith.errors import TunesmithError
from tunesmith.eval.metrics import parse_metric
from tunesmith.eval.stats import (
    binom_two_sided,
    bootstrap_ci,
    compare,
    format_p,
    format_verdict,
    mcnemar_exact,
    paired_bootstrap_diff,
    paired_pvalue,
    require_win,
    sign_flip_pvalue,
)

EXACT = parse_metric("exact")
LOSS = parse_metric("loss")


def test_bootstrap_ci_covers_true_mean_at_nominal_rate():
    rng = np.random.default_rng(123)
    p, n, reps = 0.3, 120, 300
    covered = 0
    for rep in range(reps):
        _, lo, hi = bootstrap_ci(rng.random(n) < p, n_boot=1000, seed=rep)
        covered += lo <= p <= hi
    assert 0.91 <= covered / reps <= 0.98


def test_bootstrap_ci_close_to_normal_approximation():
    x = np.r_[np.ones(300), np.zeros(700)]
    mean, lo, hi = bootstrap_ci(x, n_boot=4000)
    half = 1.96 * np.sqrt(0.3 * 0.7 / 1000)
    assert mean == 0.3
    assert lo == pytest.approx(0.3 - half, abs=0.006)
    assert hi == pytest.approx(0.3 + half, abs=0.006)
    assert bootstrap_ci(x, seed=7) == bootstrap_ci(x, seed=7)


def test_bootstrap_large_input_is_chunked_and_correct():
    x = np.random.default_rng(0).random(50_000)
    mean, lo, hi = bootstrap_ci(x, n_boot=200)
    se = x.std() / np.sqrt(x.size)
    assert lo < mean < hi and hi - lo == pytest.approx(2 * 1.96 * se, rel=0.25)


def test_paired_bootstrap_is_narrower_than_unpaired_for_correlated_scores():
    rng = np.random.default_rng(1)
    base = rng.random(200)
    tuned = base + 0.05 + 0.01 * rng.standard_normal(200)
    diff, lo, hi = paired_bootstrap_diff(tuned, base)
    assert diff == pytest.approx(np.mean(tuned - base))
    assert lo < diff < hi
    assert hi - lo < 0.01  # paired: the shared per-example variation cancels
    _, lo_t, hi_t = bootstrap_ci(tuned)
    assert hi_t - lo_t > 5 * (hi - lo)
    const = paired_bootstrap_diff(base + 0.1, base)
    assert const == pytest.approx((0.1, 0.1, 0.1))


def _table(only_a, only_b, both=5, neither=5):
    a = [1] * only_a + [0] * only_b + [1] * both + [0] * neither
    b = [0] * only_a + [1] * only_b + [1] * both + [0] * neither
    return a, b


@pytest.mark.parametrize("only_a, only_b", [(3, 7), (10, 10), (0, 5), (1, 20), (25, 40), (200, 260), (3000, 3150)])
def test_mcnemar_matches_scipy_binomtest(only_a, only_b):
    a, b = _table(only_a, only_b)
    expected = sps.binomtest(only_a, only_a + only_b, 0.5).pvalue
    assert mcnemar_exact(a, b) == pytest.approx(expected, rel=1e-9, abs=1e-300)
    assert mcnemar_exact(b, a) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_mcnemar_by_hand():
    assert mcnemar_exact(*_table(0, 5)) == pytest.approx(2 / 32)
    assert mcnemar_exact(*_table(0, 0)) == 1.0
    assert binom_two_sided(1, 3) == 1.0
    assert binom_two_sided(0, 1) == 1.0
    with pytest.raises(TunesmithError, match="binary"):
        mcnemar_exact([0.5, 1], [0, 1])


def test_sign_flip_exact_by_hand():
    # differences 1, 2, 3: of the 8 sign patterns, |sum| >= 6 for 2 of them
    assert sign_flip_pvalue([1, 2, 3, 7], [0, 0, 0, 7]) == pytest.approx(0.25)
    assert sign_flip_pvalue([1, 1], [1, 1]) == 1.0


def _scipy_paired_perm(a, b, n_resamples):
    res = sps.permutation_test((np.asarray(a), np.asarray(b)), lambda x, y, axis: np.mean(x - y, axis=axis),
                               permutation_type="samples", n_resamples=n_resamples, vectorized=True,
                               random_state=0)
    return res.pvalue


def test_sign_flip_matches_scipy_permutation_test():
    rng = np.random.default_rng(5)
    a, b = rng.random(12), rng.random(12) - 0.2
    assert sign_flip_pvalue(a, b) == pytest.approx(_scipy_paired_perm(a, b, 10**6), rel=1e-9)  # both exact
    a, b = rng.random(60), rng.random(60) - 0.08
    assert sign_flip_pvalue(a, b, n_perm=20000) == pytest.approx(_scipy_paired_perm(a, b, 20000), abs=0.02)


def test_paired_pvalue_dispatch():
    a, b = _table(12, 3)
    assert paired_pvalue(a, b, binary=True) == mcnemar_exact(a, b)
    assert paired_pvalue(a, b, binary=False) == sign_flip_pvalue(a, b)


def test_verdict_golden_strings():
    win = format_verdict("runs/x", "base+fewshot:5", 0.412, 0.379, 0.445, 2e-5, 500, "win", "pts", True)
    assert win == "runs/x beats base+fewshot:5 by +41.2 pts (95% CI +37.9 \u2026 +44.5, p < 0.001, n = 500)"
    same = format_verdict("runs/x", "base", 0.02, -0.1, 0.14, 0.41, 50, "no_difference", "pts", True)
    assert same == ("runs/x does NOT beat base (+2.0 pts, 95% CI -10.0 \u2026 +14.0, p = 0.41, n = 50): "
                    "no significant difference")
    worse = format_verdict("runs/x", "base", -0.2, -0.3, -0.1, 0.0042, 80, "worse", "pts", True)
    assert worse == "runs/x is WORSE than base by -20.0 pts (95% CI -30.0 \u2026 -10.0, p = 0.004, n = 80)"
    loss = format_verdict("runs/x", "base", -0.4123, -0.45, -0.38, 1e-9, 500, "win", "nats", False)
    assert loss == ("runs/x beats base by -0.412 nats (95% CI -0.450 \u2026 -0.380, p < 0.001, n = 500; "
                    "lower is better)")
    zero = format_verdict("a", "b", -0.0001, -0.02, 0.01, 1.0, 10, "no_difference", "pts", True, alpha=0.1)
    assert zero == "a does NOT beat b (+0.0 pts, 90% CI -2.0 \u2026 +1.0, p = 1.00, n = 10): no significant difference"
    assert format_p(0.0499) == "p = 0.050" and format_p(0.2) == "p = 0.20"


def test_compare_planted_win_passes_require_win():
    n = 200
    tuned = [1.0] * 180 + [0.0] * 20  # 0.9 accuracy
    base = [1.0] * 40 + [0.0] * 160  # 0.2 accuracy
    c = compare({"base": base, "runs/x": tuned}, tuned=["runs/x"], baselines=["base"], metric=EXACT)
    assert c.aggregates["runs/x"].mean == pytest.approx(0.9)
    assert c.aggregates["base"].n == n
    (pair,) = c.pairs
    assert pair.outcome == "win"
    assert pair.diff == pytest.approx(0.7)
    assert pair.p == pytest.approx(sps.binomtest(140, 140, 0.5).pvalue)
    assert pair.lo > 0.6 and pair.hi < 0.8
    assert re.fullmatch(r"runs/x beats base by \+70\.0 pts \(95% CI \+6\d\.\d \u2026 \+7\d\.\d, p < 0\.001, n = 200\)",
                        c.verdict()[0])
    assert require_win(c) == (True, [])
    assert c.summary()[1].startswith("runs/x: 90.0% (95% CI ")
    assert c.to_dict()["pairs"][0]["outcome"] == "win"


def test_require_win_fails_for_identical_scores():
    scores = [1.0, 0.0] * 50
    c = compare({"base": scores, "base-again": list(scores)}, ["base-again"], ["base"], EXACT)
    ok, reasons = require_win(c)
    assert not ok
    assert reasons == ["base-again does NOT beat base (+0.0 pts, 95% CI +0.0 \u2026 +0.0, p = 1.00, n = 100): "
                       "no significant difference"]


def test_compare_worse_and_multiple_pairs():
    good = [1.0] * 90 + [0.0] * 10
    bad = [1.0] * 30 + [0.0] * 70
    c = compare({"base": good, "fewshot": good, "tuned": bad}, ["tuned"], ["base", "fewshot"], EXACT)
    assert [p.outcome for p in c.pairs] == ["worse", "worse"]
    assert c.verdict()[1].startswith("tuned is WORSE than fewshot by -60.0 pts")
    ok, reasons = require_win([c, c])
    assert not ok and len(reasons) == 4 and reasons[0].startswith("[exact] tuned is WORSE")


def test_compare_loss_lower_is_better():
    rng = np.random.default_rng(3)
    base = 2.0 + 0.3 * rng.standard_normal(100)
    tuned = base - 0.4 + 0.05 * rng.standard_normal(100)
    c = compare({"base": base, "runs/x": tuned}, ["runs/x"], ["base"], LOSS)
    (pair,) = c.pairs
    assert pair.outcome == "win" and pair.hi < 0
    assert pair.verdict.startswith(f"runs/x beats base by {np.mean(tuned - base):+.3f} nats (95% CI ")
    assert pair.verdict.endswith("n = 100; lower is better)")
    assert require_win(c)[0]
    reverse = compare({"base": tuned, "runs/x": base}, ["runs/x"], ["base"], LOSS)
    assert reverse.pairs[0].outcome == "worse"


def test_compare_errors():
    with pytest.raises(TunesmithError, match="different numbers of examples"):
        compare({"a": [1, 0], "b": [1]}, ["a"], ["b"], EXACT)
    with pytest.raises(TunesmithError, match="no scores for candidate 'c'"):
        compare({"a": [1], "b": [1]}, ["c"], ["b"], EXACT)
    with pytest.raises(TunesmithError, match="NaN"):
        compare({"a": [float("nan")], "b": [1]}, ["a"], ["b"], LOSS)
    with pytest.raises(TunesmithError, match="non-empty"):
        bootstrap_ci([])
    assert require_win(compare({"a": [1.0]}, ["a"], [], EXACT))[0] is False


@pytest.mark.parametrize("k, n", [(0, 12), (12, 12), (3, 10), (87, 200), (1, 1), (500, 1000)])
def test_wilson_interval_matches_scipy(k, n):
    from tunesmith.eval.stats import wilson_ci

    mean, lo, hi = wilson_ci([1] * k + [0] * (n - k))
    ci = sps.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert mean == k / n
    assert lo == pytest.approx(ci.low, abs=1e-9) and hi == pytest.approx(ci.high, abs=1e-9)


def test_binary_aggregates_use_wilson_so_zero_is_not_an_empty_interval():
    zeros, ones = [0.0] * 20, [1.0] * 20
    comparison = compare({"tuned": ones, "base": zeros}, ["tuned"], ["base"], EXACT)
    base = comparison.aggregates["base"]
    assert (base.mean, base.lo) == (0.0, 0.0) and base.hi == pytest.approx(0.1611, abs=1e-4)
    assert "base: 0.0% (95% CI 0.0 … 16.1, n = 20)" in comparison.summary()
    tuned = comparison.aggregates["tuned"]
    assert tuned.lo == pytest.approx(0.8389, abs=1e-4) and tuned.hi == 1.0
    with pytest.raises(TunesmithError, match="binary"):
        from tunesmith.eval.stats import wilson_ci

        wilson_ci([0.5, 1.0])


def test_explicit_pairs_compare_a_stage_with_the_stage_before():
    rng = np.random.default_rng(3)
    sft = (rng.random(300) < 0.7).astype(float)
    dpo = sft.copy()
    dpo[:60] = 0.0  # the second stage broke 60 examples the first got right or wrong
    comparison = compare({"sft": sft, "dpo": dpo, "base": np.zeros(300)}, ["sft", "dpo"], ["base"], EXACT,
                         pairs=[("sft", "base"), ("dpo", "sft"), ("dpo", "base")])
    assert [(p.tuned, p.baseline) for p in comparison.pairs] == [("sft", "base"), ("dpo", "sft"), ("dpo", "base")]
    assert comparison.pairs[1].outcome == "worse" and "dpo is WORSE than sft" in comparison.pairs[1].verdict
