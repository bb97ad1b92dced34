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

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import TunesmithError
from .types import (
    Conversation,
    Document,
    Message,
    Preference,
    Prompt,
    Source,
    Unpaired,
    conversation_tools,
    tool_name,
)

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
    # documents (continued pre-training): how many, the windows they become, and their tokens
    documents: int = 0
    windows: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    stream: tuple[int, int] | None = None  # cross-document: (max_length, overlap) the stream is cut with

    def as_dict(self) -> dict:
        out = {"rendered": self.rendered, "truncated": self.truncated, "dropped": self.dropped}
        if self.documents:
            windows, trained = self.windows, self.trained_tokens
            if self.stream is not None:
                from .documents import stream_counts

                windows, trained = stream_counts(self.tokens, *self.stream)
            out.update(documents=self.documents, windows=windows, tokens=self.tokens, trained_tokens=trained)
        return out


def fit(ids: list[int], labels: list[int], max_length: int, policy: str) -> tuple[list[int], list[int]] | None:
    """One rendered sequence cut to `max_length` by `policy` (right, left, drop); None when it is dropped:
    over-long under `drop`, or nothing left to train."""
    if len(ids) > max_length:
        if policy == "drop":
            return None
        if policy == "left":
            ids, labels = ids[-max_length:], labels[-max_length:]
            labels[0] = IGNORE  # nothing predicts the first token of a row
        else:
            ids, labels = ids[:max_length], labels[:max_length]
    if all(x == IGNORE for x in labels):
        return None
    return ids, labels


def fit_pair(chosen: tuple[list[int], list[int]], rejected: tuple[list[int], list[int]], max_length: int,
             policy: str):
    """A preference pair cut to `max_length`. Under `left` both sides lose the same leading tokens of the
    prompt they share, so they keep the same prompt; a pair whose longer side would have to lose more than
    that prompt (all but its last token) is dropped. None when the pair is dropped."""
    if policy == "left":
        over = max(len(chosen[0]), len(rejected[0])) - max_length
        if over > 0:
            shared = _untrained_common_prefix(chosen, rejected)
            if over >= shared:
                return None
            chosen = (chosen[0][over:], chosen[1][over:])
            rejected = (rejected[0][over:], rejected[1][over:])
    a = fit(list(chosen[0]), list(chosen[1]), max_length, policy)
    b = fit(list(rejected[0]), list(rejected[1]), max_length, policy)
    return None if a is None or b is None else (a, b)


def _untrained_common_prefix(a: tuple[list[int], list[int]], b: tuple[list[int], list[int]]) -> int:
    n, limit = 0, min(len(a[0]), len(b[0]))
    while n < limit and a[0][n] == b[0][n] and a[1][n] == IGNORE and b[1][n] == IGNORE:
        n += 1
    return n


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
                 train_on: str = "all_assistant", system_prompt: str | None = None, window_overlap: int = 0,
                 cross_document: bool = False):
        self.tok = tokenizer
        self.max_length = max_length
        self.truncation = truncation
        self.train_on = train_on
        self.system_prompt = system_prompt
        self.window_overlap = window_overlap
        self.cross_document = cross_document
        self.stats = RenderStats()
        ensure_chat_template(tokenizer)
        self.eot_ids = end_of_turn_ids(tokenizer)
        self._bos = self._tokenizer_adds_bos()
        self._fold_system = False
        self._document_ids: tuple[int, bool] | None = None  # (end-of-text id, adds BOS), found once

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
        self.stats.rendered += 1
        if max(len(chosen[0]), len(rejected[0])) > self.max_length and self.truncation != "drop":
            self.stats.truncated += 1
        fitted = fit_pair(chosen, rejected, self.max_length, self.truncation)
        if fitted is None:
            self._drop(ex.source)
            return None
        (a_ids, a_labels), (b_ids, b_labels) = fitted
        return TokenizedPair(Tokenized(tuple(a_ids), tuple(a_labels), ex.source),
                             Tokenized(tuple(b_ids), tuple(b_labels), ex.source))

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


    def document(self, doc: Document) -> list[Tokenized]:
        """A document's windows of max_length tokens, every token trained once (data/documents.py). With
        cross_document: the document's whole token stream as one sequence, for the method to cut together with
        the other documents' (`documents.stream_items`). Empty (and counted as dropped) when the text gives no
        tokens."""
        from .documents import adds_bos, document_ids, end_of_text_id, window_items

        if self._document_ids is None:
            self._document_ids = (end_of_text_id(self.tok), adds_bos(self.tok))
        end_id, bos = self._document_ids
        ids = document_ids(self.tok, doc.text, end_id, bos)
        s = self.stats
        s.rendered += 1
        s.documents += 1
        if len(ids) - bos < 2:  # the separator alone: the text gave no tokens
            self._drop(doc.source)
            return []
        s.tokens += len(ids)
        if self.cross_document:
            s.stream = (self.max_length, self.window_overlap)
            return [Tokenized(tuple(ids), (IGNORE, *ids[1:]), doc.source)]
        items = window_items(ids, self.max_length, self.window_overlap, doc.source)
        s.windows += len(items)
        s.trained_tokens += sum(x.n_target for x in items)
        return items

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
        text = self._text(messages, generation_prompt=False)
        uses_tools = any(m.tools or m.tool_calls or m.role == "tool" for m in messages)
        if uses_tools:
            self._check_tools_rendered(messages, text)
        full = self._ids(text)
        labels = [IGNORE] * len(full)
        for i in trained:
            start, stop = self._turn_span(messages, i, full)
            labels[start:stop] = full[start:stop]
            if messages[i].tool_calls:
                self._check_calls_trained(messages, i, full[start:stop])
        return full, labels

    def _check_tools_rendered(self, messages: tuple[Message, ...], text: str) -> None:
        """A template that ignores `tools`, `tool_calls` or tool results would train a model on text that
        silently lacks them."""
        hint = ("use a model whose chat template supports tools (Qwen2.5, Llama-3.1, Mistral v0.3 and Hermes "
                "instruct models do), or set the tokenizer's chat_template to one that does")
        for tool in conversation_tools(messages):
            if tool_name(tool) not in text:
                raise TunesmithError(f"the chat template of {self._template_name()} does not render tool "
                                     f"definitions: '{tool_name(tool)}' is not in the rendered conversation", hint)
        for i, m in enumerate(messages):
            if m.role == "tool" and m.content and m.content not in text and json.dumps(m.content) not in text:
                raise TunesmithError(f"the chat template of {self._template_name()} does not render tool results "
                                     f"(messages[{i}])", hint)

    def _check_calls_trained(self, messages: tuple[Message, ...], i: int, span: list[int]) -> None:
        turn = self.tok.decode(span, skip_special_tokens=False)
        for call in messages[i].tool_calls:
            if call.name not in turn:
                raise TunesmithError(f"the chat template of {self._template_name()} does not render the tool calls "
                                     f"of messages[{i}] (assistant): '{call.name}' is not in the turn's tokens",
                                     "use a model whose chat template supports tool calls (Qwen2.5, Llama-3.1, "
                                     "Mistral v0.3, Hermes), or set the tokenizer's chat_template to one that does")

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

    def _finish(self, ids: list[int], labels: list[int], source: Source | None) -> Tokenized | None:
        self.stats.rendered += 1
        if len(ids) > self.max_length and self.truncation != "drop":
            self.stats.truncated += 1
        fitted = fit(ids, labels, self.max_length, self.truncation)
        if fitted is None:
            self._drop(source)
            return None
        return Tokenized(tuple(fitted[0]), tuple(fitted[1]), source)

    def _drop(self, source: Source | None) -> None:
        self.stats.dropped += 1
        if source is not None and len(self.stats.dropped_sources) < 1000:
            self.stats.dropped_sources.append(str(source))

    def _text(self, messages: Sequence[Message], generation_prompt: bool) -> str:
        dicts = [m.as_dict() for m in messages]
        tools = [dict(t) for t in conversation_tools(messages)] or None
        if self._fold_system:
            dicts = fold_system(dicts)
        try:
            return self._apply(dicts, generation_prompt, tools)
        except Exception as e:  # noqa: BLE001 - jinja raises from the template itself
            error = e
        if self._fold_system or not dicts or dicts[0]["role"] != "system":
            raise self._render_error(error)
        try:  # templates without a system role (Gemma, Mistral) raise on one; retry with it folded in
            text = self._apply(fold_system(dicts), generation_prompt, tools)
        except Exception:  # noqa: BLE001
            raise self._render_error(error) from None
        self._fold_system = True
        warnings.warn(f"the chat template of {self._template_name()} has no system role; the system message is "
                      "put at the start of the first user message", stacklevel=2)
        return text

    def _apply(self, dicts: list[dict], generation_prompt: bool, tools: list[dict] | None = None) -> str:
        return self.tok.apply_chat_template(dicts, tools=tools, tokenize=False, add_generation_prompt=generation_prompt)

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
