"""Eval artifacts: results.json (every example, output and score) and report.md / report.html (the ladder of
rungs with cost and latency, the worth verdict, a bar chart with CI error bars, a chart of score against cost
per 1,000 queries, what the fine-tune fixed and broke, and its worst failures next to the baselines' outputs).
The reports are rendered from results.json alone. The HTML is self-contained: inline CSS and SVG, no scripts,
every user string escaped."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from tunesmith.errors import TunesmithError
from tunesmith.eval.cost import format_seconds, format_usd
from tunesmith.eval.stats import Comparison, format_aggregate

MAX_SHOWN_CHARS = 2000
MAX_FLIPS_SHOWN = 10


@dataclass(frozen=True)
class EvalExample:
    prompt: str
    reference: str


def _prompt_reference(example: EvalExample | Mapping[str, Any]) -> tuple[str, str]:
    if isinstance(example, Mapping):
        return str(example["prompt"]), str(example["reference"])
    return example.prompt, example.reference


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def build_results(examples: Sequence[EvalExample | Mapping[str, Any]], candidates: Sequence[str],
                  scores: Mapping[str, Mapping[str, Sequence[float]]],
                  outputs: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """scores: metric -> candidate -> per-example score; outputs: candidate -> per-example text (a
    candidate scored only by log-probs may have no outputs)."""
    n = len(examples)
    for metric, by_candidate in scores.items():
        for name, values in by_candidate.items():
            if len(values) != n:
                raise TunesmithError(f"{metric} scores of {name}: {len(values)} values for {n} examples")
    for name, texts in outputs.items():
        if len(texts) != n:
            raise TunesmithError(f"outputs of {name}: {len(texts)} texts for {n} examples")
    rows = []
    for i, example in enumerate(examples):
        prompt, reference = _prompt_reference(example)
        rows.append({
            "index": i, "prompt": prompt, "reference": reference,
            "outputs": {c: outputs[c][i] if c in outputs else None for c in candidates},
            "scores": {m: {c: _finite_or_none(s[c][i]) for c in candidates if c in s} for m, s in scores.items()},
        })
    return {"candidates": list(candidates), "metrics": list(scores), "n": n, "examples": rows}


def write_results(path: str | Path, examples: Sequence[EvalExample | Mapping[str, Any]], candidates: Sequence[str],
                  scores: Mapping[str, Mapping[str, Sequence[float]]],
                  outputs: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    results = build_results(examples, candidates, scores, outputs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=1, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return results


def worst_failures(comparison: Comparison, results: Mapping[str, Any], tuned: str,
                   limit: int = 10) -> list[dict[str, Any]]:
    """Examples where `tuned` is wrong (binary: 0; fraction: < 1; loss: any), those where a baseline did
    better first, then by the tuned score, worst first."""
    sign = 1.0 if comparison.higher_is_better else -1.0
    baselines = [p.baseline for p in comparison.pairs if p.tuned == tuned]
    ranked = []
    for row in results["examples"]:
        by_candidate = row["scores"].get(comparison.metric, {})
        mine = by_candidate.get(tuned)
        if mine is None or (comparison.unit == "pts" and mine >= 1.0):
            continue
        gaps = [sign * (by_candidate[b] - mine) for b in baselines if by_candidate.get(b) is not None]
        ranked.append((-max(gaps, default=0.0), sign * mine, row["index"], row))
    ranked.sort(key=lambda item: item[:3])
    return [row for *_, row in ranked[:limit]]


def _clip(text: str | None) -> str:
    if text is None:
        return "(no output)"
    return text if len(text) <= MAX_SHOWN_CHARS else text[:MAX_SHOWN_CHARS] + f"\u2026 [{len(text)} chars]"


def _tuned_names(comparisons: Sequence[Comparison]) -> list[str]:
    return list(dict.fromkeys(p.tuned for c in comparisons for p in c.pairs))


def _md_block(text: str) -> str:
    fence = "`" * max(3, _longest_backtick_run(text) + 1)
    return f"{fence}text\n{text}\n{fence}"


def _longest_backtick_run(text: str) -> int:
    longest = run = 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    return longest


def _score_text(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if unit != "pts" else f"{value:g}"


def _scaled(value: float, unit: str) -> str:
    return f"{value * 100:.1f}%" if unit == "pts" else f"{value:.3f}"


def ladder_rows(results: Mapping[str, Any], unit: str) -> list[list[str]]:
    """Header and one row per rung (cheapest first) from results.json's ladder and usage."""
    usage = results.get("usage") or {}
    rows = [["rung", "score (95% CI)", "$ / 1k queries", "with prompt cache", "latency p50 / p95",
             "prompt tokens (cacheable)", "new tokens", "cut off", "ran on"]]
    for r in results.get("ladder") or []:
        u = usage.get(r["name"], {})
        tokens = "n/a" if u.get("prompt_tokens") is None else (
            f"{u['prompt_tokens']:.0f} ({u.get('cacheable_tokens') or 0:.0f})")
        rows.append([r["name"] + (" (fine-tuned)" if r["tuned"] else ""),
                     f"{_scaled(r['mean'], unit)} ({_scaled(r['lo'], unit)} \u2026 {_scaled(r['hi'], unit)})",
                     format_usd(r["usd_per_1k"]), format_usd(r["usd_per_1k_cached"]),
                     f"{format_seconds(r['latency_p50'])} / {format_seconds(r['latency_p95'])}", tokens,
                     "n/a" if u.get("new_tokens") is None else f"{u['new_tokens']:.1f}", str(r["cut_off"]),
                     r["ran_on"] + (f" [{u['note']}]" if u.get("note") else "")])
    return rows


def flip_rows(results: Mapping[str, Any], which: str) -> list[Mapping[str, Any]]:
    worth = results.get("worth") or {}
    return [results["examples"][i] for i in (worth.get(which) or [])[:MAX_FLIPS_SHOWN]]


def _md_table(rows: Sequence[Sequence[str]]) -> list[str]:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(cell(c) for c in rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return out + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows[1:]]


def _md_ladder(comparisons: Sequence[Comparison], results: Mapping[str, Any]) -> list[str]:
    if not results.get("ladder"):
        return []
    lines = [f"## The ladder ({comparisons[0].metric}, cheapest first)", ""]
    lines += _md_table(ladder_rows(results, comparisons[0].unit)) + [""]
    worth = results.get("worth")
    if worth:
        lines += [f"**{worth['line']}**", ""] + [f"- {note}" for note in worth["close"]] + [""]
        lines += _md_flips(results, worth)
    return lines


def _md_flips(results: Mapping[str, Any], worth: Mapping[str, Any]) -> list[str]:
    t, b = worth["tuned"], worth["baseline"]
    lines = [f"## What {t} fixed and broke against {b}", "",
             f"{len(worth['fixed'])} fixed (right after fine-tuning, wrong before), {len(worth['broke'])} broken "
             f"(the other way round).", ""]
    for title, which in (("Fixed", "fixed"), ("Broken", "broke")):
        rows = flip_rows(results, which)
        if rows:
            lines += [f"### {title}", ""]
            table = [["#", "prompt", "reference", b, t]]
            table += [[str(r["index"]), _clip(r["prompt"])[-200:], _clip(r["reference"])[:200],
                       _clip(r["outputs"].get(b))[:200], _clip(r["outputs"].get(t))[:200]] for r in rows]
            lines += _md_table(table) + [""]
    return lines


def field_tables(results: Mapping[str, Any]) -> list[tuple[str, list[list[str]]]]:
    """json_fields: per candidate, each field's precision, recall, F1 and support."""
    out = []
    for metric, by in (results.get("metric_details") or {}).items():
        for name, details in by.items():
            fields = details.get("per_field") if isinstance(details, dict) else None
            if fields:
                rows = [["field", "precision", "recall", "F1", "support"]]
                rows += [[k, f"{v['precision']:.3f}", f"{v['recall']:.3f}", f"{v['f1']:.3f}", str(v["support"])]
                         for k, v in fields.items()]
                out.append((f"{metric}: fields of {name}", rows))
    return out


def _md_fields(results: Mapping[str, Any]) -> list[str]:
    lines = []
    for title, rows in field_tables(results):
        lines += [f"## {title}", ""] + _md_table(rows) + [""]
    return lines


def render_markdown(comparisons: Sequence[Comparison], results: Mapping[str, Any], notes: Sequence[str] = (),
                    max_failures: int = 10) -> str:
    lines = [f"# Eval report ({results['n']} examples)", ""]
    lines += _md_ladder(comparisons, results)
    for c in comparisons:
        direction = "higher is better" if c.higher_is_better else "lower is better"
        lines += [f"## {c.metric} ({direction})", ""]
        lines += [f"- {line}" for line in c.summary()] + [""]
        lines += [f"- **{p.verdict}**" if p.outcome == "win" else f"- {p.verdict}" for p in c.pairs]
        lines.append("")
    lines += _md_fields(results)
    if notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    for tuned in _tuned_names(comparisons[:1]):
        primary = comparisons[0]
        failures = worst_failures(primary, results, tuned, max_failures)
        lines += [f"## Worst failures of {tuned} ({primary.metric})", ""]
        if not failures:
            lines += ["None.", ""]
        for row in failures:
            lines += [f"### Example {row['index']}", "", "**Prompt**", "", _md_block(_clip(row["prompt"])), "",
                      "**Reference**", "", _md_block(_clip(row["reference"])), ""]
            for name, output in row["outputs"].items():
                score = _score_text(row["scores"][primary.metric].get(name), primary.unit)
                lines += [f"**{name}** (score {score})", "", _md_block(_clip(output)), ""]
    return "\n".join(lines)


def bar_chart_svg(comparison: Comparison, tuned: Sequence[str] = ()) -> str:
    """One bar per candidate (mean) with its bootstrap CI as an error bar; y axis from 0."""
    aggs = list(comparison.aggregates.values())
    scale = 100.0 if comparison.unit == "pts" else 1.0
    top = 100.0 if comparison.unit == "pts" else max([a.hi * scale for a in aggs] + [1e-9]) * 1.1
    width, height, left, bottom, plot_h, slot = 80 + 110 * len(aggs), 260, 50, 60, 180, 110

    def y(value: float) -> float:
        return bottom + plot_h - plot_h * max(0.0, min(value * scale, top)) / top

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 20}" '
             f'role="img" aria-label="{escape(comparison.metric)} by candidate">',
             f'<line x1="{left}" y1="{bottom + plot_h}" x2="{width - 10}" y2="{bottom + plot_h}" stroke="#444"/>']
    for tick in (0.0, 0.5, 1.0):
        ty = bottom + plot_h - plot_h * tick
        label = f"{tick * top:.0f}" if comparison.unit == "pts" else f"{tick * top:.2f}"
        parts.append(f'<text x="{left - 6}" y="{ty + 4:.1f}" text-anchor="end" font-size="11">{label}</text>')
    for i, agg in enumerate(aggs):
        x = left + 20 + i * slot
        cx = x + 35
        fill = "#2b7bb9" if agg.name in tuned else "#9aa5b1"
        value = f"{agg.mean * scale:.1f}" if comparison.unit == "pts" else f"{agg.mean:.3f}"
        parts += [
            f'<rect class="bar" x="{x}" y="{y(agg.mean):.1f}" width="70" height="{bottom + plot_h - y(agg.mean):.1f}" '
            f'fill="{fill}"><title>{escape(format_aggregate(agg, comparison.unit, comparison.alpha))}</title></rect>',
            f'<line class="ci" x1="{cx}" y1="{y(agg.lo):.1f}" x2="{cx}" y2="{y(agg.hi):.1f}" stroke="#111"/>',
            f'<line x1="{cx - 8}" y1="{y(agg.lo):.1f}" x2="{cx + 8}" y2="{y(agg.lo):.1f}" stroke="#111"/>',
            f'<line x1="{cx - 8}" y1="{y(agg.hi):.1f}" x2="{cx + 8}" y2="{y(agg.hi):.1f}" stroke="#111"/>',
            f'<text x="{cx}" y="{y(agg.hi) - 6:.1f}" text-anchor="middle" font-size="11">{value}</text>',
            f'<text x="{cx}" y="{bottom + plot_h + 16}" text-anchor="middle" font-size="11">'
            f'{escape(agg.name[:18])}</text>',
        ]
    parts.append("</svg>")
    return "\n".join(parts)


def cost_chart_svg(ladder: Sequence[Mapping[str, Any]], unit: str, metric: str) -> str:
    """Score (with its CI) against dollars per 1,000 queries on a log scale, one point per priced rung;
    "" when fewer than one rung has a price. Fine-tuned rungs are blue."""
    points = [r for r in ladder if r.get("usd_per_1k")]
    if not points:
        return ""
    scale = 100.0 if unit == "pts" else 1.0
    lows, highs = [math.log10(r["usd_per_1k"]) for r in points], [r["hi"] * scale for r in points]
    x0, x1 = math.floor(min(lows)), math.ceil(max(lows))
    x1 = x1 if x1 > x0 else x0 + 1
    top = 100.0 if unit == "pts" else max(highs + [1e-9]) * 1.1
    width, height, left, right, top_px, plot_h = 860, 320, 60, 240, 20, 240
    plot_w = width - left - right

    def px(usd: float) -> float:
        return left + plot_w * (math.log10(usd) - x0) / (x1 - x0)

    def py(value: float) -> float:
        return top_px + plot_h - plot_h * max(0.0, min(value * scale, top)) / top

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 30}" role="img" '
             f'aria-label="{escape(metric)} against cost per 1,000 queries">',
             f'<line x1="{left}" y1="{top_px + plot_h}" x2="{width - right}" y2="{top_px + plot_h}" stroke="#444"/>',
             f'<line x1="{left}" y1="{top_px}" x2="{left}" y2="{top_px + plot_h}" stroke="#444"/>']
    for e in range(x0, x1 + 1):
        x = left + plot_w * (e - x0) / (x1 - x0)
        parts.append(f'<text x="{x:.1f}" y="{top_px + plot_h + 16}" text-anchor="middle" font-size="11">'
                     f'{escape(format_usd(10.0 ** e))}</text>')
    for tick in (0.0, 0.5, 1.0):
        label = f"{tick * top:.0f}" if unit == "pts" else f"{tick * top:.2f}"
        ty = top_px + plot_h - plot_h * tick
        parts.append(f'<text x="{left - 6}" y="{ty + 4:.1f}" text-anchor="end" font-size="11">{label}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height + 22}" text-anchor="middle" font-size="12">'
                 f'$ per 1,000 queries (log scale)</text>')
    ordered = sorted(points, key=lambda r: r["usd_per_1k"])
    anchors = [(px(r["usd_per_1k"]), py(r["mean"])) for r in ordered]
    marks = [(x - 5, py(r["hi"]) - 5, x + 5, py(r["lo"]) + 5) for r, (x, _) in zip(ordered, anchors, strict=True)]
    labels = place_labels(anchors, [r["name"][:40] for r in ordered], top_px, top_px + plot_h - 2, marks)
    for r, (x, y), (lx, ly) in zip(ordered, anchors, labels, strict=True):
        fill = "#2b7bb9" if r["tuned"] else "#9aa5b1"
        parts += [f'<line class="ci" x1="{x:.1f}" y1="{py(r["lo"]):.1f}" x2="{x:.1f}" y2="{py(r["hi"]):.1f}" '
                  f'stroke="#111"/>',
                  f'<circle class="rung" cx="{x:.1f}" cy="{y:.1f}" r="5" fill="{fill}">'
                  f'<title>{escape(r["name"])}: {_scaled(r["mean"], unit)}, {format_usd(r["usd_per_1k"])} per 1k'
                  f'</title></circle>']
        if abs(ly - 4 - y) > LABEL_H:  # a label moved away from its point gets a leader line
            parts.append(f'<line x1="{x + 4:.1f}" y1="{y:.1f}" x2="{lx - 1:.1f}" y2="{ly - 4:.1f}" '
                         'stroke="#bbb"/>')
        parts.append(f'<text class="label" x="{lx:.1f}" y="{ly:.1f}" font-size="11">{escape(r["name"][:40])}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


LABEL_H, CHAR_W = 13.0, 6.6  # a label's line height and (generous) character width at font-size 11, in px


def place_labels(anchors: Sequence[tuple[float, float]], texts: Sequence[str], y_min: float, y_max: float,
                 marks: Sequence[tuple[float, float, float, float]] = ()) -> list[tuple[float, float]]:
    """Text baselines (x, y) for labels right of their points, each moved up or down by whole lines until its
    box overlaps no label placed before it and no mark (the points and their intervals, as boxes); points in
    cost order, so close rungs are placed in turn. Labels stay between y_min and y_max."""
    boxes: list[tuple[float, float, float, float]] = list(marks)
    out = []
    for (x, y), text in zip(anchors, texts, strict=True):
        x0, x1 = x + 8, x + 8 + CHAR_W * len(text)
        base = y + 4
        for step in range(0, 41):
            shift = LABEL_H * ((step + 1) // 2) * (1 if step % 2 else -1) if step else 0.0
            cand = min(max(base + shift, y_min + LABEL_H), y_max)
            box = (x0, cand - LABEL_H + 2, x1, cand + 2)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in boxes):
                break
        boxes.append(box)
        out.append((x0, cand))
    return out


def _html_table(rows: Sequence[Sequence[str]], pre: bool = False, cls: str = "") -> str:
    head = "".join(f"<th>{escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{_pre(c) if pre else escape(c)}</td>" for c in row) + "</tr>"
                   for row in rows[1:])
    return f'<table class="{cls}"><tr>{head}</tr>{body}</table>' if cls else f"<table><tr>{head}</tr>{body}</table>"


def _html_ladder(comparisons: Sequence[Comparison], results: Mapping[str, Any]) -> list[str]:
    if not results.get("ladder"):
        return []
    c = comparisons[0]
    body = [f"<h2>The ladder ({escape(c.metric)}, cheapest first)</h2>",
            _html_table(ladder_rows(results, c.unit), cls="ladder"),
            cost_chart_svg(results["ladder"], c.unit, c.metric)]
    worth = results.get("worth")
    if worth:
        body.append(f'<p class="{"win" if worth["worth_it"] else "worse"}">{escape(worth["line"])}</p>')
        body += ["<ul>"] + [f"<li>{escape(n)}</li>" for n in worth["close"]] + ["</ul>"]
        t, b = worth["tuned"], worth["baseline"]
        body.append(f"<h2>What {escape(t)} fixed and broke against {escape(b)}</h2><p>{len(worth['fixed'])} fixed, "
                    f"{len(worth['broke'])} broken.</p>")
        for title, which in (("Fixed", "fixed"), ("Broken", "broke")):
            rows = flip_rows(results, which)
            if rows:
                table = [["#", "prompt", "reference", b, t]]
                table += [[str(r["index"]), r["prompt"], r["reference"], r["outputs"].get(b) or "",
                           r["outputs"].get(t) or ""] for r in rows]
                body += [f"<h3>{title}</h3>", _html_table(table, pre=True)]
    return body


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#111}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}
pre{white-space:pre-wrap;word-break:break-word;margin:0;font-size:12px;max-width:40em}
.win{color:#11691f;font-weight:bold}.worse{color:#a11}
.ladder td{white-space:nowrap}.ladder td:last-child{white-space:normal}"""


def _pre(text: str | None) -> str:
    return f"<pre>{escape(_clip(text))}</pre>"


def render_html(comparisons: Sequence[Comparison], results: Mapping[str, Any], notes: Sequence[str] = (),
                max_failures: int = 10) -> str:
    tuned = _tuned_names(comparisons)
    body = [f"<h1>Eval report ({results['n']} examples)</h1>"]
    body += _html_ladder(comparisons, results)
    for c in comparisons:
        direction = "higher is better" if c.higher_is_better else "lower is better"
        body += [f"<h2>{escape(c.metric)} ({direction})</h2>", bar_chart_svg(c, tuned), "<ul>"]
        body += [f"<li>{escape(line)}</li>" for line in c.summary()] + ["</ul><ul>"]
        body += [f'<li class="{p.outcome}">{escape(p.verdict)}</li>' for p in c.pairs] + ["</ul>"]
    for title, rows in field_tables(results):
        body += [f"<h2>{escape(title)}</h2>", _html_table(rows)]
    if notes:
        body += ["<h2>Notes</h2><ul>"] + [f"<li>{escape(n)}</li>" for n in notes] + ["</ul>"]
    for name in _tuned_names(comparisons[:1]):
        primary = comparisons[0]
        failures = worst_failures(primary, results, name, max_failures)
        body.append(f"<h2>Worst failures of {escape(name)} ({escape(primary.metric)})</h2>")
        if not failures:
            body.append("<p>None.</p>")
            continue
        heads = "".join(f"<th>{escape(c)}</th>" for c in results["candidates"])
        body.append(f"<table><tr><th>#</th><th>prompt</th><th>reference</th>{heads}</tr>")
        for row in failures:
            cells = "".join(
                f"<td>{_pre(row['outputs'].get(c))}<small>score "
                f"{_score_text(row['scores'][primary.metric].get(c), primary.unit)}</small></td>"
                for c in results["candidates"])
            body.append(f"<tr><td>{row['index']}</td><td>{_pre(row['prompt'])}</td>"
                        f"<td>{_pre(row['reference'])}</td>{cells}</tr>")
        body.append("</table>")
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>tunesmith eval report</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(out_dir: str | Path, comparison: Comparison | Sequence[Comparison], results: Mapping[str, Any],
                 notes: Sequence[str] = (), max_failures: int = 10) -> tuple[Path, Path]:
    """Write report.md and report.html into out_dir; the first comparison's metric picks the failures."""
    comparisons = [comparison] if isinstance(comparison, Comparison) else list(comparison)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, html = out / "report.md", out / "report.html"
    md.write_text(render_markdown(comparisons, results, notes, max_failures), encoding="utf-8")
    html.write_text(render_html(comparisons, results, notes, max_failures), encoding="utf-8")
    return md, html
