"""User-facing errors. Each one says where the problem is and how to fix it; the CLI prints them
without a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass

# Exit codes of every `tunesmith` command (README and docs/reliability.md list them).
EXIT_OK = 0
EXIT_INPUT = 2  # invalid input: config, data, model path, candidate, metric
EXIT_VERDICT = 6  # the verdict failed: --require-win / --require-worth (or eval.require_*)
EXIT_INTERNAL = 70  # an unexpected error inside tunesmith (a bug): a one-line message, the traceback with --debug
EXIT_INTERRUPTED = 130  # Ctrl-C outside training


def suggest(key: str, options: Iterable[str]) -> str:
    """A hint for an unknown key: the closest valid one, or the list of valid ones."""
    options = list(options)
    close = difflib.get_close_matches(key, options, n=1)
    return f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(sorted(options))}"


class TunesmithError(Exception):
    """An error caused by the user's input or environment, with a hint on how to fix it."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if not hint else f"{message}\n  hint: {hint}")


@dataclass(frozen=True)
class Problem:
    """One problem found in a config or data file: where, what, and how to fix it."""

    where: str  # "train.lr", or "data/train.jsonl:12 field 'messages[1].role'"
    what: str
    hint: str | None = None

    def __str__(self) -> str:
        return f"{self.where}: {self.what}" + (f" (hint: {self.hint})" if self.hint else "")


class ProblemsError(TunesmithError):
    """Several problems collected in one pass and reported together."""

    title = "problems found"

    def __init__(self, problems: list[Problem], total: int | None = None, shown: int = 20, title: str | None = None):
        self.problems = list(problems)
        self.total = total if total is not None else len(self.problems)
        title = title or self.title
        lines = [f"{title} ({self.total}):"]
        lines += [f"  - {p}" for p in self.problems[:shown]]
        if self.total > min(shown, len(self.problems)):
            lines.append(f"  ... and {self.total - min(shown, len(self.problems))} more")
        super().__init__("\n".join(lines))


class ConfigError(ProblemsError):
    title = "invalid config"


class DataError(ProblemsError):
    title = "invalid data"


class ModelLoadError(TunesmithError):
    pass


class TrainingAborted(TunesmithError):
    """Training stopped on purpose (non-finite loss, signal); carries a documented exit code."""

    def __init__(self, message: str, hint: str | None = None, exit_code: int = 3):
        super().__init__(message, hint)
        self.exit_code = exit_code
