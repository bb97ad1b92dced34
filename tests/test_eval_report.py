import json
import re
from xml.etree import ElementTree

import pytest

from tunesmith.errors import TunesmithError
from tunesmith.eval.metrics import parse_metric, score_all
from tunesmith.eval.report import EvalExample, bar_chart_svg, worst_failures, write_report, write_results
from tunesmith.eval.stats import compare

EXAMPLES = [
    EvalExample("What is 2+2?", "4"),
    EvalExample("Capital of France?", "Paris"),
    {"prompt": "Say <script>alert(1)</script>", "reference": "<script>alert(1)</script>"},
    EvalExample("Color of the sky?", "blue"),
    EvalExample("Code please", "```x```"),
]
OUTPUTS = {
    "base": ["4", "Lyon", "no", "Blue", "nah"],
    "base+fewshot:5": ["5", "Paris", "<b>bold</b>", "green", "nope"],
    "runs/x": ["4", "Paris.", "<script>alert(2)</script>", "grey", "```x``` and ````"],
}


@pytest.fixture
def evaluated(tmp_path):
    exact = parse_metric("exact")
    refs = [e.reference if isinstance(e, EvalExample) else e["reference"] for e in EXAMPLES]
    scores = {"exact": {c: score_all(exact, outs, refs) for c, outs in OUTPUTS.items()},
              "loss": {c: [0.5, 1.0, float("inf"), 2.0, 0.1] for c in OUTPUTS}}
    results = write_results(tmp_path / "eval" / "results.json", EXAMPLES, list(OUTPUTS), scores, OUTPUTS)
    comparison = compare(scores["exact"], ["runs/x"], ["base", "base+fewshot:5"], exact, n_boot=200)
    return tmp_path, results, comparison


def test_results_json(evaluated):
    tmp_path, results, _ = evaluated
    on_disk = json.loads((tmp_path / "eval" / "results.json").read_text(encoding="utf-8"))
    assert on_disk == results
    assert on_disk["candidates"] == ["base", "base+fewshot:5", "runs/x"] and on_disk["n"] == 5
    row = on_disk["examples"][1]
    assert (row["prompt"], row["reference"]) == ("Capital of France?", "Paris")
    assert row["outputs"] == {"base": "Lyon", "base+fewshot:5": "Paris", "runs/x": "Paris."}
    assert row["scores"]["exact"] == {"base": 0.0, "base+fewshot:5": 1.0, "runs/x": 1.0}
    assert on_disk["examples"][2]["scores"]["loss"]["base"] is None  # infinite NLL is stored as null


def test_results_length_mismatch(tmp_path):
    with pytest.raises(TunesmithError, match="outputs of base: 1 texts for 2 examples"):
        write_results(tmp_path / "r.json", EXAMPLES[:2], ["base"], {}, {"base": ["x"]})


def test_worst_failures_puts_baseline_wins_first(evaluated):
    _, results, comparison = evaluated
    failures = worst_failures(comparison, results, "runs/x")
    # runs/x is wrong on 2 (both baselines wrong too), 3 (base right: "Blue"), 4 (all wrong)
    assert [row["index"] for row in failures] == [3, 2, 4]
    assert [row["index"] for row in worst_failures(comparison, results, "runs/x", limit=1)] == [3]


def test_report_files(evaluated):
    tmp_path, results, comparison = evaluated
    md_path, html_path = write_report(tmp_path / "eval", comparison, results, notes=["judge: 60% win"])
    md, html = md_path.read_text(encoding="utf-8"), html_path.read_text(encoding="utf-8")
    for verdict in comparison.verdict():
        assert verdict in md
    assert "## Worst failures of runs/x (exact)" in md and "judge: 60% win" in md
    assert "### Example 3" in md and "### Example 1" not in md
    assert "`````text\n```x``` and ````\n`````" in md  # fence longer than any backtick run inside
    assert "<script>" not in html
    assert "&lt;script&gt;alert(2)&lt;/script&gt;" in html and "&lt;b&gt;bold&lt;/b&gt;" in html
    assert html.count('<rect class="bar"') == 3
    assert html.count('class="ci"') == 3
    table = html[html.index("<table>"):html.index("</table>")]
    assert table.count("<tr>") == 1 + 3  # header + the three failures of runs/x
    assert "Capital of France?" not in table


def test_chart_bar_heights_follow_the_means(evaluated):
    _, _, comparison = evaluated
    svg = bar_chart_svg(comparison, tuned=["runs/x"])
    root = ElementTree.fromstring(svg)  # well-formed XML
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    heights = [float(h) for h in re.findall(r'<rect class="bar" x="[\d.]+" y="[\d.]+" width="70" height="([\d.]+)"', svg)]
    means = [agg.mean for agg in comparison.aggregates.values()]
    assert len(heights) == 3
    assert heights == pytest.approx([180 * m for m in means], abs=0.06)
    assert svg.count('fill="#2b7bb9"') == 1  # only the tuned candidate is highlighted


def test_loss_chart_and_multi_metric_report(tmp_path):
    loss = parse_metric("loss")
    scores = {"base": [2.0, 2.2, 1.8], "runs/x": [1.0, 1.1, 0.9]}
    c = compare(scores, ["runs/x"], ["base"], loss, n_boot=100)
    results = write_results(tmp_path / "results.json", EXAMPLES[:3], ["base", "runs/x"], {"loss": scores},
                            {"base": ["a", "b", "c"]})
    assert results["examples"][0]["outputs"]["runs/x"] is None
    md_path, html_path = write_report(tmp_path, [c], results)
    html = html_path.read_text(encoding="utf-8")
    assert html.count('<rect class="bar"') == 2 and "lower is better" in html
    assert "1.000" in html  # runs/x mean NLL drawn with nats precision
    assert "(no output)" in md_path.read_text(encoding="utf-8")
