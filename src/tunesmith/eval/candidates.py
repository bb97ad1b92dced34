"""What an eval compares: candidate specs parsed into candidates, and the base model the local ones share.

A spec is a head and any number of prompt modifiers:
- heads: `base` (the base model), a run folder or `tuned` (the run being trained: the fine-tune),
  `http(s)://host/v1#MODEL` (an OpenAI-compatible endpoint), `knn:K` (no language model: the majority answer
  of the K most similar training examples);
- modifiers: `+fewshot:K`, `+rag:K` (the K most similar training examples as shots), `+docs:K` (the K most
  relevant passages of --docs), `+labels` (a system prompt listing the labels), `+prompt:FILE` (the system
  prompt in FILE). `+rag:K:embed` / `knn:K:embed` retrieve by embedding instead of BM25.

Run folders are the tuned candidates; everything else is a rung of the ladder without fine-tuning.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..data.formats import messages_text, prompt_messages, target_messages
from ..data.types import Example, Message
from ..errors import TunesmithError
from ..model.runs import is_run_dir, run_info

FEWSHOT = "+fewshot:"
MODIFIERS = ("fewshot", "rag", "docs", "labels", "prompt")
SPEC_HINT = ("candidates are base, a run folder (runs/x), http(s)://host/v1#MODEL or knn:K, each optionally "
             "with +fewshot:K, +rag:K, +docs:K, +labels or +prompt:FILE (e.g. base+labels+rag:5); tuned inside "
             "a config")
_SPLIT = re.compile(r"\+(?=(?:fewshot|rag|docs|labels|prompt)(?::|\+|$))")
RETRIEVERS = ("bm25", "embed")


@dataclass(frozen=True)
class Candidate:
    """One thing under test. `kind` is base | run | endpoint | knn; the prompt modifiers say what is added
    to every prompt (0 / False / None = nothing)."""

    name: str
    run: Path | None = None
    fewshot: int = 0
    info: dict | None = None  # the run's run.json
    kind: str = "base"
    url: str | None = None  # endpoint: the server, and the model it serves
    model: str | None = None
    rag: int = 0
    docs: int = 0
    labels: bool = False
    prompt_file: Path | None = None
    knn: int = 0
    retriever: str = "bm25"  # for rag and knn
    previous_stage: str | None = None  # a stage of a multi-stage run: the candidate of the stage before
    modifiers: tuple[str, ...] = field(default_factory=tuple)

    @property
    def tuned(self) -> bool:
        return self.run is not None

    @property
    def adapter(self) -> Path | None:
        return None if self.run is None else self.run / "adapter"

    @property
    def generates(self) -> bool:
        """Whether a language model answers (a knn candidate only votes)."""
        return self.kind != "knn"

    @property
    def local(self) -> bool:
        return self.kind in ("base", "run")

    @property
    def head(self) -> str:
        return self.name.split("+", 1)[0] if self.kind != "endpoint" else f"{self.url}#{self.model}"


def split_specs(specs: str | Sequence[str]) -> list[str]:
    """`"base, base+fewshot:5"` or a list of specs (each may itself hold commas) → clean spec strings."""
    items = [specs] if isinstance(specs, str) else list(specs)
    out = [part.strip() for item in items for part in str(item).split(",")]
    return [part for part in out if part]


def spec_head(spec: str) -> str:
    """The head of a spec, without its modifiers (`runs/x+fewshot:5` → `runs/x`)."""
    return _SPLIT.split(spec.strip())[0].rstrip("/") or spec


def parse_candidate(spec: str, tuned_run: str | Path | None = None) -> Candidate:
    head, *mods = _SPLIT.split(spec.strip())
    fields = _modifiers(spec, mods)
    head = head.rstrip("/") or head
    name = "+".join([head, *fields.pop("_names")])
    if head == "base":
        return Candidate(name, **fields)
    if head.startswith(("http://", "https://")):
        from .endpoint import split_endpoint

        url, model = split_endpoint(head)
        return Candidate(name, kind="endpoint", url=url, model=model, **fields)
    if head.startswith("knn:"):
        return _knn(spec, head, fields)
    if head == "tuned":
        if tuned_run is None:
            raise TunesmithError(f"candidate '{spec}': 'tuned' means the run being trained and only works "
                                 "inside a config's eval: section", "name the run folder instead, e.g. runs/x")
        return _run_candidate(name, Path(tuned_run), fields)
    if Path(head).exists():
        return _run_candidate(name, Path(head), fields)
    raise TunesmithError(f"unknown candidate '{spec}': not 'base', 'tuned', a URL or knn:K, and no folder {head} "
                         "exists", SPEC_HINT)


def _count(spec: str, what: str, value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise TunesmithError(f"candidate '{spec}': the number after {what}: must be a positive integer, got "
                             f"'{value}'", f"e.g. base+{what}:5")
    return int(value)


def _modifiers(spec: str, mods: Sequence[str]) -> dict:
    out: dict = {"_names": [], "modifiers": []}
    for mod in mods:
        kind, _, arg = mod.partition(":")
        if kind in out["modifiers"]:
            raise TunesmithError(f"candidate '{spec}': +{kind} is given twice", "give each modifier once")
        if kind in ("fewshot", "docs"):
            out[kind] = _count(spec, kind, arg)
        elif kind == "rag":
            k, _, retriever = arg.partition(":")
            out["rag"] = _count(spec, "rag", k)
            out["retriever"] = _retriever(spec, retriever)
        elif kind == "labels":
            if arg:
                raise TunesmithError(f"candidate '{spec}': +labels takes no argument",
                                     "the labels come from the training data")
            out["labels"] = True
        else:  # prompt
            path = Path(arg)
            if not arg or not path.is_file():
                raise TunesmithError(f"candidate '{spec}': +prompt:FILE needs an existing text file, got '{arg}'",
                                     "write the system prompt in a file, e.g. base+prompt:prompt.txt")
            out["prompt_file"] = path
        out["_names"].append(mod)
        out["modifiers"].append(kind)
    if out.get("fewshot") and out.get("rag"):
        raise TunesmithError(f"candidate '{spec}': +fewshot and +rag both add shots", "use one of them")
    out["modifiers"] = tuple(out["modifiers"])
    return out


def _retriever(spec: str, name: str) -> str:
    name = name or "bm25"
    if name not in RETRIEVERS:
        raise TunesmithError(f"candidate '{spec}': unknown retriever '{name}'", "use bm25 (default) or embed")
    return name


def _knn(spec: str, head: str, fields: dict) -> Candidate:
    if fields["modifiers"]:
        raise TunesmithError(f"candidate '{spec}': knn:K takes no prompt modifiers", "it does not prompt a model")
    _, k, retriever = (head.split(":") + [""])[:3]
    return Candidate(head, kind="knn", knn=_count(spec, "knn", k), retriever=_retriever(spec, retriever))


def _run_candidate(name: str, path: Path, fields: dict) -> Candidate:
    if not is_run_dir(path):
        raise TunesmithError(f"candidate '{name}': {path} is not a finished tunesmith run (it needs run.json "
                             "and adapter/ inside)", "pass the folder `tunesmith train` wrote, e.g. runs/x")
    info = run_info(path)
    if info.get("adapter_kind") == "full":
        raise TunesmithError(f"candidate '{name}': {path} is a full fine-tune, which cannot share a base model "
                             "with the other candidates",
                             "evaluate it as the base model instead: --base " + str(path / "adapter"))
    return Candidate(name, path, info=info, kind="run", **fields)


def parse_candidates(specs: str | Sequence[str], tuned_run: str | Path | None = None,
                     by_stage: bool = True) -> list[Candidate]:
    """Candidates in the order given. With `by_stage`, a multi-stage run stands for each of its stages
    (runs/x/stages/1-sft, ..., the run itself last), and each stage is paired with the stage before it."""
    names = split_specs(specs)
    if not names:
        raise TunesmithError("no candidates given", SPEC_HINT)
    candidates = [parse_candidate(spec, tuned_run) for spec in names]
    if by_stage:
        candidates = [s for c in candidates for s in expand_stages(c)]
    candidates = link_stages(candidates)
    seen: set[str] = set()
    for c in candidates:
        if c.name in seen:
            raise TunesmithError(f"candidate '{c.name}' is listed twice", "list each candidate once")
        seen.add(c.name)
    return candidates


def stage_dirs(run: Path, info: dict) -> list[Path]:
    """The stage folders of a multi-stage run, in training order (empty for a one-stage run)."""
    found = [run / "stages" / Path(str(s)).name for s in info.get("stages") or []]
    return [p for p in found if is_run_dir(p)]


def expand_stages(c: Candidate) -> list[Candidate]:
    if c.run is None or len(stage_dirs(c.run, c.info or {})) < 2:
        return [c]
    suffix = c.name[len(spec_head(c.name)):]
    earlier = stage_dirs(c.run, c.info or {})[:-1]
    return [replace(c, name=f"{d}{suffix}", run=d, info=run_info(d)) for d in earlier] + [c]


def link_stages(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Mark each stage candidate with the candidate of the stage before it (same modifiers), when listed."""
    where: dict[tuple[Path, tuple], str] = {}
    for c in candidates:
        if c.run is not None:
            where[(c.run.resolve(), c.modifiers)] = c.name
    out = []
    for c in candidates:
        before = _previous_stage(c)
        previous = where.get((before.resolve(), c.modifiers)) if before is not None else None
        out.append(replace(c, previous_stage=previous) if previous else c)
    return out


def _previous_stage(c: Candidate) -> Path | None:
    if c.run is None:
        return None
    run = c.run.resolve()
    root = run.parent.parent if run.parent.name == "stages" else run
    if root == run and not (c.info or {}).get("stages"):
        return None
    stages = [p.resolve() for p in stage_dirs(root, run_info(root) if is_run_dir(root) else {})]
    if root == run:
        return stages[-2] if len(stages) >= 2 else None
    i = stages.index(run) if run in stages else -1
    return stages[i - 1] if i > 0 else None


def base_identity(info: dict) -> str:
    """What identifies a run's base model: the content hash when recorded, else the resolved spec."""
    base = info.get("base_model") or {}
    return base.get("sha256") or str(base.get("source") or info.get("model") or "default")


def shared_base(candidates: Sequence[Candidate], base: str | None = None) -> str:
    """The one base model spec every tuned candidate was trained on (or `base` when given). Raises when
    the runs disagree with each other, or with `base`."""
    runs = [c for c in candidates if c.info is not None]
    identities = {c.name: base_identity(c.info) for c in runs}  # type: ignore[arg-type]
    if len(set(identities.values())) > 1:
        listing = "; ".join(f"{c.name}: {c.info.get('model')}" for c in runs)  # type: ignore[union-attr]
        raise TunesmithError(f"the runs were trained on different base models ({listing})",
                             "compare runs of one base model per eval; the adapters share one base in memory")
    if base is None:
        return str(runs[0].info.get("model") or "default") if runs else "default"  # type: ignore[union-attr]
    if runs:
        from ..model.load import model_identity

        given = model_identity(base)
        wanted = runs[0].info.get("base_model") or {}  # type: ignore[union-attr]
        mine = given.get("sha256") or given.get("source")
        if (wanted.get("sha256") or wanted.get("source")) not in (None, mine):
            raise TunesmithError(f"--base {base} is not the base model {runs[0].name} was trained on "
                                 f"({runs[0].info.get('model')})",  # type: ignore[union-attr]
                                 "leave --base out to use the runs' own base model")
    return base


def run_system_prompt(candidates: Sequence[Candidate]) -> str | None:
    """The data.system_prompt a tuned run was trained with (from its config.yaml), so every candidate is
    prompted as serving the run would be."""
    import yaml

    for c in candidates:
        if c.run is not None and (c.run / "config.yaml").exists():
            cfg = yaml.safe_load((c.run / "config.yaml").read_text(encoding="utf-8")) or {}
            prompt = (cfg.get("data") or {}).get("system_prompt")
            if prompt:
                return str(prompt)
    return None


def run_train_data(candidates: Sequence[Candidate]) -> tuple[str, str] | None:
    """(spec, format) of the first tuned run's training data, when it is still where run.json says."""
    for c in candidates:
        data = (c.info or {}).get("data") or {}
        spec = data.get("train")
        if isinstance(spec, str) and Path(spec).exists():
            return spec, str(data.get("format") or "auto")
    return None


# ---------------------------------------------------------------- few-shot

def prompt_key(messages: Sequence[Message]) -> str:
    """Prompts match when their non-system turns do, ignoring case and whitespace (a system message
    added to one copy does not make an eval example new)."""
    return " ".join(messages_text([m for m in messages if m.role != "system"]).casefold().split())


def shot_messages(example: Example) -> tuple[Message, ...]:
    """A training example as demonstration turns: its prompt without system messages, then its answer.
    The turns are marked untrained so a log-prob metric scores only the real answer."""
    turns = [m for m in prompt_messages(example) if m.role != "system"] + list(target_messages(example))
    return tuple(replace(m, train=False) for m in turns)


def pick_shots(train: Sequence[Example], k: int, seed: int, exclude: Sequence[Sequence[Message]] = ()
               ) -> list[Example]:
    """K training examples chosen by `seed`, none sharing a prompt with `exclude` (the eval prompts)."""
    banned = {prompt_key(p) for p in exclude}
    eligible = [i for i, ex in enumerate(train)
                if prompt_key(prompt_messages(ex)) not in banned and target_messages(ex)]
    if len(eligible) < k:
        raise TunesmithError(f"few-shot needs {k} training examples whose prompts are not in the eval set; "
                             f"only {len(eligible)} available", "lower K in base+fewshot:K or add training data")
    chosen = sorted(random.Random(seed).sample(eligible, k))
    return [train[i] for i in chosen]


def with_shots(prompt: Sequence[Message], shots: Sequence[Example]) -> tuple[Message, ...]:
    """The prompt with the shots as earlier turns: after any leading system messages, before the rest."""
    prompt = tuple(prompt)
    lead = 0
    while lead < len(prompt) and prompt[lead].role == "system":
        lead += 1
    demos = tuple(m for ex in shots for m in shot_messages(ex))
    return prompt[:lead] + demos + prompt[lead:]


def describe_shots(shots: Sequence[Example]) -> list[str]:
    """Where each shot came from (file:line), for results.json."""
    return [str(ex.source) if ex.source else json.dumps(messages_text(shot_messages(ex))[:80]) for ex in shots]
