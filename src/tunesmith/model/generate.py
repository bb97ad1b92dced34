"""Batched generation with exactly the chat template and stop tokens serving uses: left padding, greedy by
default, KV cache (transformers' generate).

Prompts of one batch usually share a long prefix (system message, few-shot examples). That prefix is run
once, its KV cache copied to every row, and each row continues after it: rows are laid out as
[shared prefix][padding][own suffix] with the padding masked out, so every token keeps the position and the
context it has in the unpadded prompt. It is the same computation as plain left padding (identical tokens in
fp32); in bf16/fp16 the different matrix shapes round differently, which can change a greedy pick, just as
changing the batch size can."""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..console import advance
from ..data.render import Renderer, end_of_turn_ids
from ..data.types import Message
from .unwrap import unwrap

MIN_SHARED_PREFIX = 16  # shorter shared prefixes are not worth a separate forward pass


def shared_prefix_length(ids: Sequence[Sequence[int]]) -> int:
    """Tokens every sequence starts with, leaving at least one token of each sequence to run in the batch."""
    shortest = min(len(x) for x in ids)
    n = 0
    while n < shortest - 1 and all(x[n] == ids[0][n] for x in ids):
        n += 1
    return n


@dataclass(frozen=True)
class Generation:
    """One reply and what it cost: prompt and generated token counts, whether it stopped at the token limit
    (no end-of-turn token within max_new_tokens: the text is cut off), the wall time of its batch (how long
    the prompt waited for its reply) and its share of that time (batch time / rows in the batch)."""

    text: str
    prompt_tokens: int
    new_tokens: int
    hit_limit: bool
    seconds: float
    share_seconds: float


class Generator:
    def __init__(self, model: torch.nn.Module, tokenizer, device: torch.device | str = "cpu",
                 precision: str = "bf16", batch_size: int = 16, max_new_tokens: int = 64,
                 system_prompt: str | None = None):
        self.model, self.tok = model, tokenizer
        self.device = torch.device(device)
        self.precision = precision
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.renderer = Renderer(tokenizer, max_length=1 << 30, system_prompt=system_prompt)
        self.stop_ids = sorted(end_of_turn_ids(tokenizer))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.share_prefix = True  # run a batch's common prompt prefix once (see the module docstring)

    def prompt_ids(self, messages: Sequence[Message | dict]) -> list[int]:
        return self.renderer.prompt_ids(messages)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[Message | dict]], temperature: float = 0.0,
                 max_new_tokens: int | None = None, seed: int = 0) -> list[str]:
        """One reply per prompt (a list of messages), in input order."""
        return [g.text for g in self.generate_detailed(prompts, temperature, max_new_tokens, seed)]

    @torch.no_grad()
    def generate_detailed(self, prompts: Sequence[Sequence[Message | dict]], temperature: float = 0.0,
                          max_new_tokens: int | None = None, seed: int = 0) -> list[Generation]:
        """Like `generate`, with each reply's token counts, cut-off flag and batch time."""
        ids = [self.prompt_ids(p) for p in prompts]
        return self.generate_ids_detailed(ids, temperature, max_new_tokens, seed)

    @torch.no_grad()
    def generate_ids(self, ids: Sequence[Sequence[int]], temperature: float = 0.0,
                     max_new_tokens: int | None = None, seed: int = 0) -> list[str]:
        return [g.text for g in self.generate_ids_detailed(ids, temperature, max_new_tokens, seed)]

    @torch.no_grad()
    def generate_ids_detailed(self, ids: Sequence[Sequence[int]], temperature: float = 0.0,
                              max_new_tokens: int | None = None, seed: int = 0) -> list[Generation]:
        self.model.eval()
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a batch
        out: list[Generation | None] = [None] * len(ids)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        limit = max_new_tokens or self.max_new_tokens
        for k in range(0, len(order), self.batch_size):
            started = time.perf_counter()
            chunk = order[k:k + self.batch_size]
            kwargs = dict(max_new_tokens=limit, eos_token_id=self.stop_ids,
                          pad_token_id=self.pad_id, do_sample=temperature > 0)
            if temperature > 0:
                torch.manual_seed(seed + k)
                kwargs.update(temperature=temperature, top_p=1.0, top_k=0)
            rows = [list(ids[i]) for i in chunk]
            shared = shared_prefix_length(rows) if self.share_prefix else 0
            shared = shared if shared >= MIN_SHARED_PREFIX else 0
            # not under kernels.decode_linears: A/B-measured slower in transformers' generate loop (64 prompts,
            # 16 rows: 52-56 s with it, 47-51 s without; with the earlier function mode, 20% slower)
            with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
                cache = self._prefix_cache(rows[0][:shared], len(rows)) if shared else None
                if cache is not None:
                    kwargs[self._cache_arg] = cache
                else:
                    shared = 0
                input_ids, mask = self._layout(rows, shared)
                gen = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                                          **kwargs)
            width = input_ids.shape[1]
            seconds = time.perf_counter() - started
            for r, i in enumerate(chunk):
                new = gen[r, width:].tolist()
                cut = next((j for j, t in enumerate(new) if t in self.stop_ids), None)
                text = self.tok.decode(new[:cut], skip_special_tokens=True)
                out[i] = Generation(text, len(ids[i]), len(new) if cut is None else cut + 1, cut is None, seconds,
                                    seconds / len(chunk))
            advance(len(chunk))
        return out  # type: ignore[return-value]

    def _layout(self, rows: list[list[int]], shared: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[shared prefix][padding][suffix] per row (plain left padding when shared == 0) and its mask."""
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            suffix = row[shared:]
            input_ids[r, :shared] = torch.tensor(row[:shared], dtype=torch.long)
            mask[r, :shared] = 1
            input_ids[r, width - len(suffix):] = torch.tensor(suffix, dtype=torch.long)
            mask[r, width - len(suffix):] = 1
        return input_ids, mask

    def _prefix_cache(self, prefix: list[int], rows: int):
        """The KV cache of `prefix` (run once, with the active adapter) repeated for `rows` rows; None for
        models whose cache cannot be repeated (then the batch runs without sharing)."""
        accepts = inspect.signature(unwrap(self.model).forward).parameters
        extra = {"logits_to_keep": 1} if "logits_to_keep" in accepts else {}
        ids = torch.tensor([prefix], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, use_cache=True, **extra)
        cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
        if not hasattr(cache, "batch_repeat_interleave"):
            return None
        cache.batch_repeat_interleave(rows)
        return cache

    @property
    def _cache_arg(self) -> str:
        """Later transformers 5.x releases renamed `past_key_values` to `cache` (the old name warns)."""
        names = inspect.signature(unwrap(self.model).forward).parameters
        return "cache" if "cache" in names else "past_key_values"
