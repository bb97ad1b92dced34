"""A run's training report: `report.html` (inline SVG line charts, no plotting library) and `report.md`
(a summary table), both written from the run's metrics.jsonl and run.json."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from .rundir import read_metrics

CHARTS: list[tuple[str, list[str]]] = [
    ("Loss", ["loss", "eval_loss"]),
    ("Reward margin (chosen − rejected)", ["rewards/margins", "eval_rewards/margins"]),
    ("Reward accuracy", ["rewards/accuracies", "eval_rewards/accuracies"]),
    ("Rewards", ["rewards/chosen", "rewards/rejected", "rewards/signed"]),
    ("KL estimate (KTO z0; GRPO: to the reference)", ["kl", "eval_kl"]),
    ("Reward (GRPO)", ["reward", "eval_reward"]),
    ("Reward std within groups (GRPO)", ["reward_std", "zero_std_groups"]),
    ("Completion length (GRPO)", ["completion_length", "eval_completion_length"]),
    ("Clipped tokens (GRPO)", ["clip_fraction", "clip_low", "clip_high"]),
    ("Tokens/s: sampling and training (GRPO)", ["gen_tokens_per_s", "train_tokens_per_s"]),
    ("Learning rate", ["lr"]),
]
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
W, H, PAD_L, PAD_R, PAD_T, PAD_B = 640, 240, 64, 16, 28, 36


def series(records: list[dict], name: str) -> list[tuple[float, float]]:
    """(step, value) points of one metric, finite values only."""
    out = []
    for r in records:
        v = r.get(name)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and "step" in r:
            out.append((float(r["step"]), float(v)))
    return out


def _fmt(v: float) -> str:
    return f"{v:.3g}" if v == 0 or 1e-3 <= abs(v) < 1e4 else f"{v:.2e}"


def svg_chart(title: str, lines: dict[str, list[tuple[float, float]]]) -> str:
    """One line chart: a polyline per series (a dot where a series has one point), min/max axis labels."""
    pts = [p for ps in lines.values() for p in ps]
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - (abs(y0) or 1) * 0.05, y1 + (abs(y1) or 1) * 0.05

    def sx(x: float) -> float:
        return PAD_L + (x - x0) / (x1 - x0) * (W - PAD_L - PAD_R)

    def sy(y: float) -> float:
        return H - PAD_B - (y - y0) / (y1 - y0) * (H - PAD_T - PAD_B)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
             f'role="img" aria-label="{html.escape(title)}">',
             f'<text x="{PAD_L}" y="18" font-size="14" font-weight="bold">{html.escape(title)}</text>',
             f'<rect x="{PAD_L}" y="{PAD_T}" width="{W - PAD_L - PAD_R}" height="{H - PAD_T - PAD_B}" '
             'fill="none" stroke="#999"/>']
    for k in range(5):
        y = y0 + (y1 - y0) * k / 4
        parts.append(f'<line x1="{PAD_L}" x2="{W - PAD_R}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{PAD_L - 4}" y="{sy(y) + 4:.1f}" font-size="10" text-anchor="end">{_fmt(y)}</text>')
    for x, anchor in ((x0, "start"), (x1, "end")):
        parts.append(f'<text x="{sx(x):.1f}" y="{H - PAD_B + 14}" font-size="10" text-anchor="{anchor}">'
                     f'{_fmt(x)}</text>')
    parts.append(f'<text x="{(W + PAD_L) / 2:.0f}" y="{H - 6}" font-size="10" text-anchor="middle">step</text>')
    for i, (name, ps) in enumerate(lines.items()):
        colour = COLOURS[i % len(COLOURS)]
        if len(ps) == 1:
            parts.append(f'<circle cx="{sx(ps[0][0]):.1f}" cy="{sy(ps[0][1]):.1f}" r="3" fill="{colour}"/>')
        else:
            coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in ps)
            parts.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        lx = PAD_L + 8 + 150 * i
        parts.append(f'<text x="{lx}" y="{PAD_T + 14}" font-size="11" fill="{colour}">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def summary_rows(records: list[dict]) -> list[tuple[str, float, float, float, float]]:
    """(metric, first, last, min, max) for every charted metric that was logged."""
    rows = []
    per_function = sorted({k for r in records for k in r if k.startswith(("reward/", "eval_reward/"))})
    for _, names in CHARTS + [("", per_function), ("", ["logp_gap"])]:
        for name in dict.fromkeys(names):
            ps = series(records, name)
            if ps:
                values = [v for _, v in ps]
                rows.append((name, values[0], values[-1], min(values), max(values)))
    return rows


def write_run_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write report.html and report.md into the run folder; returns their paths."""
    run_dir = Path(run_dir)
    records = [r for r in read_metrics(run_dir) if "step" in r]
    info_path = run_dir / "run.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    title = f"{info.get('name', run_dir.name)} — {info.get('method', '?')}"
    charts = []
    per_function = sorted({k for r in records for k in r if k.startswith(("reward/", "eval_reward/"))})
    for chart_title, names in CHARTS + [("Reward per function (GRPO, unweighted)", per_function)]:
        lines = {n: series(records, n) for n in names}
        lines = {n: ps for n, ps in lines.items() if ps}
        if lines:
            charts.append(svg_chart(chart_title, lines))
    rows = summary_rows(records)
    facts = _facts(info, records)
    html_path, md_path = run_dir / "report.html", run_dir / "report.md"
    html_path.write_text(_html(title, facts, rows, charts), encoding="utf-8")
    md_path.write_text(_markdown(title, facts, rows), encoding="utf-8")
    return html_path, md_path


def _facts(info: dict, records: list[dict]) -> list[tuple[str, str]]:
    facts = [("steps", str(len(records))), ("model", str(info.get("model", "?"))),
             ("adapter", str(info.get("adapter_kind", "?")))]
    if info.get("wall_time_s") is not None:
        facts.append(("wall time", f"{info['wall_time_s']} s"))
    ref = info.get("reference")
    if ref:
        facts.append(("reference log-probs", "live (computed each step)" if not ref.get("key") else
                      f"{ref['key'][:16]}… ({'cache hit' if ref.get('cache_hit') else 'computed'})"))
    for warning in info.get("warnings") or []:
        facts.append(("warning", warning))
    skipped = sum(1 for r in records if r.get("skipped"))
    if skipped:
        facts.append(("skipped steps (non-finite)", str(skipped)))
    return facts


def _markdown(title: str, facts: list[tuple[str, str]], rows: list) -> str:
    lines = [f"# Training report: {title}", ""]
    lines += [f"- {k}: {v}" for k, v in facts]
    lines += ["", "| metric | first | last | min | max |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {_fmt(a)} | {_fmt(b)} | {_fmt(c)} | {_fmt(d)} |" for n, a, b, c, d in rows]
    if not rows:
        lines.append("| (no steps logged) | | | | |")
    lines += ["", "Charts: report.html. Reward metrics are per pair (KTO: per example; GRPO: per "
              "completion), averaged over each step."]
    return "\n".join(lines) + "\n"


def _html(title: str, facts: list[tuple[str, str]], rows: list, charts: list[str]) -> str:
    esc = html.escape
    fact_items = "".join(f"<li>{esc(k)}: {esc(v)}</li>" for k, v in facts)
    table = "".join(f"<tr><td>{esc(n)}</td><td>{_fmt(a)}</td><td>{_fmt(b)}</td><td>{_fmt(c)}</td>"
                    f"<td>{_fmt(d)}</td></tr>" for n, a, b, c, d in rows)
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{esc(title)}</title>"
            "<style>body{font-family:sans-serif;max-width:700px;margin:2em auto}"
            "td,th{padding:2px 8px;text-align:right}td:first-child{text-align:left}</style></head><body>"
            f"<h1>Training report: {esc(title)}</h1><ul>{fact_items}</ul>"
            "<table><tr><th>metric</th><th>first</th><th>last</th><th>min</th><th>max</th></tr>"
            f"{table}</table>\n" + "\n".join(f"<div>{c}</div>" for c in charts) + "\n</body></html>\n")
