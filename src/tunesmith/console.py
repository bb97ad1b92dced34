"""What tunesmith prints while it works: one progress bar per phase, and no library noise unless asked for.

A phase (loading the model, tokenising, the reference pass, evaluating each candidate) is one rich progress
bar in a terminal, left on screen when it ends. In a log (no terminal) a phase prints one line when it ends,
and a long one a line every 30 seconds. The loops that do the work report progress with `advance(n)`, which
does nothing when no phase is open, so lower layers can call it without knowing who listens.

`quiet()` keeps the libraries' own output out of the way: transformers', datasets' and the Hub's progress
bars ("Loading weights"), their info logs, and Python warnings raised inside those libraries. tunesmith's own
warnings are shown as one `warning: ...` line each. `verbose=True` (`--verbose`, TUNESMITH_VERBOSE=1) shows it all.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

T = TypeVar("T")
LOG_EVERY_S = 30.0
LIBRARIES = ("transformers", "peft", "torch", "datasets", "huggingface_hub", "accelerate", "bitsandbytes",
             "tokenizers", "safetensors", "gguf", "mlflow", "wandb", "trackio", "httpx", "urllib3", "filelock")
_current: ContextVar[Phase | None] = ContextVar("tunesmith_phase", default=None)


def make_console(quiet: bool = False) -> Console:
    """The console tunesmith reports on: stderr (stdout stays for results), no hard wraps, so a file:line in a
    message stays whole in a log. `quiet`: prints nothing (ranks other than 0)."""
    return Console(stderr=True, soft_wrap=True, quiet=quiet)


def is_verbose(verbose: bool | None = None) -> bool:
    if verbose is not None:
        return verbose
    return os.environ.get("TUNESMITH_VERBOSE", "") not in ("", "0", "false")


def duration(seconds: float) -> str:
    """3.2s, 4m05s, 1h02m."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, s = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{s:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


class Phase:
    """One phase's progress: a live bar in a terminal, plain lines otherwise."""

    def __init__(self, label: str, total: int | None, console: Console, unit: str = "", live: bool = True,
                 enabled: bool = True):
        self.label, self.total, self.console, self.unit, self.enabled = label, total, console, unit, enabled
        self.done = 0
        self._lock = threading.Lock()  # endpoint answers arrive from worker threads
        self.started = self._last_line = time.monotonic()
        self.bar: Progress | None = None
        if enabled and live and console.is_terminal:
            self.bar = Progress(*_columns(total is not None), console=console, transient=False)
            self.task = self.bar.add_task(label, total=total, unit=unit, eta="…")

    def advance(self, n: int = 1) -> None:
        with self._lock:
            self._advance(n)

    def _advance(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, eta=self._eta().removeprefix(", eta ") or "…")
        elif self.enabled and time.monotonic() - self._last_line > LOG_EVERY_S and not self._finished():
            self._last_line = time.monotonic()
            self.console.print(f"{self.label}: {self._count()}, {duration(self.elapsed)} elapsed{self._eta()}",
                               highlight=False, markup=False)

    def _finished(self) -> bool:
        return self.total is not None and self.done >= self.total  # the closing line follows

    def set_total(self, total: int) -> None:
        self.total = total
        if self.bar is not None:
            self.bar.update(self.task, total=total)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def _count(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        if self.total:
            return f"{self.done:,}/{self.total:,}{unit} ({100 * self.done / self.total:.0f}%)"
        return f"{self.done:,}{unit}"

    def _eta(self) -> str:
        if not self.total or not self.done or self.done >= self.total:
            return ""
        return f", eta {duration(self.elapsed / self.done * (self.total - self.done))}"

    def start(self) -> None:
        if self.bar is not None:
            self.bar.start()

    def stop(self, failed: bool = False) -> None:
        if self.bar is not None:
            if not failed:  # a finished bar stays on screen: full, or (no total) its spinner turned into a tick
                total = self.total if self.total is not None else 1
                self.bar.update(self.task, total=total, completed=max(self.done, total), eta=duration(0))
            self.bar.stop()
        elif self.enabled and not failed:
            unit = f" {self.unit}" if self.unit else ""
            what = f"{self.done:,}{unit} in " if self.done else ""
            self.console.print(f"{self.label}: {what}{duration(self.elapsed)}", highlight=False, markup=False)


def _columns(has_total: bool) -> list:
    if not has_total:
        return [SpinnerColumn(finished_text="✓"), TextColumn("[bold]{task.description}"), TimeElapsedColumn()]
    # the ETA from this phase's own average: rich's estimate needs several updates within 30 s
    return [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"), TimeElapsedColumn(), TextColumn("eta {task.fields[eta]}")]


@contextmanager
def phase(label: str, total: int | None = None, console: Console | None = None, unit: str = "",
          enabled: bool = True) -> Iterator[Phase]:
    """A phase of the work; `advance` inside it moves its bar. A phase opened inside another one (say, the
    model load inside an eval) counts silently, so only one bar is live at a time."""
    outer = _current.get()
    p = Phase(label, total, console or make_console(), unit, live=outer is None, enabled=enabled and outer is None)
    token = _current.set(p)
    p.start()
    try:
        yield p
    except BaseException:
        p.stop(failed=True)
        raise
    else:
        p.stop()
    finally:
        _current.reset(token)


def advance(n: int = 1) -> None:
    """Move the open phase's bar by n (no phase open: nothing)."""
    p = _current.get()
    if p is not None:
        p.advance(n)


def advancer() -> Callable[[int], None]:
    """`advance` bound to the phase open now, for worker threads (which do not see the open phase)."""
    p = _current.get()
    return p.advance if p is not None else (lambda n=1: None)


def counted(items: Iterable[T]) -> Iterator[T]:
    """Yield each item, then advance the open phase by one."""
    for item in items:
        yield item
        advance()


def track(items: Iterable[T], label: str, total: int | None = None, console: Console | None = None,
          unit: str = "", enabled: bool = True) -> Iterator[T]:
    """Iterate `items` as one phase, one step per item."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with phase(label, total, console, unit, enabled):
        yield from counted(items)


# ---------------------------------------------------------------- library noise

@contextmanager
def quiet(verbose: bool | None = None) -> Iterator[None]:
    """Within: the libraries' progress bars off, their logs at error level, warnings raised inside them
    hidden, and tunesmith's own warnings shown as one `warning: ...` line each (not file:line and source).
    Everything is put back after."""
    if is_verbose(verbose):
        yield
        return
    restore, formatting = _silence_libraries(), warnings.formatwarning
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=rf"({'|'.join(LIBRARIES)})(\.|$)")
        # Only the display changes: code that records warnings (catch_warnings(record=True)) still gets them.
        warnings.formatwarning = _one_line
        try:
            yield
        finally:
            warnings.formatwarning = formatting
            restore()


def _one_line(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


# Read by the libraries when they are first imported; the switches below cover those already imported.
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
             "TRANSFORMERS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}


def _switches() -> dict:
    """module -> (read its state, make it quiet, put a state back, its default state)."""
    import sys

    out = {}
    if "transformers.utils.logging" in sys.modules:
        tf = sys.modules["transformers.utils.logging"]
        out["transformers"] = (
            lambda: (tf.get_verbosity(), tf.is_progress_bar_enabled()),
            lambda: (tf.set_verbosity_error(), tf.disable_progress_bar()),
            lambda st: (tf.set_verbosity(st[0]), tf.enable_progress_bar() if st[1] else tf.disable_progress_bar()),
            lambda: (tf._get_default_logging_level(), not os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")))
    if "huggingface_hub.utils" in sys.modules:
        hub = sys.modules["huggingface_hub.utils"]
        out["huggingface_hub"] = (
            lambda: not hub.are_progress_bars_disabled(), hub.disable_progress_bars,
            lambda on: hub.enable_progress_bars() if on else hub.disable_progress_bars(),
            lambda: not os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"))
    if "datasets" in sys.modules and hasattr(sys.modules["datasets"], "is_progress_bar_enabled"):
        ds = sys.modules["datasets"]
        out["datasets"] = (
            ds.is_progress_bar_enabled, ds.disable_progress_bars,
            lambda on: ds.enable_progress_bars() if on else ds.disable_progress_bars(),
            lambda: not os.environ.get("HF_DATASETS_DISABLE_PROGRESS_BARS"))
    return out


def _silence_libraries():
    """Switch the libraries' bars and logs off; return the function that switches them back. A library first
    imported inside gets its defaults back (as the user's environment sets them)."""
    env_before = {k: os.environ.get(k) for k in QUIET_ENV}
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    before = {name: sw[0]() for name, sw in _switches().items()}
    for sw in _switches().values():
        sw[1]()
    levels = {}
    for name in LIBRARIES:
        logger = logging.getLogger(name)
        levels[name] = logger.level
        logger.setLevel(max(logger.level, logging.ERROR))

    def restore() -> None:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        for k, v in env_before.items():
            if v is None:
                os.environ.pop(k, None)
        for name, (_, _, put, default) in _switches().items():
            put(before[name] if name in before else default())

    return restore
