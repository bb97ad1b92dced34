"""The training phase's progress: a rich bar with loss, tokens/s and ETA in a terminal; in a log (CI), a line
every 10 s, at the first and last step and at every eval (the other phases: tunesmith/console.py)."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from ..console import duration, make_console


class TrainProgress:
    def __init__(self, total: int, console: Console | None = None, enabled: bool = True, label: str = "train"):
        self.console = console or make_console()
        self.enabled = enabled
        self.total = total
        self.label = label if label == "train" else f"train {label}"  # the method's name: "train sft"
        self.live = enabled and self.console.is_terminal
        self._last_print = 0.0
        self._started = time.monotonic()
        self._eval = ""
        self.bar = None
        if self.live:
            wide = self.console.width >= 110  # an 80-column terminal gets a shorter bar and no elapsed time
            columns = [TextColumn(f"[bold]{self.label}"), BarColumn(bar_width=40 if wide else 12),
                       MofNCompleteColumn(), TextColumn("{task.fields[info]}")]
            columns += [TimeElapsedColumn()] if wide else []
            # ETA from the run's own step times: rich's estimate needs several steps within 30 s
            self.bar = Progress(*columns, TextColumn("eta {task.fields[eta]}"), console=self.console,
                                transient=False)
            self.task = self.bar.add_task(self.label, total=total, info="", eta="…")

    def __enter__(self):
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def update(self, record: dict, tokens_per_s: float, eta_s: float) -> None:
        if not self.enabled:
            return
        info = f"loss {record['loss']:.4f}  {tokens_per_s:,.0f} tok/s" + rollout_info(record)
        if "eval_loss" in record:
            self._eval = f"  eval {record['eval_loss']:.4f}"
        if self.bar is not None:  # the last eval loss stays in view until the next one
            self.bar.update(self.task, completed=record["step"], info=info + self._eval, eta=duration(eta_s))
            return
        info = f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {tokens_per_s:,.0f} tok/s"
        info += rollout_info(record)
        if "eval_loss" in record:
            info += self._eval
        now = time.monotonic()
        if now - self._last_print > 10 or record["step"] in (1, self.total) or "eval_loss" in record:
            self._last_print = now
            elapsed = duration(time.monotonic() - self._started)
            eta = f"  eta {duration(eta_s)}" if record["step"] < self.total else ""
            self.console.print(f"{self.label}: step {record['step']}/{self.total}  {info}  {elapsed} elapsed{eta}",
                               highlight=False, markup=False)


# what an online method's step measured, in the order shown: (metric, label, format)
ROLLOUT_FIELDS = [("reward", "reward", ".3f"), ("reward_std", "std", ".3f"), ("kl", "kl", ".4f"),
                  ("clip_fraction", "clip", ".3f"), ("completion_length", "len", ".1f"),
                  ("gen_tokens_per_s", "gen", ",.0f"), ("train_tokens_per_s", "train", ",.0f")]


def rollout_info(record: dict) -> str:
    """The sampled answers' reward (total and per function), spread, KL, clipping, length and the speeds of
    sampling and training (tok/s) — for a step of an online method; empty for the others."""
    if "reward" not in record:
        return ""
    parts = [f"{label} {record[k]:{fmt}}" for k, label, fmt in ROLLOUT_FIELDS if k in record]
    per = [f"{k.split('/', 1)[1]} {v:.2f}" for k, v in sorted(record.items()) if k.startswith("reward/")]
    return "  " + "  ".join(parts[:1] + ([f"({', '.join(per)})"] if per else []) + parts[1:])
