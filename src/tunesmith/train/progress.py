"""Progress display: a rich bar in a terminal, plain periodic lines otherwise (CI logs)."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class TrainProgress:
    def __init__(self, total: int, console: Console | None = None, enabled: bool = True, label: str = "train"):
        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self.total = total
        self.label = label
        self.live = enabled and self.console.is_terminal
        self._last_print = 0.0
        self.bar = None
        if self.live:
            self.bar = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=self.console,
                                transient=False)
            self.task = self.bar.add_task(label, total=total, info="")

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
        info = f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {tokens_per_s:,.0f} tok/s"
        if "reward" in record:  # online methods: what the sampled answers earned this step
            info += f"  reward {record['reward']:.3f}"
        if "eval_loss" in record:
            info += f"  eval {record['eval_loss']:.4f}"
        if self.bar is not None:
            self.bar.update(self.task, completed=record["step"], info=info)
            return
        now = time.monotonic()
        if now - self._last_print > 10 or record["step"] in (1, self.total) or "eval_loss" in record:
            self._last_print = now
            self.console.print(f"{self.label} step {record['step']}/{self.total}  {info}  eta {eta_s:,.0f}s")
