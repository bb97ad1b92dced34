"""Load training and eval data: read rows, normalise them, report or reject bad rows, split off an eval set.

`load_data(cfg, seed)` is what a run calls; `load_examples(spec)` loads one file for eval and the CLI.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..config import DataConfig
from ..errors import DataError, Problem, TunesmithError
from .formats import (
    FORMAT_KEYS,
    FORMATS,
    KIND_OF_FORMAT,
    PARSERS,
    RowError,
    detect_format,
    messages_text,
    parse_as_prompt,
    prompt_messages,
)
from .sources import data_files, read_rows
from .types import Dataset, Document, Example, ExampleKind, Source


@dataclass(frozen=True)
class RowProblem:
    """A row that could not be used, with a short machine-readable `code` for grouping in reports."""

    source: Source | None
    what: str
    hint: str | None = None
    code: str = "invalid"

    def problem(self) -> Problem:
        return Problem(str(self.source) if self.source else "(unknown row)", self.what, self.hint)


@dataclass
class Parsed:
    """Everything parsing found: the usable examples, the rows that were not, and a mixed-format summary."""

    format: str
    kind: ExampleKind
    examples: list[Example] = field(default_factory=list)
    problems: list[RowProblem] = field(default_factory=list)
    mixed: Problem | None = None
    rows: int = 0


def parse_rows(rows: Iterable[tuple[dict, Source]], format: str = "auto",
               read_problems: Iterable[Problem] = (), kind: ExampleKind | None = None) -> Parsed:
    """Normalise rows under `format` ("auto": detected from every row). Never raises for bad rows. With
    kind "prompt" every row is read as the prompt an online method answers (`formats.parse_as_prompt`)."""
    rows = list(rows)
    problems = [RowProblem(_source_of(p.where), p.what, p.hint, "unreadable") for p in read_problems]
    chosen, mixed, row_formats = (format, None, None) if format != "auto" else detect_format(rows)
    as_prompt = kind == "prompt"
    parsed = Parsed(chosen, "prompt" if as_prompt else KIND_OF_FORMAT.get(chosen, "sft"), problems=problems,
                    mixed=mixed, rows=len(rows))
    for index, (row, src) in enumerate(rows):
        seen = row_formats[index] if row_formats is not None else chosen
        if chosen == "unknown" or (seen is not None and seen != chosen):
            parsed.problems.append(_wrong_format_problem(row, src, seen, chosen))
            continue
        try:
            example = parse_as_prompt(row, src, chosen) if as_prompt else PARSERS[chosen](row, src)
        except RowError as e:
            parsed.problems.append(RowProblem(src, f"{e.field}: {e.what}" if e.field else e.what, e.hint, e.code))
            continue
        parsed.examples.append(example)
    parsed.problems.sort(key=lambda p: (p.source.file, p.source.line) if p.source else ("", 0))
    return parsed


def normalise(rows: Iterable[tuple[dict, Source]], format: str = "auto", skip_invalid: bool = False,
              files: Iterable[str] = (), read_problems: Iterable[Problem] = (),
              kind: ExampleKind | None = None) -> Dataset:
    """Parse rows into a Dataset. Bad rows raise one DataError listing them all, unless `skip_invalid`,
    in which case they are left out and listed in `Dataset.rejected`."""
    if format != "auto" and format not in PARSERS:
        raise DataError([Problem("data.format", f"unknown format '{format}'",
                                 f"use auto or one of {', '.join(FORMATS)}")])
    parsed = parse_rows(rows, format, read_problems, kind)
    files = list(files)
    if parsed.rows == 0 and not parsed.problems:
        raise DataError([no_rows_problem(files)])
    if parsed.problems and not skip_invalid:
        shown = [p.problem() for p in parsed.problems if p.code != "mixed_format"]
        raise DataError(([parsed.mixed] if parsed.mixed else []) + shown)
    if not parsed.examples:
        first = [p.problem() for p in parsed.problems]
        raise DataError(first, title="no valid rows: every row was rejected")
    rejected = [(p.source, p.what) for p in parsed.problems]
    return Dataset(parsed.examples, parsed.format, parsed.kind, files, rejected)


def no_rows_problem(files: Iterable[str]) -> Problem:
    """What training and `data check` both say about data without a single row."""
    return Problem(", ".join(files) or "data", "no rows found",
                   "the data file is empty; give at least one example (one JSON object per line, a CSV row, a "
                   "non-empty .txt/.md document)")


def _wrong_format_problem(row: dict, src: Source, seen: str | None, chosen: str) -> RowProblem:
    if seen is None:
        keys = ", ".join(map(str, row)) or "none"
        return RowProblem(src, f"cannot tell the data format from the keys ({keys})",
                          f"rows need the keys of one format: {FORMAT_KEYS}; rename columns with data.columns",
                          "unknown_format")
    return RowProblem(src, f"row looks like {seen} but most rows are {chosen}",
                      "keep one format per dataset", "mixed_format")


def _source_of(where: str) -> Source | None:
    file, _, line = where.rpartition(":")
    return Source(file, int(line)) if file and line.isdigit() else None


def read_dataset(spec: str | list[str], format: str = "auto", columns: dict[str, str] | None = None,
                 split: str | None = None, skip_invalid: bool = False, kind: ExampleKind | None = None) -> Dataset:
    """Read and normalise every row of `spec` (file, folder, hub id, or a list of them)."""
    read_problems: list[Problem] = []
    rows = list(read_rows(spec, columns, split, problems=read_problems))
    return normalise(rows, format, skip_invalid, _files(spec, split), read_problems, kind)


def load_examples(spec: str | list[str], format: str = "auto", columns: dict[str, str] | None = None,
                  skip_invalid: bool = False, split: str | None = None) -> Dataset:
    """One dataset, e.g. an eval file. Hub ids read `split` (default train; `org/name:split` overrides)."""
    return read_dataset(spec, format, columns, split, skip_invalid)


def load_data(cfg: DataConfig, seed: int, kind: ExampleKind | None = None) -> tuple[Dataset, Dataset | None]:
    """The training set and the eval set (cfg.eval, or a seeded cfg.eval_split fraction of the train rows).
    `kind` is the kind of example the method trains on: "prompt" reads every row that has a prompt as one
    (online methods); the other kinds come as the data's format makes them.

    max_examples keeps a random sample of N valid examples chosen by `seed`, before any eval split."""
    if cfg.train is None:
        raise TunesmithError("no training data given", "set data.train to a file, folder or hub dataset id")
    train = read_dataset(cfg.train, cfg.format, cfg.columns, cfg.split, cfg.skip_invalid, kind)
    if cfg.max_examples is not None:
        train.examples = sample_examples(train.examples, cfg.max_examples, seed)
    if cfg.eval is not None:
        held_out = read_dataset(cfg.eval, cfg.format, cfg.columns, "test", cfg.skip_invalid, kind)
        if held_out.kind != train.kind:
            raise TunesmithError(f"eval data is {held_out.kind} ({held_out.format}) but training data is "
                                 f"{train.kind} ({train.format})", "give eval data in a format of the same kind")
        return train, held_out
    if cfg.eval_split > 0:
        return split_eval(train, cfg.eval_split, seed)
    return train, None


def sample_examples(examples: list[Example], n: int, seed: int) -> list[Example]:
    """A seeded random sample of n examples, kept in file order. Files are often sorted (by class, by source),
    so the first n rows would be a biased subset."""
    if n >= len(examples):
        return list(examples)
    chosen = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in chosen]


def split_eval(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Hold out about `fraction` of the examples, chosen by `seed`. Examples sharing a prompt (same text
    after case/whitespace normalisation) stay on one side, so the eval set shares no prompt with training."""
    groups: dict[str, list[int]] = {}
    for index, example in enumerate(dataset.examples):
        groups.setdefault(prompt_key(example), []).append(index)
    order = sorted(groups)
    random.Random(seed).shuffle(order)
    target = max(1, round(fraction * len(dataset.examples)))
    held: list[int] = []
    for key in order:
        if len(held) >= target:
            break
        if len(held) + len(groups[key]) < len(dataset.examples):
            held.extend(groups[key])
    if not held:
        raise DataError([Problem(", ".join(dataset.files) or "data",
                                 f"cannot split off an eval set from {len(dataset.examples)} example(s)",
                                 "add more examples, or give data.eval explicitly")])
    chosen = set(held)
    keep = [e for i, e in enumerate(dataset.examples) if i not in chosen]
    held_out = [e for i, e in enumerate(dataset.examples) if i in chosen]
    train = Dataset(keep, dataset.format, dataset.kind, dataset.files, dataset.rejected)
    return train, Dataset(held_out, dataset.format, dataset.kind, dataset.files)


def prompt_key(example: Example) -> str:
    """What must not occur on both sides of an eval split: the prompt, or a document's whole text."""
    text = example.text if isinstance(example, Document) else messages_text(prompt_messages(example))
    return " ".join(text.casefold().split())


def write_rejects(dataset: Dataset, path: str | Path) -> int:
    """Write the rows left out by skip_invalid as JSONL ({"file", "line", "reason"}); returns how many."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for source, reason in dataset.rejected:
            record = {"file": source.file if source else None, "line": source.line if source else None,
                      "reason": reason}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return len(dataset.rejected)


def _files(spec: str | list[str], split: str | None) -> list[str]:
    files: list[str] = []
    for one in [spec] if isinstance(spec, str) else spec:
        local = data_files(one)
        files += [str(p) for p in local] if local is not None else [one if ":" in one else f"{one}:{split or 'train'}"]
    return files
