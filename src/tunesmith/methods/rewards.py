"""Reward functions for online training (GRPO): each scores a batch of sampled answers, one float each.

Specs, as `method_args.rewards` lists them (docs/grpo.md):
  json_schema:FILE       1 when the answer is JSON (a markdown code fence allowed) that validates, else 0
  regex:PATTERN          1 when the answer fully matches; with a named group `answer`, only when that group
                         equals the reference (normalised) — the eval's `regex:` metric
  exact                  1 when the answer equals the reference (normalised: case, spaces, quotes, final dot)
  choice[:LABELS.json]   1 when the answer is one of the labels and equals the reference (labels: the file, or
                         every reference of the training data)
  f1                     token F1 with the reference (SQuAD's)
  length:N               0 up to N tokens, then falling linearly to -1 at max_new_tokens; -1 when cut off
  think[:TAG]            1 for "<think>...</think>" (or TAG) followed by a non-empty answer, else 0
  python:MODULE:FUNCTION the user's function(prediction, reference, example) -> float; MODULE is a module
                         name or a .py file
  judge:URL#MODEL        an OpenAI-compatible grader model's 0-10 score, / 10 (retries as the eval's judge)
Every reward but `think` and `length` scores the answer after a closing `</think>` (or `</TAG>` of a think
reward in the same list) when the completion has one. Reference-based rewards read the example's answer, or
the column named by the reward's `reference:` setting.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.render import TokenizedPrompt
from ..errors import TunesmithError
from .scoring import load_labels, load_schema, normalize, schema_error, token_f1

KINDS = ("json_schema", "regex", "exact", "choice", "f1", "length", "think", "python", "judge")
NEEDS_REFERENCE = {"exact", "choice", "f1"}


@dataclass(frozen=True)
class Answer:
    """One sampled completion as rewards see it."""

    text: str  # the decoded completion (no end-of-turn token)
    prompt: TokenizedPrompt
    tokens: int  # completion tokens, end-of-turn token included
    stopped: bool  # False: cut off at max_new_tokens


@dataclass
class Reward:
    """A reward function. `score` returns one float per answer."""

    spec: str
    name: str
    weight: float = 1.0
    column: str | None = None  # where the reference comes from (None: the example's answer)
    answer_tag: str | None = None  # score only the text after </TAG> (set by a think reward in the same list)

    @property
    def kind(self) -> str:
        return self.spec.partition(":")[0]

    def reference(self, answer: Answer) -> str | None:
        ex = answer.prompt.example
        if self.column is None:
            return ex.reference
        value = ex.fields.get(self.column)
        if value is None or isinstance(value, str):
            return value
        return json.dumps(value, ensure_ascii=False)

    def answer_text(self, answer: Answer) -> str:
        if self.answer_tag is None:
            return answer.text
        close = f"</{self.answer_tag}>"
        return answer.text.rsplit(close, 1)[1] if close in answer.text else answer.text

    def score(self, answers: Sequence[Answer]) -> list[float]:
        return [self.one(self.answer_text(a), self.reference(a), a) for a in answers]

    def one(self, text: str, reference: str | None, answer: Answer) -> float:
        raise NotImplementedError


@dataclass
class JsonSchemaReward(Reward):
    schema: dict = field(default_factory=dict)

    def one(self, text, reference, answer):
        return float(schema_error(self.schema, text)[1] is None)


@dataclass
class RegexReward(Reward):
    pattern: re.Pattern | None = None

    def one(self, text, reference, answer):
        match = self.pattern.fullmatch(text.strip())
        if match is None:
            return 0.0
        if "answer" not in self.pattern.groupindex:
            return 1.0
        return float(reference is not None and normalize(match.group("answer") or "") == normalize(reference))


class ExactReward(Reward):
    def one(self, text, reference, answer):
        return float(normalize(text) == normalize(reference))


@dataclass
class ChoiceReward(Reward):
    labels: frozenset[str] | None = None  # None: every reference of the training data (set in prepare)

    def one(self, text, reference, answer):
        pred = normalize(text)
        return float(pred in (self.labels or ()) and pred == normalize(reference))


class F1Reward(Reward):
    def one(self, text, reference, answer):
        return token_f1(text, reference)


@dataclass
class LengthReward(Reward):
    free: int = 0  # tokens without penalty
    limit: int = 1  # max_new_tokens

    def one(self, text, reference, answer):
        if not answer.stopped:
            return -1.0
        if answer.tokens <= self.free or self.limit <= self.free:
            return 0.0
        return -min(1.0, (answer.tokens - self.free) / (self.limit - self.free))


@dataclass
class ThinkReward(Reward):
    tag: str = "think"

    def __post_init__(self):
        t = re.escape(self.tag)
        self._format = re.compile(rf"\s*<{t}>.*?</{t}>\s*\S.*", re.DOTALL)

    def one(self, text, reference, answer):
        return float(self._format.fullmatch(answer.text) is not None)


@dataclass
class PythonReward(Reward):
    fn: Any = None

    def one(self, text, reference, answer):
        ex = answer.prompt.example
        example = {**ex.fields, "prompt": [m.as_dict() for m in ex.prompt], "reference": ex.reference,
                   "source": str(ex.source) if ex.source else None}
        return self.fn(text, reference, example)


JUDGE_TEMPLATE = """You are grading a response to a request. Rate how well the response does what the request \
asks{ref_clause}, from 0 (useless or wrong) to 10 (fully correct and helpful).

[Request]
{prompt}
{reference}
[Response]
{response}

Reply with the score only: one number from 0 to 10."""
_SCORE = re.compile(r"(?<![\d.])(10(?:\.0+)?|\d(?:\.\d+)?)(?![\d.])")


def parse_score(text: str) -> float | None:
    """The first number from 0 to 10 in a grader's reply, scaled to [0, 1]; None when there is none."""
    match = _SCORE.search(text)
    return float(match.group(1)) / 10 if match else None


@dataclass
class JudgeReward(Reward):
    endpoint: Any = None
    unreadable: int = 0  # replies without a score (scored 0), counted for the run's metrics

    def score(self, answers: Sequence[Answer]) -> list[float]:
        chats = [[{"role": "user", "content": self.question(a)}] for a in answers]
        replies = self.endpoint.chat_many(chats, max_tokens=8)
        out = []
        for r in replies:
            value = parse_score(r.text)
            self.unreadable += value is None
            out.append(value if value is not None else 0.0)
        return out

    def question(self, answer: Answer) -> str:
        ex = answer.prompt.example
        prompt = "\n".join(f"{m.role}: {m.content}" for m in ex.prompt)
        ref = self.reference(answer)
        return JUDGE_TEMPLATE.format(ref_clause=" and agrees with the reference answer" if ref else "",
                                     prompt=prompt, reference=f"\n[Reference answer]\n{ref}\n" if ref else "",
                                     response=self.answer_text(answer))


# ---------------------------------------------------------------- building rewards from specs

def _resolve(arg: str, base_dir: Path | None) -> Path:
    path = Path(arg)
    return path if path.is_absolute() or base_dir is None else base_dir / path


def import_function(target: str, where: str):
    """`module.path:function` or `path/to/file.py:function` -> the function, or a clear error."""
    module_name, sep, fn_name = target.rpartition(":")
    if not sep or not module_name or not fn_name:
        raise TunesmithError(f"{where}: python reward '{target}' names no function",
                             "write python:MODULE:FUNCTION, e.g. python:my_rewards:score or python:rewards.py:score")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            spec = importlib.util.spec_from_file_location(f"tunesmith_reward_{path.stem}", path)
            if spec is None or not path.exists():
                raise FileNotFoundError(module_name)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure of the user's module is reported the same way
        raise TunesmithError(f"{where}: cannot import {module_name} for reward python:{target}: "
                             f"{type(exc).__name__}: {exc}",
                             "check the module name (it must be importable: on PYTHONPATH, or a .py file path)"
                             ) from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise TunesmithError(f"{where}: {module_name} has no function '{fn_name}'",
                             f"define def {fn_name}(prediction, reference, example) -> float in it")
    return fn


def build_reward(spec: str, where: str, max_new_tokens: int, base_dir: Path | None = None, **common) -> Reward:
    """One reward from its spec (config/checks.py has already checked the syntax)."""
    kind, _, arg = spec.partition(":")
    common = {"spec": spec, **common}
    if kind == "json_schema":
        return JsonSchemaReward(**common, schema=load_schema(_resolve(arg, base_dir)))
    if kind == "regex":
        try:
            return RegexReward(**common, pattern=re.compile(arg))
        except re.error as exc:
            raise TunesmithError(f"{where}: invalid regular expression in reward '{spec}': {exc}") from None
    if kind == "choice":
        return ChoiceReward(**common, labels=load_labels(_resolve(arg, base_dir)) if arg else None)
    if kind == "length":
        return LengthReward(**common, free=int(arg), limit=max_new_tokens)
    if kind == "think":
        return ThinkReward(**common, tag=arg or "think")
    if kind == "python":
        return PythonReward(**common, fn=import_function(arg, where))
    if kind == "judge":
        from ..model.endpoint import ChatEndpoint, split_endpoint

        url, model = split_endpoint(arg)
        return JudgeReward(**common, endpoint=ChatEndpoint(url, model, api_key=judge_key(), retries=JUDGE_RETRIES,
                                                           what="judge reward"))
    simple = {"exact": ExactReward, "f1": F1Reward}
    if kind in simple:
        return simple[kind](**common)
    raise TunesmithError(f"{where}: unknown reward '{spec}'", f"rewards are {', '.join(KINDS)}")


JUDGE_RETRIES = 2  # as the eval's judge (eval/judge.py OpenAIJudge)


def judge_key() -> str | None:
    import os

    return os.environ.get("TUNESMITH_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")


def build_rewards(configs: Sequence[Any], max_new_tokens: int, base_dir: Path | None = None) -> list[Reward]:
    """The rewards of `method_args.rewards` (RewardConfig entries), named uniquely for the metrics."""
    rewards: list[Reward] = []
    seen: dict[str, int] = {}
    for i, c in enumerate(configs):
        name = c.name or c.reward.partition(":")[0]
        seen[name] = seen.get(name, 0) + 1
        unique = name if seen[name] == 1 else f"{name}_{seen[name]}"
        rewards.append(build_reward(c.reward, f"method_args.rewards[{i}]", max_new_tokens, base_dir,
                                    name=unique, weight=c.weight, column=c.reference))
    tags = [r.tag for r in rewards if isinstance(r, ThinkReward)]
    for r in rewards:
        if tags and not isinstance(r, (ThinkReward, LengthReward)):
            r.answer_tag = tags[0]
    return rewards


def check_value(reward: Reward, value: Any, answer: Answer) -> float:
    """A reward's value as a float, or an error naming the reward, the example and the answer."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    raise TunesmithError(f"reward {reward.name} ({reward.spec}) returned {value!r} for the answer "
                         f"{answer.text[:80]!r} to the example at {answer.prompt.source or '?'}; rewards must "
                         "return a finite number", "fix the reward function so that it returns a float for "
                                                   "every answer (0.0 for a wrong one)")


def score_answers(rewards: Sequence[Reward], answers: Sequence[Answer]) -> list[list[float]]:
    """Every reward's value for every answer ([reward][answer]), each checked."""
    out = []
    for r in rewards:
        try:
            values = r.score(answers)
        except TunesmithError:
            raise
        except Exception as exc:  # noqa: BLE001 - a user's reward that raises is reported with its example
            bad = _first_failing(r, answers)
            where = f" on the answer {bad.text[:80]!r} to the example at {bad.prompt.source or '?'}" if bad else ""
            raise TunesmithError(f"reward {r.name} ({r.spec}) raised {type(exc).__name__}: {exc}{where}",
                                 "fix the reward function; it must return a float for every answer") from None
        if len(values) != len(answers):
            raise TunesmithError(f"reward {r.name} ({r.spec}) returned {len(values)} values for {len(answers)} "
                                 "answers", "return one float per answer")
        out.append([check_value(r, v, a) for v, a in zip(values, answers, strict=True)])
    return out


def _first_failing(reward: Reward, answers: Sequence[Answer]) -> Answer | None:
    for a in answers:
        try:
            reward.score([a])
        except Exception:  # noqa: BLE001
            return a
    return None


def missing_references(rewards: Sequence[Reward], prompts: Sequence[TokenizedPrompt]) -> str | None:
    """The first (reward, example) where a reference-based reward has no reference to compare with."""
    for r in rewards:
        needs = r.kind in NEEDS_REFERENCE or (isinstance(r, RegexReward) and "answer" in r.pattern.groupindex)
        if not needs:
            continue
        for p in prompts:
            probe = Answer("", p, 0, True)
            if r.reference(probe) is None:
                column = f"column '{r.column}'" if r.column else "reference answer"
                return (f"reward {r.name} ({r.spec}) compares with a reference, but the example at "
                        f"{p.source or '?'} has no {column}")
    return None
