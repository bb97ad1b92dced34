"""The comparison eval: every candidate answers the same held-out prompts, every metric scores them, and each
tuned candidate is tested against each baseline with paired statistics (and optionally an LLM judge).

`evaluate(...)` is `tunesmith eval`; `evaluate_run(run)` is the eval at the end of `tunesmith train`.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from ..config import EvalConfig, parse_section
from ..console import advance, advancer, make_console, phase
from ..data.formats import messages_text, prompt_messages, target_messages
from ..data.types import Dataset, Document, Example, Message, Unpaired
from ..errors import EXIT_VERDICT, TunesmithError
from ..model.generate import shared_prefix_length
from ..train.parallel import world_from_env
from .answers import Answer, AnswerStore, answer_key
from .candidates import (
    Candidate,
    parse_candidates,
    run_system_prompt,
    run_train_data,
    shared_base,
    spec_head,
    split_specs,
)
from .cost import Usage, device_rate, endpoint_usage, local_usage
from .endpoint import ChatEndpoint, EndpointError, api_key
from .engine import Engine, embedder_fn, local_judge_fn
from .judge import Judge, JudgeResult, LocalJudge, judge_from_url, judge_pairs
from .ladder import Rung, Worth, ladder, worth
from .metrics import JsonFields, Metric, parse_metric, per_field_scores, score_all, summarize_details
from .output import print_outcome, write_outputs
from .prompts import PromptBuilder, label_set
from .report import build_results
from .retrieval import read_passages
from .shards import Shards, eval_shards
from .stats import Comparison, compare
from .stats import require_win as check_win

DataLike = str | Path | list[str] | Dataset | Sequence[Example]


class NoWin(TunesmithError):
    """The verdict failed: --require-win (a tuned candidate did not significantly beat every baseline) or
    --require-worth (the fine-tune did not beat the best rung without it)."""

    exit_code = EXIT_VERDICT


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
    usage: dict[str, Usage] = field(default_factory=dict)
    ladder: list[Rung] = field(default_factory=list)
    worth: Worth | None = None

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
            "usage": {n: u.to_dict() for n, u in self.usage.items()},
            "worth": self.worth.line if self.worth else None,
            "worth_it": self.worth.worth_it if self.worth else None,
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

    @property
    def worth_it(self) -> bool:
        """Whether the best fine-tune significantly beats the best rung without fine-tuning."""
        return bool(self.main.worth and self.main.worth.worth_it)

    def summary(self) -> dict[str, Any]:
        """What run.json records about the eval."""
        out = {**self.main.summary(), "won": self.won, "reasons": self.reasons, "worth_it": self.worth_it,
               "out_dir": str(self.out_dir) if self.out_dir else None}
        if self.regression is not None:
            out["regression"] = self.regression.summary()
        return out


def eval_config(config: EvalConfig | dict | str | Sequence[str] | None, settings: dict[str, Any]) -> EvalConfig:
    """An EvalConfig from a config, a dict or a candidate list, with keyword settings on top (validated once)."""
    if isinstance(config, EvalConfig):
        raw = config.model_dump(exclude_unset=True)
    elif isinstance(config, dict):
        raw = dict(config)
    elif config is None:
        raw = {}
    else:
        raw = {"candidates": split_specs(config)}
    for key in ("candidates", "metrics"):
        value = settings.get(key, raw.get(key))
        if isinstance(value, str):
            settings[key] = split_specs(value) if key == "candidates" else [value]
    return parse_section(EvalConfig, {**raw, **settings}, "eval")


def evaluate(data: DataLike, config: EvalConfig | dict | str | Sequence[str] | None = None, *,
             train_data: DataLike | None = None, regression: DataLike | None = None, judge: str | Judge | None = None,
             console: Console | None = None, columns: dict[str, str] | None = None,
             tuned_run: str | Path | None = None, **settings: Any) -> EvalResult:
    """Compare the candidates on held-out `data` and write results.json / report.md / report.html into
    `config.out` (when set). `config` is an EvalConfig, a dict of its keys or the candidates; keyword
    `settings` override its keys (`evaluate(data, candidates=[...], metrics=["exact"], out="eval")`).
    Raises NoWin (exit code 6) after writing when require_win / require_worth fails."""
    console = console or make_console()
    cfg = eval_config(config, settings)
    cands = parse_candidates(cfg.candidates, tuned_run, cfg.by_stage)
    if not cfg.metrics:
        raise TunesmithError("no metric given", "add --metric exact (or loss, choice, f1, json_fields, ...)")
    # Everything that can be wrong with the inputs fails here, before a model is loaded.
    base_spec = shared_base(cands, cfg.base)
    eval_set = subsample(load_set(data, cfg.data_format, columns, "eval data"), cfg.max_examples, cfg.sample_seed)
    documents = isinstance(eval_set[0], Document)  # scored by perplexity: no references (eval/documents.py)
    references = [] if documents else [reference_text(reference_messages(ex)) for ex in eval_set]
    metrics = [parse_metric(spec, references) for spec in cfg.metrics]
    _check_logprob_candidates(metrics, cands)
    reg_data = regression if regression is not None else cfg.regression
    reg_set = None
    if reg_data is not None:
        reg_set = subsample(load_set(reg_data, cfg.data_format, columns, "regression data"), cfg.max_examples,
                            cfg.sample_seed)
    train = None
    if any(c.fewshot or c.rag or c.labels or c.knn for c in cands) and not documents:
        train, where = _train_examples(train_data if train_data is not None else cfg.train_data, cands,
                                       cfg.data_format, columns)
        console.print(f"shots, labels and retrieval use {where} (few-shot seed {cfg.fewshot_seed})", highlight=False)
    _check_prompt_inputs(cands, train, cfg)
    _check_documents(cands, cfg, judge, {"eval": eval_set, "regression": reg_set})
    shards = eval_shards()
    if shards is not None and not shards.main:
        console = Console(quiet=True)
    ctx = _context(cfg, cands, base_spec, judge, train, console, shards)
    if not ctx.main:
        cfg = ctx.cfg = cfg.model_copy(update={"out": None})  # rank 0 writes the results
    ctx.limit = resolve_limit(cfg.max_new_tokens, references, ctx.tokenizer, console)
    console.print(f"evaluating {', '.join(c.name for c in cands)} on {len(eval_set)} examples "
                  f"(base model: {base_spec}, max_new_tokens {ctx.limit})", soft_wrap=True, highlight=False)
    main = compare_on("eval", ctx, eval_set, cands, cfg.metrics)
    reg = None
    if reg_set is not None:
        reg_cands = regression_candidates(cands)
        console.print(f"regression set: {len(reg_set)} examples, {', '.join(c.name for c in reg_cands)}",
                      soft_wrap=True, highlight=False)
        reg = compare_on("regression", ctx, reg_set, reg_cands, cfg.metrics)
    won, reasons = check_win(main.comparisons)
    out = Path(cfg.out) if cfg.out else None
    result = EvalResult(main, won, reasons, out, reg)
    if out is not None:
        write_outputs(result, out, base_spec)
        console.print(f"report: {out / 'report.html'}", soft_wrap=True, highlight=False)
    print_outcome(result, console)
    _require(cfg, result)
    return result


def _require(cfg: EvalConfig, result: EvalResult) -> None:
    if cfg.require_win and not result.won:
        raise NoWin("the fine-tune did not significantly beat every baseline:\n  " + "\n  ".join(result.reasons),
                    "look at the worst failures in report.html; more data or epochs, or a better baseline prompt, "
                    "may change the verdict; with few eval examples only large effects are significant")
    if cfg.require_worth and not result.worth_it:
        line = result.main.worth.line if result.main.worth else "there is no fine-tune and baseline to compare"
        raise NoWin(f"--require-worth: {line}", "the fine-tune must significantly beat the best rung without it")


class _JudgedOnRank0:
    """The judge as the other ranks of a torchrun job see it: rank 0 alone judges (and reports)."""


JUDGED_ON_RANK_0 = _JudgedOnRank0()


@dataclass
class _Context:
    """What every data set of one eval shares: the settings, the loaded models, clients and prices."""

    cfg: EvalConfig
    engine: Engine | None
    tokenizer: Any
    endpoints: dict[str, ChatEndpoint]
    prices: dict[str, Any]
    rate: tuple[float, str] | None
    judge: Judge | None
    train: list[Example] | None
    system_prompt: str | None
    console: Console
    embed: Callable[[Sequence[str]], Any] | None = None
    limit: int = 64
    shards: Shards | None = None  # the processes of a torchrun job sharing the work (eval/shards.py)

    @property
    def main(self) -> bool:
        """Whether this process writes, prints, judges and asks endpoints (rank 0, or the only process)."""
        return self.shards is None or self.shards.main


def _context(cfg: EvalConfig, cands: Sequence[Candidate], base_spec: str, judge: str | Judge | None,
             train: list[Example] | None, console: Console, shards: Shards | None = None) -> _Context:
    """Check the remote parts, then load what runs locally (the base model only when something needs it)."""
    from ..prices import load_prices

    prices = load_prices(cfg.prices)
    endpoints = {c.name: ChatEndpoint(c.url, c.model, api_key=api_key("TUNESMITH_API_KEY", "OPENAI_API_KEY"),  # type: ignore[arg-type]
                                      timeout=cfg.endpoint_timeout, retries=cfg.endpoint_retries,
                                      concurrency=cfg.endpoint_concurrency, rate_limit=cfg.endpoint_rate_limit)
                 for c in cands if c.kind == "endpoint"}
    judge = judge if judge is not None else cfg.judge
    remote_judge = judge_from_url(judge, api_key=_judge_key()) if isinstance(judge, str) and _is_url(judge) else None
    if cfg.resume and not cfg.out:
        raise TunesmithError("--resume needs the output folder of the eval it continues", "pass --out DIR")
    if cfg.docs is not None and not Path(cfg.docs).is_dir():
        raise TunesmithError(f"--docs {cfg.docs}: no such folder", "give a folder of .txt/.md files")
    local_judge = isinstance(judge, str) and remote_judge is None
    embed_needed = any(c.retriever == "embed" and (c.rag or c.knn) for c in cands)
    needs_engine = (any(c.local for c in cands) or local_judge or (embed_needed and cfg.embedder is None))
    system_prompt = cfg.system_prompt or run_system_prompt(cands)
    device, precision = cfg.device or "auto", cfg.precision or "auto"
    engine = None
    if needs_engine:
        with phase("load model", console=console):
            engine = Engine(base_spec, cands, device, precision, cfg.batch_size, 64, system_prompt,
                            plain_base=local_judge and judge in (base_spec, "base"))
    tokenizer = engine.tokenizer if engine is not None else _tokenizer(base_spec)
    if shards is not None and not shards.main and judge is not None:
        the_judge: Judge | None = JUDGED_ON_RANK_0  # type: ignore[assignment]
    else:
        the_judge = remote_judge or _local_judge(judge, engine, base_spec, device, precision, cfg.batch_size)
    rate = device_rate(prices, cfg.device_price, *_device_names(engine))
    ctx = _Context(cfg, engine, tokenizer, endpoints, prices, rate, the_judge, train, system_prompt, console,
                   shards=shards)
    if embed_needed:
        ctx.embed = embedder_fn(cfg.embedder, device, precision, cfg.batch_size) if cfg.embedder else engine.embed  # type: ignore[union-attr]
    return ctx


def _check_prompt_inputs(cands: Sequence[Candidate], train: list[Example] | None, cfg: EvalConfig) -> None:
    """Label lists and documents are checked before any model is loaded."""
    if any(c.labels for c in cands):
        label_set(train or [])
    docs = [c.name for c in cands if c.docs]
    if docs and cfg.docs is None:
        raise TunesmithError(f"{docs[0]} needs documents to retrieve from", "pass --docs FOLDER")
    if docs:
        read_passages(cfg.docs)  # type: ignore[arg-type]


def _check_documents(cands: Sequence[Candidate], cfg: EvalConfig, judge: str | Judge | None,
                     sets: dict[str, Sequence[Example] | None]) -> None:
    """Data sets of documents take log-prob metrics of local candidates only (checked before loading a model)."""
    from .documents import check_documents_eval

    for name, examples in sets.items():
        if examples and isinstance(examples[0], Document):
            set_cands = cands if name == "eval" else regression_candidates(cands)
            check_documents_eval(name, cfg.metrics, set_cands, judge if judge is not None else cfg.judge)


def _device_names(engine: Engine | None) -> tuple[str, str]:
    if engine is None or engine.rt.device.type != "cuda":
        return ("cpu", "") if engine is None or engine.rt.device.type == "cpu" else (engine.rt.device.type, "")
    import torch

    return "cuda", torch.cuda.get_device_name(engine.rt.device)


def _tokenizer(base_spec: str):
    """Only endpoints and votes: the base model's tokenizer still counts tokens and sets the token limit."""
    from ..model.load import load_tokenizer

    return load_tokenizer(base_spec)


def _check_logprob_candidates(metrics: Sequence[Metric], cands: Sequence[Candidate]) -> None:
    remote = [c.name for c in cands if not c.local]
    if remote and any(m.needs_logprobs for m in metrics):
        raise TunesmithError(f"the loss metric needs log-probs, which {', '.join(remote)} cannot give",
                             "evaluate endpoints and knn with text metrics (exact, choice, f1, ...), or leave "
                             "them out of a loss eval")


AUTO_MARGIN = 8  # tokens added to the longest reference for max_new_tokens: auto
AUTO_MAX = 2048


def resolve_limit(setting: int | str, references: Sequence[str], tokenizer, console: Console) -> int:
    """`auto`: the longest reference's token count (+ its end-of-turn token) plus a margin of a quarter,
    at least AUTO_MARGIN tokens. A fixed limit shorter than a reference is reported: those answers are cut."""
    lengths = [len(tokenizer(r, add_special_tokens=False)["input_ids"]) + 1 for r in references]
    longest = max(lengths, default=1)
    if setting == "auto":
        return min(AUTO_MAX, longest + max(AUTO_MARGIN, longest // 4))
    limit = int(setting)
    over = sum(n > limit for n in lengths)
    if over:
        console.print(f"[yellow]warning[/yellow]: {over} reference(s) are longer than max_new_tokens {limit} "
                      f"(the longest is {longest} tokens): answers that long are cut off and scored as cut; "
                      "raise max_new_tokens or use auto", highlight=False, soft_wrap=True)
    return limit


def compare_on(name: str, ctx: _Context, dataset: Sequence[Example], cands: Sequence[Candidate],
               metric_specs: Sequence[str]) -> SetResult:
    if isinstance(dataset[0], Document):
        from .documents import compare_documents

        return compare_documents(name, ctx.engine, dataset, cands, metric_specs, ctx.judge, ctx.console)
    prompts = [prompt_messages(ex) for ex in dataset]
    targets = [reference_messages(ex) for ex in dataset]
    references = [reference_text(t) for t in targets]
    metric_list = [parse_metric(spec, references) for spec in metric_specs]
    builder = PromptBuilder(prompts, ctx.train, ctx.cfg.docs, ctx.cfg.fewshot_seed, ctx.system_prompt, ctx.embed)
    seen: dict[str, list[tuple[Message, ...]]] = {}
    added: dict[str, dict[str, Any]] = {}
    for c in cands:
        if c.generates:
            seen[c.name], added[c.name] = builder.build(c)
    answers: dict[str, list[Answer]] = {}
    usage: dict[str, Usage] = {}
    if ctx.judge is not None or any(not m.needs_logprobs for m in metric_list):
        for c in cands:
            with phase(f"{name} {c.name}", len(prompts), ctx.console, "answers"):
                answers[c.name], usage[c.name] = answer_all(ctx, name, c, seen.get(c.name), builder)
    outputs = {n: [a.text for a in ans] for n, ans in answers.items()}
    scores = {m.name: {c.name: _score(m, ctx, c, seen.get(c.name), targets, outputs.get(c.name),
                                      references, dataset) for c in cands} for m in metric_list}
    tuned = [c.name for c in cands if c.tuned]
    baselines = [c.name for c in cands if not c.tuned]
    pairs = candidate_pairs(cands)
    comparisons = [compare(scores[m.name], tuned, baselines, m, pairs=pairs) for m in metric_list]
    primary = comparisons[0]
    endpoints = [c.name for c in cands if c.kind == "endpoint"]
    worth_result = worth(primary, scores[primary.metric], tuned, baselines, usage, endpoints) if usage else None
    rungs = ladder(primary, usage, tuned) if usage else []
    texts = [messages_text(p) for p in prompts]
    examples = [{"prompt": t, "reference": r} for t, r in zip(texts, references, strict=True)]
    results = build_results(examples, [c.name for c in cands], scores, outputs)
    for i, row in enumerate(results["examples"]):
        row["answers"] = {n: {k: v for k, v in a[i].to_dict().items() if k != "text"} for n, a in answers.items()}
    judged = {}
    if ctx.judge is not None and ctx.main:
        for t, b in pairs:
            judged[(t, b)] = judge_pairs(ctx.judge, texts, outputs[t], outputs[b])
    results.update({"set": name, "max_new_tokens": ctx.limit, "comparisons": [c.to_dict() for c in comparisons],
                    "fewshot": {n: a["fewshot"] for n, a in added.items() if "fewshot" in a},
                    "prompts_added": added, "usage": {n: u.to_dict() for n, u in usage.items()},
                    "ladder": [asdict(r) for r in rungs], "worth": worth_result.to_dict() if worth_result else None,
                    "metric_details": _details(metric_list, outputs, references),
                    "judge": [_judge_dict(t, b, r, per_example=True) for (t, b), r in judged.items()]})
    return SetResult(name, [c.name for c in cands], tuned, baselines, comparisons, outputs, results, judged,
                     usage, rungs, worth_result)


def candidate_pairs(cands: Sequence[Candidate]) -> list[tuple[str, str]]:
    """Each tuned candidate against every baseline and, for a stage of a multi-stage run, the stage before."""
    baselines = [c.name for c in cands if not c.tuned]
    pairs = []
    for c in cands:
        if c.tuned:
            pairs += ([(c.name, c.previous_stage)] if c.previous_stage else []) + [(c.name, b) for b in baselines]
    return pairs


def answer_all(ctx: _Context, set_name: str, c: Candidate, prompts: list[tuple[Message, ...]] | None,
               builder: PromptBuilder) -> tuple[list[Answer], Usage]:
    """The candidate's answers to every prompt (reusing kept ones with --resume) and what they cost."""
    if c.kind == "knn":
        builder.index(c)  # once, like training: not part of any query's cost
        started = time.perf_counter()
        texts = builder.knn_answers(c)
        share = (time.perf_counter() - started) / max(1, len(texts))
        answers = [Answer(t, None, None, False, share, None, share) for t in texts]
        return answers, local_usage(c.name, f"majority of {c.knn} nearest training examples ({c.retriever}), "
                                            "no language model", answers, None, ctx.rate)
    assert prompts is not None
    messages = [_chat_messages(p, ctx.system_prompt) for p in prompts]
    ids = [_prompt_ids(ctx, c, p, m) for p, m in zip(prompts, messages, strict=True)]
    cacheable = float(shared_prefix_length(ids)) if len(ids) > 1 else 0.0
    store = AnswerStore(Path(ctx.cfg.out) / "answers" / set_name, c.name, ctx.cfg.resume) if ctx.cfg.out else None
    identity = c.name if c.kind == "endpoint" else f"{c.name} on {ctx.engine.ran_on(c)}"  # type: ignore[union-attr]
    keys = [answer_key(identity, m, ctx.limit) for m in messages]
    known = {i: store.get(k) for i, k in enumerate(keys)} if store else {}
    missing = [i for i in range(len(keys)) if known.get(i) is None]
    if ctx.shards is not None:
        missing = ctx.shards.from_main(lambda: missing)  # rank 0 holds the answers kept from before
    if known and len(missing) < len(keys):
        ctx.console.print(f"[dim]  {len(keys) - len(missing)} answers of {c.name} kept from before[/dim]",
                          highlight=False)
        advance(len(keys) - len(missing))
    if c.kind == "endpoint":  # asked once: by rank 0 under torchrun, whose answers reach the others below
        fresh = _ask_endpoint(ctx, c, [messages[i] for i in missing], [keys[i] for i in missing], store) \
            if ctx.main else []
    else:
        fresh = _local_answers(ctx, c, [prompts[i] for i in missing])
        for i, a in zip(missing, fresh, strict=True):
            if store is not None:
                store.put(keys[i], a)

    def in_order() -> list[Answer]:
        got = dict(zip(missing, fresh, strict=True))
        return [got[i] if i in got else known[i] for i in range(len(keys))]  # type: ignore[misc]

    answers = _on_main(ctx, in_order)
    if c.kind == "endpoint":
        local_prompt = sum(len(x) for x in ids) / len(ids) if ids else None
        return answers, endpoint_usage(c.name, str(c.url), str(c.model), answers,
                                       sum(a.seconds for a in answers), local_prompt, cacheable, ctx.prices)
    search = builder.search_seconds.get(c.name, 0.0) / max(1, len(answers))  # +rag / +docs retrieval per query
    if search:
        answers = [replace(a, seconds=a.seconds + search, machine_seconds=a.machine_seconds + search)
                   for a in answers]
    return answers, local_usage(c.name, ctx.engine.ran_on(c), answers, cacheable, ctx.rate)  # type: ignore[union-attr]


def _local_answers(ctx: _Context, c: Candidate, prompts: list[tuple[Message, ...]]) -> list[Answer]:
    """The local model's answers; under torchrun each rank generates its share of the prompts."""
    def answer(part: list[tuple[Message, ...]]) -> list[Answer]:
        return ctx.engine.answer(c, part, ctx.limit) if part else []  # type: ignore[union-attr]

    if ctx.shards is None:
        return answer(prompts)
    return ctx.shards.split(answer, prompts, Answer.to_dict, lambda d: Answer(**d))


def _on_main(ctx: _Context, fn: Callable[[], list[Answer]]) -> list[Answer]:
    """fn() in this process, or under torchrun on rank 0 alone with every rank getting its answers."""
    if ctx.shards is None:
        return fn()
    return ctx.shards.from_main(fn, lambda xs: [a.to_dict() for a in xs], lambda xs: [Answer(**d) for d in xs])


def _prompt_ids(ctx: _Context, c: Candidate, prompt: Sequence[Message], messages: list[dict]) -> list[int]:
    """The prompt's tokens as the local model sees them (an endpoint's prompt: with the base's template)."""
    if ctx.engine is not None:
        return ctx.engine.prompt_ids(c if c.local else Candidate("base"), prompt)
    ids = ctx.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _ask_endpoint(ctx: _Context, c: Candidate, messages: list[list[dict]], keys: list[str],
                  store: AnswerStore | None) -> list[Answer]:
    client = ctx.endpoints[c.name]

    tick = advancer()  # answers arrive on the client's worker threads

    def keep(i: int, reply) -> None:
        tick(1)
        if store is not None:
            store.put(keys[i], _from_reply(reply))

    try:
        replies = client.chat_many(messages, ctx.limit, on_answer=keep)
    except EndpointError as exc:
        kept = f"; the {len(store.known)} answers received are kept in {store.path}, and --resume continues " \
               "without asking them again" if store is not None else "; pass --out DIR to keep answers for --resume"
        raise EndpointError(f"{c.name}: {exc.message}{kept}", exc.hint) from None
    return [_from_reply(r) for r in replies]


def _from_reply(reply) -> Answer:
    return Answer(reply.text, reply.prompt_tokens, reply.completion_tokens, reply.hit_limit, reply.seconds,
                  reply.cached_tokens, reply.seconds)


def _chat_messages(prompt: Sequence[Message], system_prompt: str | None) -> list[dict]:
    """The prompt as chat messages; the run's system prompt goes first when the prompt has none, as the
    local renderer does."""
    out = [{"role": m.role, "content": m.content} for m in prompt]
    if system_prompt and not any(m["role"] == "system" for m in out):
        out.insert(0, {"role": "system", "content": system_prompt})
    return out


def _details(metrics: Sequence[Metric], outputs: dict[str, list[str]], references: list[str]) -> dict[str, Any]:
    """Per metric and candidate, the means of the metric's per-example facts (and json_fields' per-field table)."""
    out: dict[str, Any] = {}
    for m in metrics:
        if m.needs_logprobs:
            continue
        by = {}
        for name, texts in outputs.items():
            by[name] = summarize_details(m, texts, references)
            if isinstance(m, JsonFields):
                by[name]["per_field"] = per_field_scores(m, texts, references)
        out[m.name] = by
    return out


def _score(metric: Metric, ctx: _Context, cand: Candidate, prompts: Sequence[Sequence[Message]] | None,
           targets: Sequence[Sequence[Message]], outputs: list[str] | None, references: list[str],
           examples: Sequence[Example]) -> list[float]:
    if metric.needs_logprobs:
        assert ctx.engine is not None and prompts is not None

        def nll(rows: list[int]) -> list[float]:
            return ctx.engine.nll(cand, [prompts[i] for i in rows], [targets[i] for i in rows]) if rows else []  # type: ignore[union-attr]

        with phase(f"{metric.name} {cand.name}", len(targets), unit="answers"):
            rows = list(range(len(targets)))
            values = ctx.shards.split(nll, rows, float, float) if ctx.shards else nll(rows)
        return [metric.score_nll(x) for x in values]  # type: ignore[attr-defined]
    return score_all(metric, outputs or [], references, examples)


def reference_messages(example: Example) -> tuple[Message, ...]:
    target = tuple(m for m in target_messages(example) if m.role == "assistant")
    if not target:
        raise TunesmithError(f"eval example {example.source or ''} has no assistant answer to compare with",
                             "each eval example needs a reference reply as its last assistant turn")
    return target


def reference_text(target: Sequence[Message]) -> str:
    return "\n".join(m.text for m in target)  # a tool call in its canonical syntax (Message.text)


def regression_candidates(cands: Sequence[Candidate]) -> list[Candidate]:
    """On a general set the question is what the fine-tune broke: each tuned run against the plain base."""
    runs = list({c.run.resolve(): Candidate(spec_head(c.name), c.run, info=c.info, kind="run")
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
        name = next(c.name for c in cands if c.fewshot or c.rag or c.labels or c.knn)
        raise TunesmithError(f"{name} needs training examples, and no training data was given",
                             "pass --train-data FILE (examples are never taken from the eval data)")
    return load_set(found[0], found[1], columns, "training data"), f"{found[0]} (the run's training data)"


# ---------------------------------------------------------------- judge, outputs, run.json

def _is_url(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def _judge_key() -> str | None:
    return os.environ.get("TUNESMITH_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")


def _local_judge(judge: str | Judge | None, engine: Engine | None, base_spec: str, device: str, precision: str,
                 batch_size: int) -> Judge | None:
    """None, a ready judge object, or a local model spec (the loaded base model answers when it is the base)."""
    if judge is None or not isinstance(judge, str):
        return judge
    if judge in (base_spec, "base") and engine is not None:
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
    returns that entry. Raises NoWin (after writing) when eval.require_win / require_worth fails."""
    cfg, ev = run.config, run.config.eval
    if ev is None:
        raise TunesmithError("this run's config has no eval: section", "add one, or run `tunesmith eval`")
    specs = split_specs(ev.candidates)
    needs_train = ev.train_data is None and any(_uses_train(s) for s in specs)
    eval_set, train = run_datasets(cfg, needs_train=needs_train)
    only_base = all(spec_head(s) == "base" or not (spec_head(s) == "tuned" or Path(spec_head(s)).exists())
                    for s in specs)
    settings = {"out": str(Path(run.path) / "eval"), "device": ev.device or cfg.device,
                "precision": ev.precision or cfg.precision,
                "system_prompt": ev.system_prompt or cfg.data.system_prompt,
                "base": ev.base or (cfg.model if only_base else None), "require_win": False, "require_worth": False}
    result = evaluate(eval_set, ev, train_data=train if ev.train_data is None else None, console=console,
                      columns=cfg.data.columns or None, tuned_run=run.path, **settings)
    summary = result.summary()
    if world_from_env()[0] == 0:
        _record(Path(run.path), summary)
    report = Path(run.path) / "eval" / "report.html"
    if ev.require_win and not result.won:
        raise NoWin("eval.require_win: the fine-tune did not significantly beat every baseline:\n  "
                    + "\n  ".join(result.reasons), f"see {report}")
    if ev.require_worth and not result.worth_it:
        raise NoWin(f"eval.require_worth: {result.main.worth.line if result.main.worth else 'nothing to compare'}",
                    f"see {report}")
    return summary


def _uses_train(spec: str) -> bool:
    return any(f"+{m}" in spec for m in ("fewshot:", "rag:", "labels")) or spec.startswith("knn:")


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
