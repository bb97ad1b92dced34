"""What an eval leaves behind and prints: results.json and the reports per data set, and the console verdicts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape

from .cost import format_seconds, format_usd
from .report import write_report

if TYPE_CHECKING:
    from .run import EvalResult, SetResult


def judge_notes(res: SetResult) -> list[str]:
    return [r.summary(t, b) for (t, b), r in res.judge.items()]


def write_outputs(result: EvalResult, out: Path, base_spec: str) -> None:
    """results.json, report.md and report.html in `out`, and in `out/regression` for a regression set."""
    notes = judge_notes(result.main) + cut_off_lines(result.main)
    reg = result.regression
    if reg is not None:
        notes += [f"regression set ({reg.results['n']} examples, see regression/report.md): {v}"
                  for v in reg.verdicts()]
        reg_notes = ["Regression set: what the fine-tune broke. Each tuned run against the plain base model.",
                     *judge_notes(reg)]
        _write_set(reg, out / "regression", reg_notes, {"base_model": base_spec})
    _write_set(result.main, out, notes, {"base_model": base_spec, "won": result.won, "reasons": result.reasons,
                                         "worth_it": result.worth_it, "outcome": outcome_line(result)})


def _write_set(res: SetResult, where: Path, notes: list[str], extra: dict[str, Any]) -> None:
    write_json(where / "results.json", {**res.results, **extra})
    write_report(where, res.comparisons, res.results, notes)


def write_json(path: Path, obj: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def ladder_lines(res: SetResult) -> list[str]:
    """The ladder as aligned text rows, cheapest rung first."""
    if not res.ladder:
        return []
    unit = res.comparisons[0].unit
    scale, digits = (100.0, 1) if unit == "pts" else (1.0, 3)
    shown = "%" if unit == "pts" else ""
    rows = [("rung", f"{res.comparisons[0].metric} (95% CI)", "$/1k queries", "cached", "p50", "p95", "cut off")]
    for r in res.ladder:
        rows.append((r.name + (" *" if r.tuned else ""),
                     f"{r.mean * scale:.{digits}f}{shown} ({r.lo * scale:.{digits}f}\u2026{r.hi * scale:.{digits}f})",
                     format_usd(r.usd_per_1k), format_usd(r.usd_per_1k_cached), format_seconds(r.latency_p50),
                     format_seconds(r.latency_p95), str(r.cut_off)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def cut_off_lines(res: SetResult) -> list[str]:
    limit = res.results.get("max_new_tokens")
    return [f"{u.cut_off} of {u.n} answers of {name} stopped at max_new_tokens ({limit}): they may be cut off"
            for name, u in res.usage.items() if u.cut_off]


def outcome_line(result: EvalResult) -> str:
    """The last line: whether the fine-tune won, and against what."""
    main = result.main
    if not main.tuned:
        return "no tuned candidate: nothing was tested against the baselines"
    against = ", ".join(dict.fromkeys(p.baseline for c in main.comparisons for p in c.pairs))
    if result.won:
        return f"The fine-tune wins: every tuned candidate significantly beats {against} on every metric."
    lost = sorted({f"{p.tuned} vs {p.baseline}" for c in main.comparisons for p in c.pairs if p.outcome != "win"})
    return (f"The fine-tune does NOT win: {len(result.reasons)} comparison(s) are not significant wins "
            f"({'; '.join(lost)}).")


def print_outcome(result: EvalResult, console: Console) -> None:
    """Scores, one verdict line per (tuned, baseline) pair, the ladder with costs, the worth verdict, and a
    plain statement of the outcome. Lines are never wrapped, so CI logs can be grepped."""
    def say(text: str, style: str | None = None) -> None:
        console.print(escape(text), style=style, soft_wrap=True, highlight=False)

    main = result.main
    for c in main.comparisons:
        say(f"{c.metric} ({'higher' if c.higher_is_better else 'lower'} is better)", "bold")
        for line in c.summary():
            say(f"  {line}")
        for p in c.pairs:
            say(f"  {p.verdict}", {"win": "green", "worse": "red"}.get(p.outcome, "yellow"))
    for note in judge_notes(main):
        say(f"  {note}")
    lines = ladder_lines(main)
    if lines:
        say("ladder (cheapest first; * = fine-tuned)", "bold")
        for line in lines:
            say(f"  {line}")
    for line in cut_off_lines(main):
        say(f"warning: {line}", "yellow")
    if result.regression is not None:
        say("regression set (what the fine-tune broke)", "bold")
        for line in result.regression.verdicts():
            say(f"  {line}", "red" if " is WORSE than " in line else None)
    if main.worth is not None:
        for note in main.worth.close:
            say(f"note: {note}", "yellow")
        say(main.worth.line, "bold green" if main.worth.worth_it else "bold red")
    say(outcome_line(result), "bold" if not main.tuned else "bold green" if result.won else "bold red")
