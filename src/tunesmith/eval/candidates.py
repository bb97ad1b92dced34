"""What an eval compares: candidate specs (`base`, `base+fewshot:K`, `tuned`, `runs/x`, `runs/x+fewshot:K`)
parsed into candidates that share one base model, and few-shot prompts built from the training data.

Every candidate answers the same prompts. A few-shot candidate sees the same K training examples before every
prompt (as earlier user/assistant turns, after the system message); they are drawn with a fixed seed and
never include an example whose prompt also occurs in the eval set.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from ..data.formats import messages_text, prompt_messages, target_messages
from ..data.types import Example, Message
from ..errors import TunesmithError
from ..model.runs import is_run_dir, run_info

FEWSHOT = "+fewshot:"
SPEC_HINT = "candidates are base, base+fewshot:K, a run folder (runs/x), runs/x+fewshot:K, or tuned inside a config"


@dataclass(frozen=True)
class Candidate:
    """One thing under test. `run` is None for the plain base model; `fewshot` is K (0 = none)."""

    name: str
    run: Path | None = None
    fewshot: int = 0
    info: dict | None = None  # the run's run.json

    @property
    def tuned(self) -> bool:
        return self.run is not None

    @property
    def adapter(self) -> Path | None:
        return None if self.run is None else self.run / "adapter"


def split_specs(specs: str | Sequence[str]) -> list[str]:
    """`"base, base+fewshot:5"` or a list of specs (each may itself hold commas) → clean spec strings."""
    items = [specs] if isinstance(specs, str) else list(specs)
    out = [part.strip() for item in items for part in str(item).split(",")]
    return [part for part in out if part]


def parse_candidate(spec: str, tuned_run: str | Path | None = None) -> Candidate:
    head, sep, k = spec.rpartition(FEWSHOT) if FEWSHOT in spec else (spec, "", "")
    fewshot = 0
    if sep:
        if not k.isdigit() or int(k) < 1:
            raise TunesmithError(f"candidate '{spec}': the number of few-shot examples must be a positive "
                                 f"integer, got '{k}'", "e.g. base+fewshot:5")
        fewshot = int(k)
    head = head.rstrip("/") or head
    name = head + (f"{FEWSHOT}{fewshot}" if fewshot else "")
    if head == "base":
        return Candidate(name, None, fewshot)
    if head == "tuned":
        if tuned_run is None:
            raise TunesmithError(f"candidate '{spec}': 'tuned' means the run being trained and only works "
                                 "inside a config's eval: section", "name the run folder instead, e.g. runs/x")
        return _run_candidate(name, Path(tuned_run), fewshot)
    if Path(head).exists():
        return _run_candidate(name, Path(head), fewshot)
    raise TunesmithError(f"unknown candidate '{spec}': not 'base', not 'tuned', and no folder {head} exists",
                         SPEC_HINT)


def _run_candidate(name: str, path: Path, fewshot: int) -> Candidate:
    if not is_run_dir(path):
        raise TunesmithError(f"candidate '{name}': {path} is not a finished tunesmith run (it needs run.json "
                             "and adapter/ inside)", "pass the folder `tunesmith train` wrote, e.g. runs/x")
    info = run_info(path)
    if info.get("adapter_kind") == "full":
        raise TunesmithError(f"candidate '{name}': {path} is a full fine-tune, which cannot share a base model "
                             "with the other candidates",
                             "evaluate it as the base model instead: --base " + str(path / "adapter"))
    return Candidate(name, path, fewshot, info)


def parse_candidates(specs: str | Sequence[str], tuned_run: str | Path | None = None) -> list[Candidate]:
    names = split_specs(specs)
    if not names:
        raise TunesmithError("no candidates given", SPEC_HINT)
    candidates = [parse_candidate(spec, tuned_run) for spec in names]
    seen: set[str] = set()
    for c in candidates:
        if c.name in seen:
            raise TunesmithError(f"candidate '{c.name}' is listed twice", "list each candidate once")
        seen.add(c.name)
    return candidates


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
