"""The comparison eval: every candidate answers the same held-out prompts, every metric scores them, and each
tuned candidate is tested against each baseline with paired statistics (and optionally an LLM judge).

`evaluate(...)` is `tunesmith eval`; `evaluate_run(run)` is the eval at the end of `tunesmith train`.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from ..console import make_console, phase
from ..data.formats import messages_text, prompt_messages, target_messages
from ..data.types import Dataset, Example, Message, Unpaired
from ..errors import TunesmithError
from .candidates import (
    Candidate,
    describe_shots,
    parse_candidates,
    pick_shots,
    run_system_prompt,
    run_train_data,
    shared_base,
    with_shots,
)
from .engine import Engine, local_judge_fn
from .judge import Judge, JudgeResult, LocalJudge, judge_from_url, judge_pairs
from .metrics import Metric, parse_metric, score_all
from .output import print_outcome, write_outputs
from .report import build_results
from .stats import Comparison, compare
from .stats import require_win as check_win

DataLike = str | Path | list[str] | Dataset | Sequence[Example]


class NoWin(TunesmithError):
    """--require-win and a tuned candidate did not significantly beat every baseline."""

    exit_code = 1


@dataclass
class SetResult:
    """The comparison on one data set (the eval set, or the regression set)."""

    name: str
    candidates: list[str]
    tuned: list[str]
    baselines: list[str]
    comparisons: list[Comparison]
    outputs: dict[str, list[str]]
    results: dict[str, Any]
    judge: dict[tuple[str, str], JudgeResult] = field(default_factory=dict)

    def verdicts(self) -> list[str]:
        multi = len(self.comparisons) > 1
        return [f"[{c.metric}] {v}" if multi else v for c in self.comparisons for v in c.verdict()]

    def summary(self) -> dict[str, Any]:
        return {
            "n": self.results["n"], "candidates": self.candidates, "tuned": self.tuned,
            "scores": {c.metric: {a.name: {"mean": a.mean, "lo": a.lo, "hi": a.hi} for a in c.aggregates.values()}
                       for c in self.comparisons},
            "pairs": [{"metric": c.metric, "tuned": p.tuned, "baseline": p.baseline, "diff": p.diff, "lo": p.lo,
                       "hi": p.hi, "p": p.p, "outcome": p.outcome} for c in self.comparisons for p in c.pairs],
            "verdicts": self.verdicts(),
            "judge": [_judge_dict(t, b, r) for (t, b), r in self.judge.items()],
        }


@dataclass
class EvalResult:
    main: SetResult
    won: bool
    reasons: list[str]
    out_dir: Path | None = None
    regression: SetResult | None = None

    def verdicts(self) -> list[str]:
        return self.main.verdicts()

    def summary(self) -> dict[str, Any]:
        """What run.json records about the eval."""
        out = {**self.main.summary(), "won": self.won, "reasons": self.reasons,
               "out_dir": str(self.out_dir) if self.out_dir else None}
        if self.regression is not None:
            out["regression"] = self.regression.summary()
        return out


def evaluate(data: DataLike, candidates: str | Sequence[str] = ("base", "base+fewshot:5"),
             metrics: str | Sequence[str] = ("exact",), *, base: str | None = None,
             train_data: DataLike | None = None, out_dir: str | Path | None = None, batch_size: int = 16,
             max_new_tokens: int = 64, max_examples: int | None = None, judge: str | Judge | None = None,
             require_win: bool = False, regression: DataLike | None = None, console: Console | None = None,
             fewshot_seed: int = 0, sample_seed: int = 0, device: str = "auto", precision: str = "auto",
             data_format: str = "auto", columns: dict[str, str] | None = None, system_prompt: str | None = None,
             tuned_run: str | Path | None = None) -> EvalResult:
    """Compare the candidates on held-out `data` and write results.json / report.md / report.html into
    `out_dir` (when given). Raises NoWin (exit code 1) after writing when `require_win` and no clear win."""
    console = console or make_console()
    cands = parse_candidates(candidates, tuned_run)
    metric_specs = [metrics] if isinstance(metrics, str) else list(metrics)
    if not metric_specs:
        raise TunesmithError("no metric given", "add --metric exact (or loss, choice, json, ...)")
    # Everything that can be wrong with the inputs fails here, before a model is loaded.
    base_spec = shared_base(cands, base)
    eval_set = subsample(load_set(data, data_format, columns, "eval data"), max_examples, sample_seed)
    references = [reference_text(reference_messages(ex)) for ex in eval_set]
    for spec in metric_specs:
        parse_metric(spec, references)
    reg_set = None
    if regression is not None:
        reg_set = subsample(load_set(regression, data_format, columns, "regression data"), max_examples, sample_seed)
    train = None
    if any(c.fewshot for c in cands):
        train, where = _train_examples(train_data, cands, data_format, columns)
        console.print(f"few-shot examples come from {where} (seed {fewshot_seed})", highlight=False)
    remote_judge = None
    if isinstance(judge, str) and _is_url(judge):
        remote_judge = judge_from_url(judge, api_key=_judge_key())
    if system_prompt is None:
        system_prompt = run_system_prompt(cands)

    with phase("load model", console=console):
        engine = Engine(base_spec, cands, device, precision, batch_size, max_new_tokens, system_prompt)
    the_judge = remote_judge or _local_judge(judge, engine, base_spec, device, precision, batch_size)
    console.print(f"evaluating {', '.join(c.name for c in cands)} on {len(eval_set)} examples "
                  f"(base model: {base_spec})", soft_wrap=True, highlight=False)
    main = compare_on("eval", engine, eval_set, cands, metric_specs, train, fewshot_seed, the_judge, console)
    reg = None
    if reg_set is not None:
        reg_cands = regression_candidates(cands)
        console.print(f"regression set: {len(reg_set)} examples, {', '.join(c.name for c in reg_cands)}",
                      soft_wrap=True, highlight=False)
        reg = compare_on("regression", engine, reg_set, reg_cands, metric_specs, None, fewshot_seed, the_judge,
                         console)
    won, reasons = check_win(main.comparisons)
    result = EvalResult(main, won, reasons, Path(out_dir) if out_dir else None, reg)
    if out_dir is not None:
        write_outputs(result, Path(out_dir), base_spec)
        console.print(f"report: {Path(out_dir) / 'report.html'}", soft_wrap=True, highlight=False)
    print_outcome(result, console)
    if require_win and not won:
        raise NoWin("the fine-tune did not significantly beat every baseline:\n  " + "\n  ".join(reasons),
                    "look at the worst failures in report.html; more data or epochs, or a better baseline prompt, "
                    "may change the verdict; with few eval examples only large effects are significant")
    return result


def compare_on(name: str, engine: Engine, dataset: Sequence[Example], cands: Sequence[Candidate],
               metric_specs: Sequence[str], train: Sequence[Example] | None, fewshot_seed: int,
               judge: Judge | None, console: Console) -> SetResult:
    prompts = [prompt_messages(ex) for ex in dataset]
    targets = [reference_messages(ex) for ex in dataset]
    references = [reference_text(t) for t in targets]
    metric_list = [parse_metric(spec, references) for spec in metric_specs]
    shots = {c.name: pick_shots(train or [], c.fewshot, fewshot_seed, prompts) for c in cands if c.fewshot}
    seen = {c.name: [with_shots(p, shots[c.name]) for p in prompts] if c.fewshot else prompts for c in cands}
    outputs: dict[str, list[str]] = {}
    if judge is not None or any(not m.needs_logprobs for m in metric_list):
        for c in cands:
            with phase(f"{name} {c.name}", len(prompts), console, "answers"):
                outputs[c.name] = engine.generate(c, seen[c.name])
    scores: dict[str, dict[str, list[float]]] = {}
    for m in metric_list:
        scores[m.name] = {c.name: _score(m, engine, c, seen[c.name], targets, outputs.get(c.name), references)
                          for c in cands}
    tuned = [c.name for c in cands if c.tuned]
    baselines = [c.name for c in cands if not c.tuned]
    comparisons = [compare(scores[m.name], tuned, baselines, m) for m in metric_list]
    texts = [messages_text(p) for p in prompts]
    examples = [{"prompt": t, "reference": r} for t, r in zip(texts, references, strict=True)]
    results = build_results(examples, [c.name for c in cands], scores, outputs)
    judged = {}
    if judge is not None:
        for t in tuned:
            for b in baselines:
                judged[(t, b)] = judge_pairs(judge, texts, outputs[t], outputs[b])
    results.update({"set": name, "comparisons": [c.to_dict() for c in comparisons],
                    "fewshot": {n: describe_shots(s) for n, s in shots.items()},
                    "judge": [_judge_dict(t, b, r, per_example=True) for (t, b), r in judged.items()]})
    return SetResult(name, [c.name for c in cands], tuned, baselines, comparisons, outputs, results, judged)


def _score(metric: Metric, engine: Engine, cand: Candidate, prompts: Sequence[Sequence[Message]],
           targets: Sequence[Sequence[Message]], outputs: list[str] | None, references: list[str]) -> list[float]:
    if metric.needs_logprobs:
        with phase(f"{metric.name} {cand.name}", len(prompts), unit="answers"):
            nll = engine.nll(cand, prompts, targets)
        return [metric.score_nll(x) for x in nll]  # type: ignore[attr-defined]
    return score_all(metric, outputs or [], references)


def reference_messages(example: Example) -> tuple[Message, ...]:
    target = tuple(m for m in target_messages(example) if m.role == "assistant")
    if not target:
        raise TunesmithError(f"eval example {example.source or ''} has no assistant answer to compare with",
                             "each eval example needs a reference reply as its last assistant turn")
    return target


def reference_text(target: Sequence[Message]) -> str:
    return "\n".join(m.content for m in target)


def regression_candidates(cands: Sequence[Candidate]) -> list[Candidate]:
    """On a general set the question is what the fine-tune broke: each tuned run against the plain base."""
    runs = list({c.run.resolve(): Candidate(c.name.split("+fewshot:")[0], c.run, 0, c.info)
                 for c in cands if c.run is not None}.values())
    return [Candidate("base"), *runs]


# ---------------------------------------------------------------- data

def load_set(data: DataLike, data_format: str, columns: dict[str, str] | None, what: str) -> list[Example]:
    """A file/folder/hub spec, a loaded Dataset, or a list of examples → examples usable for eval
    (KTO rows: only the desirable completions can serve as references)."""
    from ..data.load import load_examples

    if isinstance(data, Dataset):
        examples = list(data.examples)
    elif isinstance(data, (str, Path)) or (isinstance(data, list) and all(isinstance(x, str) for x in data)):
        spec = str(data) if isinstance(data, (str, Path)) else data
        examples = list(load_examples(spec, data_format, columns).examples)
    else:
        examples = list(data)
    examples = [ex for ex in examples if not isinstance(ex, Unpaired) or ex.label]
    if not examples:
        raise TunesmithError(f"the {what} holds no usable examples", "give conversations or preference pairs")
    return examples


def subsample(examples: list[Example], max_examples: int | None, seed: int) -> list[Example]:
    """A seeded random subset of `max_examples`, kept in file order (files are often sorted by label, so the
    first N would cover only a few labels)."""
    if max_examples is None or len(examples) <= max_examples:
        return examples
    keep = sorted(random.Random(seed).sample(range(len(examples)), max_examples))
    return [examples[i] for i in keep]


def _train_examples(train_data: DataLike | None, cands: Sequence[Candidate], data_format: str,
                    columns: dict[str, str] | None) -> tuple[list[Example], str]:
    if train_data is not None:
        where = "the given training data" if not isinstance(train_data, (str, Path)) else str(train_data)
        return load_set(train_data, data_format, columns, "training data"), where
    found = run_train_data(cands)
    if found is None:
        name = next(c.name for c in cands if c.fewshot)
        raise TunesmithError(f"{name} needs training examples to show, and no training data was given",
                             "pass --train-data FILE (few-shot examples are never taken from the eval data)")
    return load_set(found[0], found[1], columns, "training data"), f"{found[0]} (the run's training data)"


# ---------------------------------------------------------------- judge, outputs, run.json

def _is_url(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def _judge_key() -> str | None:
    return os.environ.get("TUNESMITH_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")


def _local_judge(judge: str | Judge | None, engine: Engine, base_spec: str, device: str, precision: str,
                 batch_size: int) -> Judge | None:
    """None, a ready judge object, or a local model spec (the loaded base model answers when it is the base)."""
    if judge is None or not isinstance(judge, str):
        return judge
    if judge in (base_spec, "base"):
        return LocalJudge(engine.chat_fn())
    return LocalJudge(local_judge_fn(judge, device, precision, batch_size))


def _judge_dict(tuned: str, baseline: str, r: JudgeResult, per_example: bool = False) -> dict[str, Any]:
    out = {"tuned": tuned, "baseline": baseline, "wins": r.wins, "ties": r.ties, "losses": r.losses,
           "win_rate": r.win_rate, "tie_rate": r.tie_rate, "loss_rate": r.loss_rate, "p_value": r.p_value,
           "unparseable": r.unparseable, "inconsistent": r.inconsistent, "summary": r.summary(tuned, baseline)}
    if per_example:
        out.update(outcomes=list(r.outcomes), raw=[list(pair) for pair in r.raw])
    return out


def evaluate_run(run, console: Console | None = None) -> dict[str, Any]:
    """The config's eval: section on a finished run: writes <run>/eval/ and the "eval" entry of run.json,
    returns that entry. Raises NoWin (after writing) when eval.require_win and the run does not win."""
    from .candidates import split_specs

    cfg, ev = run.config, run.config.eval
    if ev is None:
        raise TunesmithError("this run's config has no eval: section", "add one, or run `tunesmith eval`")
    specs = split_specs(ev.candidates)
    eval_set, train = run_datasets(cfg, needs_train=any("+fewshot:" in s for s in specs))
    only_base = all(s.split("+fewshot:")[0] == "base" for s in specs)
    result = evaluate(eval_set, specs, ev.metrics, base=cfg.model if only_base else None, train_data=train,
                      out_dir=Path(run.path) / "eval", batch_size=ev.batch_size, max_new_tokens=ev.max_new_tokens,
                      max_examples=ev.max_examples, judge=ev.judge, regression=ev.regression, console=console,
                      fewshot_seed=ev.fewshot_seed, device=cfg.device, precision=cfg.precision,
                      columns=cfg.data.columns or None, system_prompt=cfg.data.system_prompt, tuned_run=run.path)
    summary = result.summary()
    _record(Path(run.path), summary)
    if ev.require_win and not result.won:
        raise NoWin("eval.require_win: the fine-tune did not significantly beat every baseline:\n  "
                    + "\n  ".join(result.reasons), f"see {Path(run.path) / 'eval' / 'report.html'}")
    return summary


def run_datasets(cfg, needs_train: bool) -> tuple[list[Example], list[Example] | None]:
    """The run's held-out examples (eval.data, else data.eval or the seeded eval split training used) and,
    when few-shot needs them, its training examples (never the eval split)."""
    from ..data.load import load_data, load_examples

    data = cfg.data
    if data.train is None and cfg.stages:
        from ..config import stage_config

        data = stage_config(cfg, 0).data.model_copy(update={"eval": cfg.data.eval,
                                                             "eval_split": cfg.data.eval_split})
    if cfg.eval.data is not None:
        held_out = load_examples(cfg.eval.data, "auto", data.columns or None, data.skip_invalid).examples
        train = load_data(data, cfg.train.seed)[0] if needs_train and data.train is not None else None
    else:
        train_ds, held = load_data(data, cfg.train.seed)
        if held is None:
            raise TunesmithError("the eval: section needs held-out data", "set eval.data, data.eval or data.eval_split")
        held_out, train = held.examples, train_ds
    return list(held_out), (list(train.examples) if train is not None else None)


def _record(run_path: Path, summary: dict[str, Any]) -> None:
    """Add the eval summary to run.json (atomically), keeping everything training wrote."""
    path = run_path / "run.json"
    info = json.loads(path.read_text()) if path.exists() else {}
    info["eval"] = summary
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(info, indent=2, default=str))
    tmp.replace(path)
