"""Cost per 1,000 queries (by hand), the price table and its overrides, the ladder's order, the worth verdict,
per-example flips, and the score-vs-cost chart."""

from __future__ import annotations

import re

import numpy as np
import pytest

from tunesmith.errors import TunesmithError
from tunesmith.eval.answers import Answer
from tunesmith.eval.cost import device_rate, endpoint_usage, local_usage
from tunesmith.eval.ladder import close_notes, flips, ladder, worth
from tunesmith.eval.metrics import parse_metric
from tunesmith.eval.report import cost_chart_svg, place_labels
from tunesmith.eval.stats import compare
from tunesmith.prices import load_prices

EXACT = parse_metric("exact")
PRICES = {"devices": {"cpu": {"hourly_usd": 3.6, "price_read": "2025-06"}, "h100-80gb": {"hourly_usd": 2.0},
                      "h100-pcie-80gb": {"hourly_usd": 1.5}, "a100-40gb": {"hourly_usd": 1.2},
                      "a10-24gb": {"hourly_usd": 0.9}, "a100-80gb": {"hourly_usd": 1.4}},
          "models": {"big": {"input": 2.5, "cached_input": 1.25, "output": 10.0, "price_read": "2025-06"}}}


def test_local_cost_is_device_price_times_machine_time():
    answers = [Answer("x", 100, 5, i == 0, seconds=2.0, machine_seconds=0.5) for i in range(4)]
    u = local_usage("base", "tiny (fp32, cpu)", answers, cacheable=60.0, rate=device_rate(PRICES, None, "cpu"))
    # 0.5 s of a $3.60/h machine per query = $0.0005; per 1,000 queries $0.50
    assert u.usd_per_1k == pytest.approx(0.5) and u.usd_per_1k_cached == pytest.approx(0.5)
    assert (u.n, u.prompt_tokens, u.cacheable_tokens, u.new_tokens, u.cut_off) == (4, 100, 60.0, 5, 1)
    assert (u.latency_p50, u.latency_p95, u.seconds) == (2.0, 2.0, 2.0)
    assert "cpu $3.6/h (2025-06)" == u.price


def test_endpoint_cost_from_token_prices_with_and_without_the_prompt_cache():
    answers = [Answer("x", 1000, 10, False, seconds=s, cached_tokens=600) for s in (0.1, 0.2, 0.3, 0.4, 1.0)]
    u = endpoint_usage("http://h/v1#big", "http://h/v1", "big", answers, 2.0, None, None, PRICES)
    assert u.usd_per_1k == pytest.approx((1000 * 2.5 + 10 * 10) / 1e6 * 1000)  # $2.60
    assert u.usd_per_1k_cached == pytest.approx((400 * 2.5 + 600 * 1.25 + 10 * 10) / 1e6 * 1000)  # $1.85
    assert u.latency_p50 == pytest.approx(0.3) and u.latency_p95 == pytest.approx(0.88)
    # no cached count from the server: the shared-prefix share measured locally (250 of 500 tokens)
    plain = [Answer("x", 1000, 10, False, seconds=0.1) for _ in range(3)]
    u = endpoint_usage("e", "http://h/v1", "big", plain, 0.3, 500.0, 250.0, PRICES)
    assert u.cacheable_tokens == pytest.approx(500.0)
    assert u.usd_per_1k_cached == pytest.approx((500 * 2.5 + 500 * 1.25 + 100) / 1e6 * 1000)
    # a server that reports 0 cached tokens (e.g. prompts under its caching minimum) cached none: no estimate
    none_cached = [Answer("x", 1000, 10, False, seconds=0.1, cached_tokens=0) for _ in range(3)]
    u = endpoint_usage("e", "http://h/v1", "big", none_cached, 0.3, 500.0, 250.0, PRICES)
    assert u.cacheable_tokens == 0 and u.usd_per_1k_cached == pytest.approx(u.usd_per_1k)
    unknown = endpoint_usage("e", "http://h/v1", "nope", plain, 0.3, 500.0, 250.0, PRICES)
    assert unknown.usd_per_1k is None and "no price for model 'nope'" in unknown.note


def test_device_rate_picks_the_machine_and_names_unknown_devices():
    assert device_rate(PRICES, None, "cpu")[0] == 3.6
    assert device_rate(PRICES, None, "cuda", "NVIDIA H100 80GB HBM3")[0] == 2.0
    assert device_rate(PRICES, None, "cuda", "NVIDIA H100 PCIe")[0] == 1.5
    assert device_rate(PRICES, None, "cuda", "NVIDIA A100-SXM4-80GB")[0] == 1.4
    assert device_rate(PRICES, None, "cuda", "NVIDIA A100-PCIE-40GB")[0] == 1.2
    assert device_rate(PRICES, None, "cuda", "NVIDIA A10")[0] == 0.9
    assert device_rate(PRICES, "a100-80gb", "cpu")[0] == 1.4  # --device-price NAME wins
    assert device_rate(PRICES, None, "cuda", "Tesla T4") is None
    with pytest.raises(TunesmithError, match="no hourly price for device 'tpu'"):
        device_rate(PRICES, "tpu", "cpu")


def test_shipped_price_table_is_dated_and_sourced_and_can_be_overridden(tmp_path):
    table = load_prices()
    assert table["devices"]["cpu"]["hourly_usd"] > 0
    for section in ("devices", "models"):
        for name, entry in table[section].items():
            assert entry.get("price_read") and "https://" in str(entry.get("price_source", "")), name
    for entry in table["models"].values():
        assert entry["cached_input"] <= entry["input"] and entry["output"] > 0
    mine = tmp_path / "prices.yaml"
    mine.write_text("models:\n  gpt-4o: {input: 1.0, cached_input: 0.5, output: 2.0, price_read: 2026-01, price_source: mine}\n"
                    "  my-model: {input: 0.1, output: 0.2}\n")
    merged = load_prices(mine)
    assert merged["models"]["gpt-4o"]["input"] == 1.0 and "my-model" in merged["models"]
    assert merged["models"]["gpt-4o-mini"] == table["models"]["gpt-4o-mini"]  # the rest is kept
    (tmp_path / "bad.yaml").write_text("modles: {}\n")
    with pytest.raises(TunesmithError, match="unknown section"):
        load_prices(tmp_path / "bad.yaml")


def _usage(name, usd, seconds=1.0):
    return local_usage(name, "m", [Answer("x", 10, 2, False, 0.1, None, seconds)], None,
                       (usd * 3600 / seconds / 1000, "p") if usd is not None else None)


def _scores(seed=0, n=300):
    rng = np.random.default_rng(seed)
    truth = rng.random(n)
    return {"tuned": (truth < 0.9).astype(float), "base+rag:5": (truth < 0.6).astype(float),
            "base": np.zeros(n), "http://h/v1#big": (truth < 0.62).astype(float)}


def test_ladder_is_cheapest_first_and_the_verdict_says_against_what():
    scores = _scores()
    usage = {"tuned": _usage("tuned", 0.05), "base+rag:5": _usage("base+rag:5", 0.2), "base": _usage("base", 0.04),
             "http://h/v1#big": _usage("http://h/v1#big", 5.0)}
    comparison = compare(scores, ["tuned"], ["base+rag:5", "base", "http://h/v1#big"], EXACT)
    rungs = ladder(comparison, usage, ["tuned"])
    assert [r.name for r in rungs] == ["base", "tuned", "base+rag:5", "http://h/v1#big"]
    assert rungs[1].tuned and rungs[1].usd_per_1k == pytest.approx(0.05)
    w = worth(comparison, scores, ["tuned"], ["base+rag:5", "base", "http://h/v1#big"], usage, ["http://h/v1#big"])
    assert w.worth_it and (w.tuned, w.baseline) == ("tuned", "http://h/v1#big")  # the best rung without it
    diff = 100 * (scores["tuned"].mean() - scores["http://h/v1#big"].mean())
    assert w.line.startswith(f"fine-tuning is worth it: tuned scores +{diff:.1f} pts over the best rung without "
                             "it (http://h/v1#big), 95% CI +")
    assert "at 100x lower cost per query than http://h/v1#big ($0.05 vs $5.00 per 1k queries)" in w.line


def test_not_worth_it_when_the_best_rung_is_within_the_interval():
    rng = np.random.default_rng(5)
    truth = rng.random(80)
    scores = {"tuned": (truth < 0.70).astype(float), "base+rag:5": (truth < 0.68).astype(float)}
    comparison = compare(scores, ["tuned"], ["base+rag:5"], EXACT)
    usage = {n: _usage(n, 0.1) for n in scores}
    w = worth(comparison, scores, ["tuned"], ["base+rag:5"], usage)
    diff = 100 * (scores["tuned"].mean() - scores["base+rag:5"].mean())
    assert not w.worth_it and 0 < diff < 5
    assert w.line.startswith(f"fine-tuning is not worth it: base+rag:5 is within the interval of tuned (+{diff:.1f} "
                             "pts, 95% CI")
    assert w.line.endswith("at no training cost")
    assert w.close == [f"base+rag:5 comes close to tuned: -{diff:.1f} pts (95% CI -{100 * w.pair.hi:.1f} … "
                       f"{round(-100 * w.pair.lo, 1) + 0.0:+.1f})"]
    assert w.fixed == list(np.flatnonzero(scores["tuned"] > scores["base+rag:5"])) and w.broke == []


def test_close_notes_say_when_a_baseline_is_ahead_or_better():
    truth = np.random.default_rng(7).random(200)
    scores = {"tuned": (truth < 0.50).astype(float), "base+rag:5": ((truth >= 0.03) & (truth < 0.55)).astype(float),
              "http://h/v1#big": (truth < 0.90).astype(float), "base": (truth < 0.10).astype(float)}
    baselines = ["base+rag:5", "http://h/v1#big", "base"]
    comparison = compare(scores, ["tuned"], baselines, EXACT)
    arrays = {n: np.asarray(v) for n, v in scores.items()}
    rag, big = (100 * (scores[n].mean() - scores["tuned"].mean()) for n in ("base+rag:5", "http://h/v1#big"))
    notes = close_notes(comparison, arrays, "tuned", baselines)
    assert len(notes) == 2  # base is far behind: no note
    assert notes[0].startswith(f"base+rag:5 is ahead of tuned: +{rag:.1f} pts (95% CI ")
    assert notes[1].startswith(f"http://h/v1#big is better than tuned: +{big:.1f} pts (95% CI +")
    loss = parse_metric("loss")
    lower = {"tuned": 1.0 + truth, "base": 0.5 + truth}  # the baseline's loss is lower: better
    c = compare(lower, ["tuned"], ["base"], loss)
    assert close_notes(c, lower, "tuned", ["base"])[0].startswith("base is better than tuned: -0.500 nats")


def test_flips_by_hand():
    tuned, baseline = np.array([1, 1, 0, 0, 1.0]), np.array([0, 1, 1, 0, 0.0])
    assert flips(tuned, baseline) == ([0, 4], [2])
    assert flips(np.array([0.2, 0.9]), np.array([0.5, 0.5]), higher_is_better=False) == ([0], [1])


def test_cost_chart_puts_rungs_on_a_log_axis():
    rungs = [{"name": "cheap", "tuned": True, "mean": 0.9, "lo": 0.8, "hi": 0.95, "usd_per_1k": 0.1},
             {"name": "mid", "tuned": False, "mean": 0.5, "lo": 0.4, "hi": 0.6, "usd_per_1k": 1.0},
             {"name": "dear", "tuned": False, "mean": 0.8, "lo": 0.7, "hi": 0.9, "usd_per_1k": 10.0},
             {"name": "free", "tuned": False, "mean": 0.1, "lo": 0.0, "hi": 0.2, "usd_per_1k": None}]
    svg = cost_chart_svg(rungs, "pts", "exact")
    xs = [float(x) for x in re.findall(r'<circle class="rung" cx="([\d.]+)"', svg)]
    assert len(xs) == 3  # the unpriced rung is not plotted
    assert xs[1] - xs[0] == pytest.approx(xs[2] - xs[1])  # a decade is a decade
    ys = [float(y) for y in re.findall(r'<circle class="rung" cx="[\d.]+" cy="([\d.]+)"', svg)]
    assert ys[0] < ys[2] < ys[1]  # higher score, higher on the page
    assert "log scale" in svg and "<script" not in svg
    assert cost_chart_svg(rungs[3:], "pts", "exact") == ""


def test_cost_chart_labels_of_close_rungs_do_not_overlap():
    names = ["base+fewshot:5", "tuned", "base", "base+labels", "base+rag:5"]
    rungs = [{"name": n, "tuned": n == "tuned", "mean": 0.0, "lo": 0.0, "hi": 0.19, "usd_per_1k": usd}
             for n, usd in zip(names, [0.0433, 0.05, 0.0572, 0.0614, 0.109], strict=True)]
    svg = cost_chart_svg(rungs, "pts", "exact")
    labels = re.findall(r'<text class="label" x="([\d.]+)" y="([\d.]+)" font-size="11">([^<]+)</text>', svg)
    assert [t for _, _, t in labels] == names
    boxes = [(float(x), float(y) - 11, float(x) + 6 * len(t), float(y) + 2) for x, y, t in labels]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)
    assert place_labels([(10.0, 50.0)], ["x"], 0.0, 300.0) == [(18.0, 54.0)]  # alone: beside its point
