"""One base model in memory answering as any candidate: the plain base, or the base with a run's adapter
switched on. Generation uses the serving chat template (`Generator`); the `loss` metric scores the reference
answer's tokens with the same template and label mask as training."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..console import advance
from ..data.batching import collate
from ..data.render import Renderer
from ..data.types import Conversation, Message
from ..errors import TunesmithError
from ..methods.logps import sequence_logps
from ..model.device import make_runtime
from ..model.generate import Generator
from ..model.load import load_model_and_tokenizer
from ..model.swap import AdapterSet
from .candidates import Candidate


class Engine:
    """Loads `base` once and attaches the adapter of every tuned candidate (a run used by several candidates,
    e.g. with and without few-shot, is attached once)."""

    def __init__(self, base: str, candidates: Sequence[Candidate], device: str = "auto", precision: str = "auto",
                 batch_size: int = 16, max_new_tokens: int = 64, system_prompt: str | None = None):
        runs = [c for c in candidates if c.run is not None]
        self.rt = make_runtime(device, precision)
        quantize = bool(runs) and all((c.info or {}).get("adapter_kind") == "qlora" for c in runs)
        dtype = "fp32" if self.rt.precision == "fp32" else self.rt.precision
        settings = _quantised_base(runs) if quantize else {}
        model, tokenizer = load_model_and_tokenizer(base, device=self.rt.device, precision=self.rt.precision,
                                                    dtype=dtype, quantize_nf4=quantize, **settings)
        self.base = base
        self.tokenizer = _run_tokenizer(runs) or tokenizer
        self.adapters = AdapterSet(model)
        self._adapter_of: dict[Path, str] = {}
        for c in runs:
            key = c.run.resolve()  # type: ignore[union-attr]
            if key not in self._adapter_of:
                self._adapter_of[key] = f"candidate{len(self._adapter_of)}"
                self.adapters.add(self._adapter_of[key], c.adapter)  # type: ignore[arg-type]
        self.batch_size = batch_size
        self.system_prompt = system_prompt
        self.generator = Generator(self.adapters.model, self.tokenizer, device=self.rt.device,
                                   precision=self.rt.precision, batch_size=batch_size,
                                   max_new_tokens=max_new_tokens, system_prompt=system_prompt)

    @property
    def model(self) -> torch.nn.Module:
        return self.adapters.model

    def use(self, candidate: Candidate | None) -> None:
        """Switch to a candidate's adapter (None or an untuned candidate: the plain base model)."""
        run = None if candidate is None else candidate.run
        self.adapters.use(None if run is None else self._adapter_of[run.resolve()])

    def generate(self, candidate: Candidate, prompts: Sequence[Sequence[Message]]) -> list[str]:
        self.use(candidate)
        return self.generator.generate(prompts)

    @torch.no_grad()
    def nll(self, candidate: Candidate, prompts: Sequence[Sequence[Message]],
            targets: Sequence[Sequence[Message]]) -> list[float]:
        """Mean negative log-likelihood (nats per token) of each target's assistant tokens given its prompt,
        with exactly the tokens training would train (the turn's content and its end-of-turn token)."""
        self.use(candidate)
        renderer = Renderer(self.tokenizer, max_length=1 << 30, system_prompt=self.system_prompt)
        seqs = []
        for i, (prompt, target) in enumerate(zip(prompts, targets, strict=True)):
            context = tuple(Message(m.role, m.content, train=False) for m in prompt)
            item = renderer.sft(Conversation(context + tuple(target)))
            if item is None:
                raise TunesmithError(f"eval example {i}: its reference answer renders to no tokens",
                                     "every eval example needs a non-empty assistant answer")
            seqs.append(item)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        out = [0.0] * len(seqs)
        self.model.eval()
        for k in range(0, len(order), self.batch_size):
            chunk = order[k:k + self.batch_size]
            batch = collate([seqs[i] for i in chunk], pad).to(self.rt.device)
            with self.rt.autocast():
                logps = sequence_logps(self.model, batch)
            for row, i in enumerate(chunk):
                out[i] = float(-logps.logp_sum[row] / logps.n_tokens[row].clamp(min=1))
            advance(len(chunk))
        return out

    def chat_fn(self, max_new_tokens: int = 16) -> Callable[[list[str]], list[str]]:
        """prompt texts → replies of the plain base model (used when the judge is the base model itself)."""
        def ask(texts: list[str]) -> list[str]:
            self.use(None)
            return self.generator.generate([[Message("user", t)] for t in texts], max_new_tokens=max_new_tokens)

        return ask


def _run_tokenizer(runs: Sequence[Candidate]):
    """The tokenizer a run saved next to its adapter (its chat template is what serving uses)."""
    from transformers import AutoTokenizer

    for c in runs:
        if c.adapter is not None and (c.adapter / "tokenizer_config.json").exists():
            tok = AutoTokenizer.from_pretrained(c.adapter)
            if tok.pad_token_id is None:
                tok.pad_token = tok.eos_token
            return tok
    return None


def local_judge_fn(spec: str, device: str, precision: str, batch_size: int,
                   max_new_tokens: int = 16) -> Callable[[list[str]], list[str]]:
    """A local model (any tunesmith model spec) answering judge prompts greedily."""
    rt = make_runtime(device, precision)
    model, tokenizer = load_model_and_tokenizer(spec, device=rt.device, precision=rt.precision,
                                                dtype="fp32" if rt.precision == "fp32" else rt.precision)
    generator = Generator(model, tokenizer, device=rt.device, precision=rt.precision, batch_size=batch_size,
                          max_new_tokens=max_new_tokens)
    return lambda texts: generator.generate([[Message("user", t)] for t in texts])


def _quantised_base(runs: Sequence[Candidate]) -> dict:
    """The NF4 settings the QLoRA runs were trained with; they share one base, so they must agree."""
    from ..model.runs import quantised_base_settings

    found = {}
    for c in runs:
        settings = quantised_base_settings(c.run, c.info or {})  # type: ignore[arg-type]
        settings.pop("dtype", None)
        found[c.run] = settings
    distinct = {tuple(sorted(s.items())) for s in found.values()}
    if len(distinct) > 1:
        detail = "; ".join(f"{run}: {s}" for run, s in found.items())
        raise TunesmithError("these QLoRA runs were trained on differently quantised bases, so they cannot "
                             f"share one: {detail}", "evaluate them in separate `tunesmith eval` calls")
    return next(iter(found.values()))
