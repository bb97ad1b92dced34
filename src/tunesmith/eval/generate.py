"""Batched generation with exactly the chat template and stop tokens serving uses: left padding, greedy by
default, KV cache (transformers' generate)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..data.render import Renderer, end_of_turn_ids
from ..data.types import Message


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

    def prompt_ids(self, messages: Sequence[Message | dict]) -> list[int]:
        return self.renderer.prompt_ids(messages)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[Message | dict]], temperature: float = 0.0,
                 max_new_tokens: int | None = None, seed: int = 0) -> list[str]:
        """One reply per prompt (a list of messages), in input order."""
        ids = [self.prompt_ids(p) for p in prompts]
        return self.generate_ids(ids, temperature, max_new_tokens, seed)

    @torch.no_grad()
    def generate_ids(self, ids: Sequence[Sequence[int]], temperature: float = 0.0,
                     max_new_tokens: int | None = None, seed: int = 0) -> list[str]:
        self.model.eval()
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a batch
        out: list[str] = [""] * len(ids)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        for k in range(0, len(order), self.batch_size):
            chunk = order[k:k + self.batch_size]
            width = max(len(ids[i]) for i in chunk)
            input_ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, i in enumerate(chunk):
                input_ids[r, width - len(ids[i]):] = torch.tensor(ids[i])
                mask[r, width - len(ids[i]):] = 1
            kwargs = dict(max_new_tokens=max_new_tokens or self.max_new_tokens, eos_token_id=self.stop_ids,
                          pad_token_id=self.pad_id, do_sample=temperature > 0)
            if temperature > 0:
                torch.manual_seed(seed + k)
                kwargs.update(temperature=temperature, top_p=1.0, top_k=0)
            with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
                gen = self.model.generate(input_ids=input_ids.to(self.device),
                                          attention_mask=mask.to(self.device), **kwargs)
            for r, i in enumerate(chunk):
                new = gen[r, width:].tolist()
                cut = next((j for j, t in enumerate(new) if t in self.stop_ids), len(new))
                out[i] = self.tok.decode(new[:cut], skip_special_tokens=True)
        return out
