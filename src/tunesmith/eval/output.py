"""What an eval leaves behind and prints: results.json and the reports per data set, and the console verdicts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape

from .report import write_report

if TYPE_CHECKING:
    from .run import EvalResult, SetResult


def judge_notes(res: SetResult) -> list[str]:
    return [r.summary(t, b) for (t, b), r in res.judge.items()]


def write_outputs(result: EvalResult, out: Path, base_spec: str) -> None:
    """results.json, report.md and report.html in `out`, and in `out/regression` for a regression set."""
    notes = judge_notes(result.main)
    reg = result.regression
    if reg is not None:
        notes += [f"regression set ({reg.results['n']} examples, see regression/report.md): {v}"
                  for v in reg.verdicts()]
        reg_notes = ["Regression set: what the fine-tune broke. Each tuned run against the plain base model.",
                     *judge_notes(reg)]
        _write_set(reg, out / "regression", reg_notes, {"base_model": base_spec})
    _write_set(result.main, out, notes, {"base_model": base_spec, "won": result.won, "reasons": result.reasons})


def _write_set(res: SetResult, where: Path, notes: list[str], extra: dict[str, Any]) -> None:
    write_json(where / "results.json", {**res.results, **extra})
    write_report(where, res.comparisons, res.results, notes)


def write_json(path: Path, obj: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def print_outcome(result: EvalResult, console: Console) -> None:
    """Scores, one verdict line per (tuned, baseline) pair, and a plain statement of the outcome. Lines are
    never wrapped, so CI logs can be grepped."""
    def say(text: str, style: str | None = None) -> None:
        console.print(escape(text), style=style, soft_wrap=True, highlight=False)

    for c in result.main.comparisons:
        say(f"{c.metric} ({'higher' if c.higher_is_better else 'lower'} is better)", "bold")
        for line in c.summary():
            say(f"  {line}")
        for p in c.pairs:
            say(f"  {p.verdict}", {"win": "green", "worse": "red"}.get(p.outcome, "yellow"))
    for note in judge_notes(result.main):
        say(f"  {note}")
    if result.regression is not None:
        say("regression set (what the fine-tune broke)", "bold")
        for line in result.regression.verdicts():
            say(f"  {line}", "red" if " is WORSE than " in line else None)
    if not result.main.tuned:
        say("no tuned candidate: nothing was tested against the baselines", "yellow")
    elif result.won:
        say("The fine-tune wins: every tuned candidate significantly beats every baseline on every metric.",
            "bold green")
    else:
        say(f"The fine-tune does NOT win: {len(result.reasons)} comparison(s) are not significant wins.",
            "bold red")


