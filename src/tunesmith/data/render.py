"""Chat-template rendering and the label mask.

The tokenizer's own chat template renders every example, so training sees exactly what serving will send.
Which tokens are trained is derived without `{% generation %}` markers: for each assistant turn the
conversation is rendered up to the turn (with the generation prompt) and through the turn. The first must be a
token prefix of the whole conversation; the turn's tokens follow it, up to and including the first end-of-turn
token. What a template prints after that token (a newline, Phi-3's closing EOS) is not trained. Rendering through
the turn must agree with the whole conversation at least up to that token, so a template that renders a turn
differently once later turns follow (e.g. one that strips reasoning from earlier turns) is reported, not guessed.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import TunesmithError
from .types import Conversation, Message, Preference, Prompt, Source, Unpaired

IGNORE = -100

# Used for base models that ship no chat template. EOS closes each assistant turn so the model learns to stop.
DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### User:\n' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'tool' %}{{ '### Tool:\n' + message['content'] + '\n\n' }}"
    "{% else %}{{ '### Assistant:\n' + message['content'] + eos_token + '\n\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>",
                      "<|end_of_text|>", "<|END_OF_TURN_TOKEN|>")


@dataclass(frozen=True)
class Tokenized:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]  # IGNORE where not trained
    source: Source | None = None

    @property
    def n_target(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class TokenizedPair:
    chosen: Tokenized
    rejected: Tokenized


@dataclass(frozen=True)
class TokenizedUnpaired:
    completion: Tokenized
    label: bool


@dataclass(frozen=True)
class TokenizedPrompt:
    """A prompt rendered with the generation prompt (what the model continues), and its example."""

    input_ids: tuple[int, ...]
    example: Prompt

    @property
    def source(self) -> Source | None:
        return self.example.source

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class RenderStats:
    rendered: int = 0
    truncated: int = 0
    dropped: int = 0
    dropped_sources: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"rendered": self.rendered, "truncated": self.truncated, "dropped": self.dropped}


def ensure_chat_template(tokenizer) -> bool:
    """Give a tokenizer without a chat template tunesmith's documented default. Returns True if it did."""
    if getattr(tokenizer, "chat_template", None):
        return False
    if tokenizer.eos_token is None:
        raise TunesmithError("the tokenizer has no chat template and no EOS token, so a fine-tuned model could "
                             "not learn where its answer ends",
                             hint="use a model whose tokenizer has an EOS token, or set tokenizer.chat_template")
    warnings.warn("the tokenizer has no chat template; using tunesmith's default '### User / ### Assistant' "
                  "template (docs/data.md). Serve the model with the same template.", stacklevel=2)
    tokenizer.chat_template = DEFAULT_TEMPLATE
    return True


def end_of_turn_ids(tokenizer) -> set[int]:
    """Token ids that close an assistant turn: EOS plus the known end-of-turn tokens this tokenizer treats as
    special. Llama-3's `<|eot_id|>` or Phi-3's `<|end|>` are often special added tokens without being listed
    among the named special tokens, so the added-token table is consulted too."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    special = set(tokenizer.all_special_tokens or [])
    special |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    vocab = tokenizer.get_vocab()
    ids |= {vocab[tok] for tok in END_OF_TURN_TOKENS if tok in vocab and tok in special}
    return ids


class Renderer:
    """Turns canonical examples into token ids and labels, with a truncation policy and counts."""

    def __init__(self, tokenizer, max_length: int = 1024, truncation: str = "right",
                 train_on: str = "all_assistant", system_prompt: str | None = None):
        self.tok = tokenizer
        self.max_length = max_length
        self.truncation = truncation
        self.train_on = train_on
        self.system_prompt = system_prompt
        self.stats = RenderStats()
        ensure_chat_template(tokenizer)
        self.eot_ids = end_of_turn_ids(tokenizer)
        self._bos = self._tokenizer_adds_bos()
        self._fold_system = False

    # ---- public API -------------------------------------------------------------------------------
    def sft(self, conv: Conversation) -> Tokenized | None:
        messages = self._with_system(conv.messages)
        last = max(i for i, m in enumerate(messages) if m.role == "assistant")
        trained = [i for i, m in enumerate(messages) if m.role == "assistant" and m.train
                   and (self.train_on == "all_assistant" or i == last)]
        return self._finish(*self._render(messages, trained), conv.source)

    def preference(self, ex: Preference) -> TokenizedPair | None:
        prompt = self._with_system(ex.prompt)
        chosen = self._completion(prompt, ex.chosen)
        rejected = self._completion(prompt, ex.rejected)
        a = self._finish(*chosen, ex.source, count=False)
        b = self._finish(*rejected, ex.source, count=False)
        self.stats.rendered += 1
        if a is None or b is None:
            self._drop(ex.source)
            return None
        return TokenizedPair(a, b)

    def unpaired(self, ex: Unpaired) -> TokenizedUnpaired | None:
        prompt = self._with_system(ex.prompt)
        tok = self._finish(*self._completion(prompt, ex.completion), ex.source)
        return None if tok is None else TokenizedUnpaired(tok, ex.label)

    def prompt(self, ex: Prompt, reserve: int = 0) -> TokenizedPrompt | None:
        """A prompt to answer, leaving `reserve` tokens of max_length for the answer. A longer prompt keeps its
        end under truncation: left, and is dropped otherwise (cutting its end would cut the question)."""
        self.stats.rendered += 1
        ids = self.prompt_ids(ex.prompt)
        room = max(1, self.max_length - reserve)
        if len(ids) > room:
            if self.truncation != "left":
                self._drop(ex.source)
                return None
            self.stats.truncated += 1
            ids = ids[-room:]
        return TokenizedPrompt(tuple(ids), ex)

    def prompt_ids(self, messages: Sequence[Message | dict]) -> list[int]:
        """Token ids of a prompt with the generation prompt appended — what serving sends."""
        msgs = self._with_system(tuple(m if isinstance(m, Message) else Message(m["role"], m["content"])
                                       for m in messages))
        return self._ids(self._text(msgs, generation_prompt=True))

    # ---- internals --------------------------------------------------------------------------------
    def _completion(self, prompt: tuple[Message, ...], completion: tuple[Message, ...]):
        messages = prompt + completion
        trained = [i for i in range(len(prompt), len(messages)) if messages[i].role == "assistant"]
        return self._render(messages, trained)

    def _with_system(self, messages: tuple[Message, ...]) -> tuple[Message, ...]:
        if self.system_prompt and (not messages or messages[0].role != "system"):
            messages = (Message("system", self.system_prompt),) + tuple(messages)
        return tuple(messages)

    def _render(self, messages: tuple[Message, ...], trained: list[int]) -> tuple[list[int], list[int]]:
        full = self._ids(self._text(messages, generation_prompt=False))
        labels = [IGNORE] * len(full)
        for i in trained:
            start, stop = self._turn_span(messages, i, full)
            labels[start:stop] = full[start:stop]
        return full, labels

    def _turn_span(self, messages: tuple[Message, ...], i: int, full: list[int]) -> tuple[int, int]:
        """[start, stop) of assistant message i's trained tokens in `full`: from the end of the generation
        prompt through the turn's first end-of-turn token."""
        before = self._ids(self._text(messages[:i], generation_prompt=True))
        through = self._ids(self._text(messages[: i + 1], generation_prompt=False))
        agree = common_prefix_length(through, full)
        start = len(before)
        if full[:start] != before or agree < start:
            raise self._inconsistent(i, before, full)
        end = next((j for j in range(start, agree) if full[j] in self.eot_ids), None)
        if end is not None:
            stop = end + 1
        elif agree == len(through):  # a template without an end-of-turn token: the whole turn
            stop = agree
        else:
            raise self._inconsistent(i, through, full)
        if stop <= start:
            raise TunesmithError(f"the chat template of {self._template_name()} renders no tokens for "
                                 f"messages[{i}] (assistant)", hint="check that the template prints assistant turns")
        return start, stop

    def _inconsistent(self, i: int, part: list[int], full: list[int]) -> TunesmithError:
        at = common_prefix_length(part, full)
        shown = (f"the rendering up to it continues {self.tok.decode(part[at:at + 12])!r} where the whole "
                 f"conversation has {self.tok.decode(full[at:at + 12])!r}")
        return TunesmithError(
            f"the chat template of {self._template_name()} is not prefix-consistent at messages[{i}] (assistant): "
            f"{shown}. The template renders earlier turns differently once later turns follow, so tunesmith "
            "cannot tell which tokens belong to each assistant turn",
            hint="set data.train_on: last_assistant (only the final turn is trained), or use a template whose "
                 "rendering of a conversation's first turns is a prefix of the whole (most chat templates are)")

    def _finish(self, ids: list[int], labels: list[int], source: Source | None, count: bool = True):
        if count:
            self.stats.rendered += 1
        if len(ids) > self.max_length:
            if self.truncation == "drop":
                if count:
                    self._drop(source)
                return None
            self.stats.truncated += 1
            if self.truncation == "left":
                ids, labels = ids[-self.max_length:], labels[-self.max_length:]
                labels[0] = IGNORE  # nothing predicts the first token of a row
            else:
                ids, labels = ids[: self.max_length], labels[: self.max_length]
        if all(x == IGNORE for x in labels):
            if count:
                self._drop(source)
            return None
        return Tokenized(tuple(ids), tuple(labels), source)

    def _drop(self, source: Source | None) -> None:
        self.stats.dropped += 1
        if source is not None and len(self.stats.dropped_sources) < 1000:
            self.stats.dropped_sources.append(str(source))

    def _text(self, messages: Sequence[Message], generation_prompt: bool) -> str:
        dicts = [m.as_dict() for m in messages]
        if self._fold_system:
            dicts = fold_system(dicts)
        try:
            return self._apply(dicts, generation_prompt)
        except Exception as e:  # noqa: BLE001 - jinja raises from the template itself
            error = e
        if self._fold_system or not dicts or dicts[0]["role"] != "system":
            raise self._render_error(error)
        try:  # templates without a system role (Gemma, Mistral) raise on one; retry with it folded in
            text = self._apply(fold_system(dicts), generation_prompt)
        except Exception:  # noqa: BLE001
            raise self._render_error(error) from None
        self._fold_system = True
        warnings.warn(f"the chat template of {self._template_name()} has no system role; the system message is "
                      "put at the start of the first user message", stacklevel=2)
        return text

    def _apply(self, dicts: list[dict], generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(dicts, tokenize=False, add_generation_prompt=generation_prompt)

    def _render_error(self, error: Exception) -> TunesmithError:
        return TunesmithError(f"the chat template of {self._template_name()} failed to render: {error}",
                              hint="check the roles and their order in your data (docs/data.md)")

    def _ids(self, text: str) -> list[int]:
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        bos = self.tok.bos_token_id
        if self._bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        while bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
            ids = ids[1:]  # exactly one BOS, whatever the template and the tokenizer both add
        return ids

    def _tokenizer_adds_bos(self) -> bool:
        bos = self.tok.bos_token_id
        if bos is None:
            return False
        with_special = self.tok("a", add_special_tokens=True)["input_ids"]
        return bool(with_special) and with_special[0] == bos

    def _template_name(self) -> str:
        return f"tokenizer '{getattr(self.tok, 'name_or_path', '?') or '?'}'"


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    return next((k for k in range(n) if a[k] != b[k]), n)


def fold_system(messages: list[dict]) -> list[dict]:
    """Merge a leading system message into the first user message, for templates without a system role."""
    if not messages or messages[0]["role"] != "system":
        return messages
    system, rest = messages[0]["content"], list(messages[1:])
    for i, m in enumerate(rest):
        if m["role"] == "user":
            rest[i] = {"role": "user", "content": f"{system}\n\n{m['content']}"}
            return rest
    return [{"role": "user", "content": system}] + rest
