"""Sampling groups of completions for online training (GRPO): G completions of every prompt, drawn with a KV
cache from the model as it is now (LoRA adapters live), with the log-prob of every sampled token taken from
the generating pass itself.

A chunk of prompts runs as one batch:
  1. prefill: the prompts, left-padded, in one forward; only the last position's logits are computed;
  2. the prompt's KV cache and last logits are repeated G times, so each prompt is computed ONCE for its
     G completions (as the eval's generator shares a common prefix);
  3. decode: one token per row per forward; a row that samples a stop token is finished, and finished rows
     leave the batch (their cache rows are dropped) once they are an eighth of it, so a group whose answers
     end early does not pay for the longest one. The cache has room reserved for every new token, so a
     token's keys and values are written in place (transformers' dynamic cache concatenates: it copies the
     whole cache of every layer for every token).

Sampling runs the large linear layers of few rows as W @ x^T on CPU (`kernels.decode_linears`), and the
Python collector is held off while sampling (see `Sampler.sample`).

A token is drawn by inverting the cumulative distribution of its row (one uniform number per row, float64
sums, in blocks of the vocabulary); torch.multinomial draws an exponential variate for every entry of the
vocabulary instead, which cost a tenth of the decode time at 49k tokens.

Log-probs are those of the temperature-scaled distribution, log_softmax(logits / T), before top-k / top-p
truncation: the policy whose ratio GRPO clips, and exactly what a teacher-forced forward of the same tokens
computes (`methods.logps.token_logps(..., temperature=T)`; equal in fp32 up to summation order, tested).
Top-k and top-p only decide which token is drawn. Every draw comes from the `generator` passed in, so the
same generator state, weights and prompts give the same completions.
"""

from __future__ import annotations

import gc
import inspect
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .kernels import decode_linears
from .unwrap import unwrap


@dataclass(frozen=True)
class SamplingSettings:
    group_size: int  # completions per prompt (G)
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k


@dataclass
class Completion:
    tokens: list[int]  # the sampled tokens, through the stop token when one was sampled
    logps: list[float]  # log-prob of each token under softmax(logits / temperature)
    stopped: bool  # ended with a stop token (False: cut off at max_new_tokens)


@dataclass
class SampleStats:
    """What sampling cost: prompt tokens run (once per group), tokens generated, forwards and seconds."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    forwards: int = 0
    seconds: float = 0.0
    rows: list[int] = field(default_factory=list)  # batch rows of each decode forward

    def add(self, other: SampleStats) -> None:
        self.prompt_tokens += other.prompt_tokens
        self.new_tokens += other.new_tokens
        self.forwards += other.forwards
        self.seconds += other.seconds
        self.rows += other.rows


def filter_logits(scaled: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Temperature-scaled logits [R, V] with the tokens outside top-k and the top-p nucleus set to -inf
    (transformers' TopK / TopP warpers: the nucleus is the smallest set of most likely tokens whose
    probability reaches top_p, and always holds the most likely token)."""
    out = scaled
    if top_k and top_k < out.shape[-1]:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        ordered, index = torch.sort(out, dim=-1)  # ascending
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - top_p
        drop[..., -1] = False
        out = out.masked_fill(drop.scatter(-1, index, drop), float("-inf"))
    return out


def draw(logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row from fp32 logits [R, V]; returns (tokens [R], their log-probs [R] under
    log_softmax(logits / T)). The log-probs are taken at the drawn tokens only: x - max - log(sum(exp(x -
    max))), log_softmax's own formula, without a second pass over the vocabulary."""
    scaled = logits.float() / settings.temperature
    top = scaled.max(-1, keepdim=True).values
    weights = (scaled - top).exp_()
    log_norm = top.squeeze(-1) + weights.sum(-1).log()
    if settings.top_k or settings.top_p < 1.0:  # inverse_cdf takes unnormalised weights
        weights = weights.masked_fill(filter_logits(scaled, settings.top_k, settings.top_p) == float("-inf"), 0.0)
    tokens = inverse_cdf(weights, generator)
    return tokens, scaled.gather(-1, tokens[:, None]).squeeze(-1) - log_norm


CDF_BLOCK = 256  # inverse_cdf's block of the vocabulary


def inverse_cdf(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One index per row of `probs` [R, V] (unnormalised is fine), drawn with probability proportional to its
    entry: the first index whose cumulative sum exceeds a uniform draw u * total. An entry of zero is never
    drawn (its cumulative sum equals the one before it). In two levels, so no cumulative sum runs over the
    whole vocabulary (one over 49k entries in float64 took 8 ms for 32 rows): the block whose cumulative
    block sum passes u * total, then the entry within it that passes what is left."""
    r, v = probs.shape
    blocks = -(-v // CDF_BLOCK)
    padded = torch.nn.functional.pad(probs, (0, blocks * CDF_BLOCK - v)).view(r, blocks, CDF_BLOCK)
    block_cdf = padded.sum(-1, dtype=torch.float64).cumsum(-1)
    u = torch.rand((r, 1), generator=generator, dtype=torch.float64, device=probs.device)
    target = u * block_cdf[:, -1:]
    block = torch.searchsorted(block_cdf, target, right=True).clamp(max=blocks - 1)  # [R, 1]
    before = torch.nn.functional.pad(block_cdf, (1, 0)).gather(-1, block)  # the sum of the blocks before it
    inside = padded.gather(1, block[:, :, None].expand(r, 1, CDF_BLOCK)).squeeze(1)  # [R, BLOCK]
    index = torch.searchsorted(inside.double().cumsum(-1), target - before, right=True)
    # rounding can leave what is left at or past the block's own sum: take its last nonzero entry then
    last = CDF_BLOCK - 1 - (inside > 0).flip(-1).int().argmax(-1, keepdim=True)
    return (block * CDF_BLOCK + torch.minimum(index, last)).squeeze(-1)


def reserve(cache, extra: int) -> None:
    """Give every full-attention layer of a transformers cache room for `extra` more positions, written in
    place by `_append`. Layers of other kinds (sliding windows, quantised) keep their own update."""
    from transformers.cache_utils import DynamicLayer

    for layer in getattr(cache, "layers", ()):
        if type(layer) is DynamicLayer and layer.is_initialized:
            layer._limit = layer.get_seq_length() + extra
            _make_room(layer)
            layer.update = _append.__get__(layer)


def _make_room(layer) -> None:
    n = layer.keys.shape[-2]
    room = []
    for t in (layer.keys, layer.values):
        buf = t.new_empty((*t.shape[:-2], max(layer._limit, n), t.shape[-1]))
        buf[..., :n, :] = t
        room.append(buf)
    layer._room = tuple(room)
    layer.keys, layer.values = room[0][..., :n, :], room[1][..., :n, :]


def _append(layer, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
    """DynamicLayer.update without the copy: write the new positions into the reserved room."""
    keys, values = layer._room
    n, m = layer.keys.shape[-2], key_states.shape[-2]
    if layer.keys.data_ptr() != keys.data_ptr() or layer.keys.shape[0] != keys.shape[0] or n + m > keys.shape[-2]:
        layer._limit = max(layer._limit, n + m)  # rows were selected (a copy), or more positions came
        _make_room(layer)
        keys, values = layer._room
    keys[..., n:n + m, :] = key_states
    values[..., n:n + m, :] = value_states
    layer.keys, layer.values = keys[..., :n + m, :], values[..., :n + m, :]
    return layer.keys, layer.values


class Sampler:
    """Samples groups of completions from `model` (as it is at each call: train the adapter, sample again),
    stopping at the tokenizer's end-of-turn tokens, under the run's precision."""

    def __init__(self, model: torch.nn.Module, tokenizer, device: torch.device | str = "cpu",
                 precision: str = "fp32"):
        from ..data.render import end_of_turn_ids

        self.model, self.tokenizer, self.device = model, tokenizer, torch.device(device)
        self.precision = precision
        self.stop_ids = sorted(end_of_turn_ids(tokenizer))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        params = inspect.signature(unwrap(model).forward).parameters
        self._keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    @property
    def exact(self) -> bool:
        """Whether the generating pass's log-probs equal a training forward's (fp32; reduced precision rounds
        the cached, one-token-at-a-time computation differently)."""
        return self.precision == "fp32"

    def decode(self, completion: Completion) -> str:
        """The completion's text, without its stop token."""
        tokens = completion.tokens[:-1] if completion.stopped else completion.tokens
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    @torch.no_grad()
    def sample(self, prompts: Sequence[Sequence[int]], settings: SamplingSettings, generator: torch.Generator,
               chunk: int | None = None) -> tuple[list[list[Completion]], SampleStats]:
        """G completions of each prompt (in prompt order), `chunk` prompts per batch (default: all)."""
        was_training = self.model.training
        self.model.eval()
        stats = SampleStats()
        out: list[list[Completion]] = []
        step = chunk or len(prompts) or 1
        collecting = gc.isenabled()
        # the collector's full passes over every object of the process (the model's modules, the tokenizer's
        # vocabulary) were 4% of a decode profile; any cycles sampling leaves are collected after it
        gc.disable()
        try:
            with decode_linears(self.model, self.device):
                for k in range(0, len(prompts), step):
                    groups, s = self._chunk([list(p) for p in prompts[k:k + step]], settings, generator)
                    out += groups
                    stats.add(s)
        finally:
            if collecting:
                gc.enable()
            self.model.train(was_training)
        return out, stats

    def _forward(self, **kwargs):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            return self.model(use_cache=True, **kwargs)

    def _chunk(self, prompts: list[list[int]], settings: SamplingSettings, generator: torch.Generator
               ) -> tuple[list[list[Completion]], SampleStats]:
        started = time.perf_counter()
        g = settings.group_size
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[r, width - len(p):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self._forward(input_ids=ids, attention_mask=mask, position_ids=positions, **self._keep)
        cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
        cache.batch_repeat_interleave(g)
        reserve(cache, settings.max_new_tokens)
        logits = out.logits[:, -1].float().repeat_interleave(g, dim=0)
        mask = mask.repeat_interleave(g, dim=0)
        position = positions[:, -1].repeat_interleave(g, dim=0)
        stats = SampleStats(prompt_tokens=sum(len(p) for p in prompts), forwards=1)
        rows = torch.arange(len(prompts) * g, device=self.device)  # which completion each batch row is
        done: list[Completion | None] = [None] * (len(prompts) * g)
        tokens: list[list[int]] = [[] for _ in done]
        logps: list[list[float]] = [[] for _ in done]
        stop = torch.tensor(self.stop_ids, device=self.device)
        finished_in_batch = 0
        for t in range(settings.max_new_tokens):
            tok, lp = draw(logits, settings, generator)
            stopped = torch.isin(tok, stop)
            for i, x, v, s in zip(rows.tolist(), tok.tolist(), lp.tolist(), stopped.tolist(), strict=True):
                if done[i] is not None:
                    continue
                tokens[i].append(x)
                logps[i].append(v)
                stats.new_tokens += 1
                if s or t == settings.max_new_tokens - 1:
                    done[i] = Completion(tokens[i], logps[i], bool(s))
                    finished_in_batch += 1
            alive = torch.tensor([done[i] is None for i in rows.tolist()], device=self.device)
            if not bool(alive.any()):
                break
            if finished_in_batch * 8 >= len(rows):
                keep = alive.nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                rows, tok, mask, position = rows[keep], tok[keep], mask[keep], position[keep]
                finished_in_batch = 0
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=-1)
            position = position + 1
            stats.rows.append(len(rows))
            out = self._forward(input_ids=tok[:, None], attention_mask=mask, position_ids=position[:, None],
                                **{self._cache_arg: cache})
            cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
            logits = out.logits[:, -1].float()
            stats.forwards += 1
        stats.seconds = time.perf_counter() - started
        completions = [c if c is not None else Completion(tokens[i], logps[i], False) for i, c in enumerate(done)]
        return [completions[k * g:(k + 1) * g] for k in range(len(prompts))], stats


def tokens_per_second(stats: SampleStats) -> float:
    return stats.new_tokens / stats.seconds if stats.seconds > 0 and math.isfinite(stats.seconds) else 0.0
