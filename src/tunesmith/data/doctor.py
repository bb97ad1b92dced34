"""The data doctor: everything worth knowing about a dataset before training on it.

`check_data` never raises for bad rows; it reports them. Errors are problems that make a run wrong (invalid
rows, mixed formats, eval prompts that also appear in training); warnings are worth a look (duplicates,
conflicting targets, over-long rows, rare classes, odd role order). Every finding names its rows (file:line).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from ..errors import Problem, TunesmithError
from . import dedup
from .formats import messages_text, prompt_messages, target_messages
from .load import RowProblem, no_rows_problem, parse_rows
from .sources import read_rows
from .tools import TOOL_CODES
from .types import Conversation, Document, Example, Preference, Prompt, Unpaired

Level = Literal["error", "warning", "info"]
ROWS_KEPT = 200  # rows in `--json` output per finding (the count is always exact; --report keeps them all)
GROUP_SHOWN = 5  # members of a duplicate group shown in its row

PROBLEM_TITLES = {
    "unreadable": "rows that cannot be read", "empty": "empty or whitespace-only fields",
    "missing": "missing fields", "type": "fields of the wrong type", "role": "unknown or misplaced roles",
    "no_assistant": "no assistant turn to learn", "last_not_assistant": "last turn is not the assistant's",
    "identical": "chosen identical to rejected", "label": "labels that are not booleans",
    "no_prefix": "preference pairs without a shared prompt", "hh_text": "malformed hh-rlhf text",
    "unknown_format": "rows of no known format", "mixed_format": "rows in a different format",
    **TOOL_CODES,
}


@dataclass
class Finding:
    level: Level
    code: str
    message: str
    rows: list[str] = field(default_factory=list)
    count: int = 0
    hint: str | None = None
    groups: list[list[str]] | None = None  # duplicate findings: every member of every group


@dataclass
class LengthStats:
    """Token lengths of rendered examples (a preference pair counts its longer side)."""

    count: int
    mean: float
    p50: int
    p90: int
    p99: int
    max: int
    over_max_length: int
    histogram: list[tuple[int, int, int]]  # (from, to, rows)


@dataclass
class Report:
    files: list[str]
    format: str
    kind: str
    rows: int
    examples: int
    invalid: int
    max_length: int
    lengths: LengthStats | None = None
    eval_files: list[str] = field(default_factory=list)
    eval_examples: int | None = None
    labels: dict[str, int] | None = None
    findings: list[Finding] = field(default_factory=list)
    documents: dict[str, int] | None = None  # documents: windows, tokens and trained tokens at max_length

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warning"]

    def to_dict(self, rows_kept: int | None = ROWS_KEPT) -> dict[str, Any]:
        """The report as plain data: each finding's rows cut to `rows_kept` (None: all of them, with every
        member of every duplicate group)."""
        out = asdict(self)
        if rows_kept is not None:
            for f in out["findings"]:
                f["rows"] = f["rows"][:rows_kept]
                f.pop("groups")
        return out

    def to_json(self, indent: int | None = 2, rows_kept: int | None = ROWS_KEPT) -> str:
        return json.dumps(self.to_dict(rows_kept), indent=indent, ensure_ascii=False)

    def write(self, path) -> None:
        """The full report (every row of every finding) as JSON: `tunesmith data check --report FILE`."""
        from pathlib import Path

        out = {**self.to_dict(None), "error_count": len(self.errors), "warning_count": len(self.warnings)}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    def render(self, console, rows_shown: int = 5) -> None:
        """Print the report to a rich Console: summary, length histogram, then errors and warnings."""
        from rich.markup import escape

        console.print(f"[bold]data[/bold] {escape(', '.join(self.files))}  format [bold]{self.format}[/bold] "
                      f"({self.kind})  rows {self.rows}  examples {self.examples}  invalid {self.invalid}")
        if self.eval_examples is not None:
            console.print(f"[bold]eval[/bold] {escape(', '.join(self.eval_files))}  examples {self.eval_examples}")
        if self.documents:
            d = self.documents
            console.print(f"documents {d['documents']} -> {d['windows']} windows of at most {self.max_length} tokens: "
                          f"{d['tokens']} tokens, {d['trained_tokens']} trained")
        if self.lengths is not None and self.lengths.count:
            s = self.lengths
            console.print(f"tokens  p50 {s.p50}  p90 {s.p90}  p99 {s.p99}  max {s.max}  mean {s.mean:.1f}  "
                          f"over max_length {self.max_length}: {s.over_max_length}")
            top = max(n for _, _, n in s.histogram) or 1
            for lo, hi, n in s.histogram:
                console.print(f"  {lo:>7}-{hi:<7} {'#' * round(40 * n / top):<40} {n}")
        if self.labels:
            shown = ", ".join(f"{escape(str(k))}: {v}" for k, v in list(self.labels.items())[:10])
            more = f" (+{len(self.labels) - 10} more)" if len(self.labels) > 10 else ""
            console.print(f"labels  {shown}{more}")
        for level, colour in (("error", "red"), ("warning", "yellow")):
            for f in (x for x in self.findings if x.level == level):
                console.print(f"[{colour}]{level}[/{colour}] {escape(f.message)}")
                for row in f.rows[:rows_shown]:
                    console.print(f"    {escape(row)}")
                if f.count > rows_shown:
                    console.print(f"    ... and {f.count - rows_shown} more")
                if f.hint:
                    console.print(f"    [dim]hint: {escape(f.hint)}[/dim]")
        console.print(f"{len(self.errors)} error(s), {len(self.warnings)} warning(s)")


def check_data(spec: str | list[str], tokenizer=None, max_length: int = 1024, eval_spec: str | list[str] | None = None,
               format: str = "auto", columns: dict[str, str] | None = None,
               system_prompt: str | None = None, truncation: str = "right", train_on: str = "all_assistant",
               window_overlap: int = 0, cross_document: bool = False) -> Report:
    """Load `spec` (and `eval_spec`) leniently and report what is wrong or suspicious about it."""
    parsed, files = _parse(spec, format, columns)
    examples = parsed.examples
    report = Report(sorted({str(ex.source.file) for ex in examples if ex.source}) or _spec_names(spec),
                    parsed.format, parsed.kind, parsed.rows, len(examples), len(parsed.problems), max_length)
    report.findings += _empty_findings(parsed, files) + _invalid_findings(parsed.problems, parsed.mixed)
    if parsed.kind == "document":
        from . import doctor_documents as docs

        if tokenizer is not None and examples:
            report.lengths, report.documents = docs.token_counts(examples, tokenizer, max_length, window_overlap,
                                                                 cross_document)
        report.findings += _duplicate_findings(examples) + docs.boilerplate_findings(examples)
    else:
        _check_examples(report, parsed, tokenizer, system_prompt, truncation, train_on)
    if eval_spec is not None:
        held, held_files = _parse(eval_spec, format, columns)
        report.eval_files = _spec_names(eval_spec)
        report.eval_examples = len(held.examples)
        report.findings += [_retitle(f, "eval data: ") for f in _empty_findings(held, held_files)
                            + _invalid_findings(held.problems, held.mixed)]
        report.findings += _leakage_findings(examples, held.examples)
    order = {"error": 0, "warning": 1, "info": 2}
    report.findings.sort(key=lambda f: order[f.level])
    return report


def _check_examples(report: Report, parsed, tokenizer, system_prompt, truncation: str, train_on: str) -> None:
    """The checks of conversations, preference pairs and KTO examples."""
    examples = parsed.examples
    if tokenizer is not None and examples:
        report.lengths, over = _lengths(examples, tokenizer, report.max_length, system_prompt, truncation, train_on)
        report.findings += over
    report.findings += _duplicate_findings(examples)
    if parsed.kind == "sft":
        report.findings += _conflict_findings(examples)
    report.findings += _role_order_findings(examples)
    labels, balance = _balance_findings(examples, parsed.kind)
    report.labels, report.findings = labels, report.findings + balance


def _parse(spec, format, columns):
    from .load import _files

    problems: list[Problem] = []
    rows = list(read_rows(spec, columns, problems=problems))
    return parse_rows(rows, format, problems), _files(spec, None)


def _empty_findings(parsed, files: list[str]) -> list[Finding]:
    """No rows at all is an error, as it is for training (`load.normalise`)."""
    if parsed.rows or parsed.problems:
        return []
    problem = no_rows_problem(files)
    return [_finding("error", "no_rows", f"{problem.where}: {problem.what}", [], problem.hint, count=0)]


def _spec_names(spec) -> list[str]:
    return [spec] if isinstance(spec, str) else [str(s) for s in spec]


def _retitle(finding: Finding, prefix: str) -> Finding:
    finding.message = prefix + finding.message
    return finding


def _finding(level: Level, code: str, message: str, rows: list[str], hint: str | None = None,
             count: int | None = None, groups: list[list[str]] | None = None) -> Finding:
    return Finding(level, code, message, rows, len(rows) if count is None else count, hint, groups)


def _group_row(members: list[str], sep: str) -> str:
    """One duplicate group as a row: its first members, then how many more (all of them are in `groups`)."""
    shown = sep.join(members[:GROUP_SHOWN])
    return shown + (f"{sep}... and {len(members) - GROUP_SHOWN} more" if len(members) > GROUP_SHOWN else "")


def _where(example: Example) -> str:
    return str(example.source) if example.source else "?"


def _invalid_findings(problems: list[RowProblem], mixed: Problem | None) -> list[Finding]:
    findings = []
    by_code: dict[str, list[RowProblem]] = {}
    for p in problems:
        by_code.setdefault(p.code, []).append(p)
    if mixed is not None:  # one finding: the summary, naming the rows of the minority formats
        rows = [f"{p.source or '?'}: {p.what}" for p in by_code.pop("mixed_format", [])]
        findings.append(_finding("error", "mixed_format", mixed.what, rows, mixed.hint))
    for code, group in by_code.items():
        title = PROBLEM_TITLES.get(code, "invalid rows")
        rows = [f"{p.source or '?'}: {p.what}" for p in group]
        findings.append(_finding("error", code, f"{len(group)} row(s): {title}", rows, group[0].hint))
    return findings


def _lengths(examples: Sequence[Example], tokenizer, max_length: int, system_prompt: str | None,
             truncation: str = "right", train_on: str = "all_assistant") -> tuple[LengthStats, list[Finding]]:
    from .render import Renderer  # lazy: pulls in the tokenizer stack

    renderer = Renderer(tokenizer, max_length=10**9, train_on=train_on, system_prompt=system_prompt)
    lengths, over, lost = [], [], []
    failed: dict[tuple[str, str | None], list[str]] = {}
    for ex in examples:
        try:
            sides = _render(renderer, ex)
        except TunesmithError as e:  # the chat template cannot render this example: report, keep checking
            failed.setdefault((e.message, e.hint), []).append(_where(ex))
            continue
        if not sides:
            lost.append(f"{_where(ex)}: renders no trained tokens")
            continue
        length = max(len(t.input_ids) for t in sides)
        lengths.append(length)
        if length > max_length:
            over.append(f"{_where(ex)}: {length} tokens")
            if truncation != "drop" and not _survives(sides, max_length, truncation):
                lost.append(f"{_where(ex)}: no trained token within the {truncation}-truncated {max_length}"
                            + (" (or no room for the prompt both sides share)" if len(sides) == 2 else ""))
    findings = [_finding("error", "template", f"{len(rows)} example(s) cannot be rendered: {message}", rows, hint)
                for (message, hint), rows in failed.items()]
    fate = {"right": "lose their end", "left": "lose their beginning", "drop": "be dropped"}[truncation]
    if over:
        findings.append(_finding("warning", "too_long", f"{len(over)} example(s) longer than max_length "
                                 f"{max_length} will {fate} (data.truncation: {truncation})", over,
                                 "raise data.max_length if these matter"))
    if lost:
        findings.append(_finding("warning", "nothing_trained", f"{len(lost)} example(s) would train nothing "
                                 f"after truncation and will be dropped", lost,
                                 "shorten their prompts, raise data.max_length or change data.truncation"))
    return length_stats(lengths, max_length), findings


def _survives(sides: list, max_length: int, truncation: str) -> bool:
    """Whether training keeps the example, cut exactly as the renderer cuts it (`render.fit`, `fit_pair`)."""
    from .render import fit, fit_pair

    seqs = [(list(t.input_ids), list(t.labels)) for t in sides]
    if len(seqs) == 2:
        return fit_pair(seqs[0], seqs[1], max_length, truncation) is not None
    return fit(*seqs[0], max_length, truncation) is not None


def _render(renderer, example: Example) -> list:
    if isinstance(example, Conversation):
        out = renderer.sft(example)
        return [out] if out is not None else []
    if isinstance(example, Preference):
        pair = renderer.preference(example)
        return [pair.chosen, pair.rejected] if pair is not None else []
    if isinstance(example, Prompt):  # online training: the prompt's length is what counts, all of it kept
        from .render import Tokenized

        ids = renderer.prompt(example).input_ids
        return [Tokenized(ids, ids, example.source)]
    out = renderer.unpaired(example)
    return [out.completion] if out is not None else []


def length_stats(lengths: Sequence[int], max_length: int, bins: int = 10) -> LengthStats:
    """Percentiles (nearest rank, so each is a real example's length) and an equal-width histogram whose
    bins are inclusive integer ranges."""
    if not lengths:
        return LengthStats(0, 0.0, 0, 0, 0, 0, 0, [])
    values = np.sort(np.asarray(lengths, dtype=np.int64))

    def rank(q: float) -> int:
        return int(values[max(0, int(np.ceil(q * len(values))) - 1)])

    top = int(values[-1])
    width = max(1, -(-(top + 1) // bins))
    counts = np.bincount(values // width, minlength=-(-(top + 1) // width))
    histogram = [(i * width, (i + 1) * width - 1, int(c)) for i, c in enumerate(counts)]
    return LengthStats(len(values), float(values.mean()), rank(0.5), rank(0.9), rank(0.99), top,
                       int((values > max_length).sum()), histogram)


def example_text(example: Example, system: bool = True) -> str:
    """Everything that makes an example what it is, for exact (`system`) and near duplicate checks. Near
    duplicates compare what differs between rows: the user, assistant and tool turns, not the system message
    (often one long text every row shares)."""
    if isinstance(example, Document):
        return example.text

    def text(messages) -> str:
        return messages_text(m for m in messages if system or m.role != "system")

    parts = [text(prompt_messages(example)), text(target_messages(example))]
    if isinstance(example, Preference):
        parts.append(text(example.rejected))
    if isinstance(example, Unpaired):
        parts.append(f"label: {example.label}")
    return "\n".join(parts)


def _duplicate_findings(examples: Sequence[Example]) -> list[Finding]:
    groups: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault(dedup.normalise_text(example_text(ex)), []).append(i)
    exact = [[_where(examples[i]) for i in g] for g in groups.values() if len(g) > 1]
    what = "document" if examples and isinstance(examples[0], Document) else "row"
    findings = []
    if exact:
        extra = sum(len(g) - 1 for g in exact)
        findings.append(_finding("warning", "exact_duplicates", f"{len(exact)} group(s) of exact duplicates "
                                 f"({extra} redundant {what}(s))", [_group_row(g, " = ") for g in exact],
                                 "remove the repeats; they overweight those examples and can leak into an eval "
                                 "split", groups=exact))
    firsts = [g[0] for g in groups.values()]
    sets = dedup.drop_common([dedup.shingles(example_text(examples[i], system=False)) for i in firsts])
    near = [[_where(examples[firsts[i]]) for i in c] for c in dedup.clusters(dedup.similar_pairs(sets))]
    if near:
        findings.append(_finding("warning", "near_duplicates", f"{len(near)} group(s) of near duplicates "
                                 f"(word 3-gram Jaccard >= {dedup.THRESHOLD}, text most {what}s share left out)",
                                 [_group_row(g, " ~ ") for g in near],
                                 "review them; keep one of each group unless the differences matter", groups=near))
    return findings


def _target_key(example: Example) -> str:
    return dedup.normalise_text(messages_text(target_messages(example)))


def _prompt_key(example: Example) -> str:
    return dedup.normalise_text(messages_text(prompt_messages(example)))


def _conflict_findings(examples: Sequence[Example]) -> list[Finding]:
    by_prompt: dict[str, dict[str, list[int]]] = {}
    for i, ex in enumerate(examples):
        if prompt_messages(ex):
            by_prompt.setdefault(_prompt_key(ex), {}).setdefault(_target_key(ex), []).append(i)
    rows = []
    for targets in by_prompt.values():
        if len(targets) > 1:
            rows.append(" vs ".join(_where(examples[g[0]]) for g in targets.values()))
    if not rows:
        return []
    return [_finding("warning", "conflicts", f"{len(rows)} prompt(s) appear with different targets", rows,
                     "if the task has one right answer, fix the labels; otherwise ignore")]


def _role_order_findings(examples: Sequence[Example]) -> list[Finding]:
    issues: dict[str, list[str]] = {"assistant first": [], "system not first": [], "two user turns in a row": []}
    for ex in examples:
        roles = [m.role for m in _all_messages(ex)]
        speaking = [r for r in roles if r != "system"]
        if speaking and speaking[0] == "assistant":
            issues["assistant first"].append(_where(ex))
        if "system" in roles[1:]:
            issues["system not first"].append(_where(ex))
        if any(a == b == "user" for a, b in zip(roles, roles[1:], strict=False)):
            issues["two user turns in a row"].append(_where(ex))
    return [_finding("warning", "role_order", f"{len(rows)} example(s): {issue}", rows,
                     "many chat templates reject or mangle this order; merge or reorder the turns")
            for issue, rows in issues.items() if rows]


def _all_messages(example: Example):
    if isinstance(example, Conversation):
        return example.messages
    if isinstance(example, Preference):
        return example.prompt + example.chosen
    if isinstance(example, Prompt):
        return example.prompt
    return example.prompt + example.completion


def _balance_findings(examples: Sequence[Example], kind: str) -> tuple[dict[str, int] | None, list[Finding]]:
    if kind == "unpaired":
        return _kto_balance([ex for ex in examples if isinstance(ex, Unpaired)])
    if kind != "sft" or not examples:
        return None, []
    targets = [" ".join(m.content for m in target_messages(ex)).strip() for ex in examples]
    counts = Counter(targets)
    label_like = all(len(t.split()) <= 5 for t in targets) and len(counts) <= 200 and len(counts) <= len(targets) / 2
    if not label_like:
        return None, []
    mean = len(targets) / len(counts)
    rare = sorted(c for c, n in counts.items() if n < mean / 10)
    if not rare:
        return dict(counts.most_common()), []
    rows = [f"{c!r}: {counts[c]} ({', '.join(_where(ex) for ex, t in zip(examples, targets, strict=True) if t == c)})"
            for c in rare]
    return dict(counts.most_common()), [_finding(
        "warning", "class_balance", f"{len(rare)} class(es) have under a tenth of the mean {mean:.1f} "
        "examples per class", rows, "add examples of the rare classes, or merge them")]


def _kto_balance(examples: list[Unpaired]) -> tuple[dict[str, int], list[Finding]]:
    good = sum(ex.label for ex in examples)
    bad = len(examples) - good
    labels = {"desirable": good, "undesirable": bad}
    if good and bad and max(good, bad) <= 4 * min(good, bad):
        return labels, []
    rows = [_where(ex) for ex in examples if ex.label == (good < bad)]
    if not good or not bad:
        message = f"all {len(examples)} KTO examples are {'desirable' if good else 'undesirable'}"
        return labels, [_finding("warning", "label_balance", message, [], "KTO learns from both kinds; "
                                 "add examples with the other label", count=len(examples))]
    weight = round(bad / good, 2)
    return labels, [_finding("warning", "label_balance", f"KTO labels are imbalanced: {good} desirable vs "
                             f"{bad} undesirable", rows, f"the KTO paper keeps weight_D*n_D / (weight_U*n_U) "
                             f"between 1 and 4/3, e.g. method_args.kto_desirable_weight: {weight}")]


def _leakage_findings(train: Sequence[Example], held: Sequence[Example]) -> list[Finding]:
    if any(isinstance(ex, Document) for ex in [*train, *held]):
        from .doctor_documents import leakage_findings

        return leakage_findings(train, held)
    train_keys: dict[str, int] = {}
    for i, ex in enumerate(train):
        if prompt_messages(ex):
            train_keys.setdefault(_prompt_key(ex), i)
    exact = [f"{_where(ex)} = {_where(train[train_keys[_prompt_key(ex)]])}" for ex in held
             if prompt_messages(ex) and _prompt_key(ex) in train_keys]
    findings = []
    if exact:
        findings.append(_finding("error", "leakage", f"{len(exact)} eval prompt(s) also appear in the "
                                 "training data", exact, "remove them from one side; otherwise the eval "
                                 "measures memorisation"))
    prompts = [messages_text(prompt_messages(ex)) for ex in [*train, *held]]
    n = len(train)
    pairs = dedup.near_duplicate_pairs(prompts, keep=lambda i, j: (i < n) != (j < n))
    near = sorted({(max(i, j) - n, min(i, j)) for i, j, _ in pairs
                   if dedup.normalise_text(prompts[i]) != dedup.normalise_text(prompts[j])})
    if near:
        rows = [f"{_where(held[e])} ~ {_where(train[t])}" for e, t in near]
        findings.append(_finding("warning", "near_leakage", f"{len(near)} eval prompt/train prompt pair(s) "
                                 f"are near duplicates (Jaccard >= {dedup.THRESHOLD})", rows,
                                 "check whether these make the eval too easy"))
    return findings
