"""Pairwise LLM-as-judge: ask a judge which of two outputs is better, in both orders to cancel position bias.

A judge is anything with `ask(prompts: list[str]) -> list[str]`: `OpenAIJudge` speaks the OpenAI chat
completions API over HTTP (any OpenAI-compatible server: vLLM, llama.cpp, Ollama, OpenAI), `LocalJudge`
wraps a local prompt -> answer function.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from tunesmith.errors import TunesmithError
from tunesmith.eval.endpoint import ChatEndpoint, chat_completions_url, split_endpoint
from tunesmith.eval.stats import binom_two_sided

__all__ = ["Judge", "JudgeResult", "LocalJudge", "OpenAIJudge", "chat_completions_url", "judge_from_url",
           "judge_pairs", "parse_verdict"]

Verdict = Literal["A", "B", "tie"]
Outcome = Literal["win", "tie", "loss"]

JUDGE_TEMPLATE = """You are comparing two responses to the same request. Decide which response is better: \
more correct, more helpful, and closer to what the request asks for. Ignore length and style unless they matter.

[Request]
{prompt}

[Response A]
{first}

[Response B]
{second}

Reply with exactly one word: A if Response A is better, B if Response B is better, or tie."""


class Judge(Protocol):
    def ask(self, prompts: list[str]) -> list[str]: ...


def build_judge_prompt(prompt: str, first: str, second: str) -> str:
    return JUDGE_TEMPLATE.format(prompt=prompt, first=first, second=second)


# A label counts only when followed by the end, punctuation, or a word that starts a reason, so the
# article in "a tie" or "a close call" is not read as "A".
_END = r"(?=\s*(?:$|[^\w\s]|because\b|since\b|as\b|over\b|is\b|wins\b|was\b))"
_RULES: tuple[re.Pattern[str], ...] = (
    re.compile(r"^\W*(?:(?:response|answer|output|assistant|option)\s*)?\(?(a|b|tie)\)?\W*$"),  # "**B**", "Tie."
    re.compile(r"\[\[\s*(a|b|tie)\s*\]\]"),  # "[[A]]"
    re.compile(r"\b(?:verdict|winner|answer|choice|better(?: response)?)\s*(?:is|:|=)\s*\**\s*"
               r"(?:response\s+)?\(?(a|b|tie)\)?" + _END),  # "Final verdict: B", "The better response is A"
    re.compile(r"\bprefer(?:red)?\s*(?:is|:)?\s*(?:response\s+)?\(?(a|b)\)?" + _END),  # "I prefer B"
    re.compile(r"^\W*(a|b)\b" + _END),  # "A. Because ...", "B is better"
    re.compile(r"(?:\b(?:response|answer|assistant|output|option)\s*)?\(?\b(a|b)\)?\s+(?:is|was)\s+"
               r"(?:clearly\s+|much\s+|slightly\s+)?(?:better|best|preferred|the better)"),  # "so A is better"
    re.compile(r"\b(tie|equal|equally|neither|same)\b"),
)


def parse_verdict(text: str) -> Verdict | None:
    """Read "A", "B" or "tie" out of a judge's answer; None when it cannot be read unambiguously.
    Rules are tried strongest first; the first rule that matches decides, and a rule matching both
    labels makes the answer unreadable."""
    cleaned = text.strip().casefold()
    for rule in _RULES:
        labels = {m.group(1) for m in rule.finditer(cleaned)}
        labels = {"tie" if label in ("equal", "equally", "neither", "same") else label for label in labels}
        if len(labels) == 1:
            label = labels.pop()
            return "tie" if label == "tie" else "A" if label == "a" else "B"
        if labels:
            return None
    return None


@dataclass(frozen=True)
class JudgeResult:
    """Outcomes for candidate a against candidate b; a win needs both orders to prefer a."""

    wins: int
    ties: int
    losses: int
    unparseable: int  # single judge answers that could not be read (each counted as a tie)
    inconsistent: int  # examples whose two orders preferred different sides (position bias)
    outcomes: list[Outcome] = field(default_factory=list)
    raw: list[tuple[str, str]] = field(default_factory=list)  # (a-first answer, b-first answer) per example

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses

    @property
    def win_rate(self) -> float:
        return self.wins / self.n if self.n else 0.0

    @property
    def tie_rate(self) -> float:
        return self.ties / self.n if self.n else 0.0

    @property
    def loss_rate(self) -> float:
        return self.losses / self.n if self.n else 0.0

    @property
    def p_value(self) -> float:
        """Two-sided sign test of wins against losses (ties carry no information)."""
        return binom_two_sided(self.wins, self.wins + self.losses)

    def summary(self, name_a: str, name_b: str) -> str:
        return (f"{name_a} vs {name_b} (judge, both orders): {self.win_rate:.0%} win / {self.tie_rate:.0%} tie / "
                f"{self.loss_rate:.0%} loss ({self.wins}/{self.ties}/{self.losses}, n = {self.n}, "
                f"sign test p = {self.p_value:.3g}; {self.unparseable} unreadable answers, "
                f"{self.inconsistent} order-inconsistent)")


def _combine(a_first: Verdict | None, b_first: Verdict | None) -> tuple[Outcome, bool]:
    """Map both orders to the side they prefer; returns the outcome and whether the orders conflicted."""
    pref_1 = {"A": "a", "B": "b"}.get(a_first or "tie", "tie")
    pref_2 = {"A": "b", "B": "a"}.get(b_first or "tie", "tie")
    if pref_1 == pref_2 == "a":
        return "win", False
    if pref_1 == pref_2 == "b":
        return "loss", False
    return "tie", pref_1 != pref_2 and "tie" not in (pref_1, pref_2)


def judge_pairs(judge: Judge, prompts: Sequence[str], outputs_a: Sequence[str],
                outputs_b: Sequence[str]) -> JudgeResult:
    """Judge every (a, b) pair in both orders. Identical outputs are ties without asking the judge."""
    if not len(prompts) == len(outputs_a) == len(outputs_b):
        raise TunesmithError(f"judge_pairs: {len(prompts)} prompts, {len(outputs_a)} and {len(outputs_b)} outputs",
                             "every candidate must answer every prompt")
    asked = [i for i in range(len(prompts)) if outputs_a[i].strip() != outputs_b[i].strip()]
    questions = []
    for i in asked:
        questions += [build_judge_prompt(prompts[i], outputs_a[i], outputs_b[i]),
                      build_judge_prompt(prompts[i], outputs_b[i], outputs_a[i])]
    answers = judge.ask(questions) if questions else []
    if len(answers) != len(questions):
        raise TunesmithError(f"the judge returned {len(answers)} answers for {len(questions)} questions")
    by_index = {i: (answers[2 * k], answers[2 * k + 1]) for k, i in enumerate(asked)}
    outcomes: list[Outcome] = []
    raw: list[tuple[str, str]] = []
    unparseable = inconsistent = 0
    for i in range(len(prompts)):
        first, second = by_index.get(i, ("", ""))
        raw.append((first, second))
        if i not in by_index:
            outcomes.append("tie")
            continue
        v1, v2 = parse_verdict(first), parse_verdict(second)
        unparseable += (v1 is None) + (v2 is None)
        outcome, conflicted = _combine(v1, v2)
        inconsistent += conflicted
        outcomes.append(outcome)
    return JudgeResult(outcomes.count("win"), outcomes.count("tie"), outcomes.count("loss"),
                       unparseable, inconsistent, outcomes, raw)


class LocalJudge:
    """Wraps any batched prompt -> answer function (e.g. a local model's greedy generation)."""

    def __init__(self, generate_fn: Callable[[list[str]], list[str]]):
        self.generate_fn = generate_fn

    def ask(self, prompts: list[str]) -> list[str]:
        answers = list(self.generate_fn(prompts))
        if len(answers) != len(prompts):
            raise TunesmithError(f"the local judge returned {len(answers)} answers for {len(prompts)} prompts")
        return answers


class OpenAIJudge:
    """A judge served by an OpenAI-compatible chat completions endpoint (greedy, short answers)."""

    def __init__(self, url: str, model: str, api_key: str | None = None, timeout: float = 60.0,
                 max_tokens: int = 16, concurrency: int = 4, retries: int = 2, retry_wait: float = 1.0,
                 rate_limit: float | None = None):
        self.endpoint = ChatEndpoint(url, model, api_key=api_key, timeout=timeout, retries=retries,
                                     retry_wait=retry_wait, concurrency=concurrency, rate_limit=rate_limit,
                                     what="judge")
        self.url, self.model, self.api_key = self.endpoint.url, model, api_key
        self.max_tokens = max_tokens

    def ask(self, prompts: list[str]) -> list[str]:
        replies = self.endpoint.chat_many([[{"role": "user", "content": p}] for p in prompts], self.max_tokens)
        return [r.text for r in replies]

    def ask_one(self, prompt: str) -> str:
        return self.endpoint.chat([{"role": "user", "content": prompt}], self.max_tokens).text


def judge_from_url(spec: str, api_key: str | None = None, timeout: float = 60.0) -> OpenAIJudge:
    """`http://localhost:8000/v1#qwen2.5-7b-instruct` → an OpenAIJudge for that server and model."""
    url, model = split_endpoint(spec)
    return OpenAIJudge(url, model, api_key=api_key, timeout=timeout)
