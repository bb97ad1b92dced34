"""The base model in memory answering as any local candidate: the plain base, or the base with a run's adapter
switched on. Generation uses the serving chat template (`Generator`); the `loss` metric scores the reference
answer's tokens with the same template and label mask as training."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.batching import collate
from ..data.render import Renderer
from ..data.types import Conversation, Message
from ..errors import TunesmithError
from ..methods.logps import sequence_logps
from ..model.device import make_runtime
from ..model.generate import Generator
from ..model.load import load_model_and_tokenizer
from ..model.swap import AdapterSet
from .answers import Answer
from .candidates import Candidate


class _Backend:
    """One loaded copy of the base model with the adapters of the runs it serves."""

    def __init__(self, base: str, rt, runs: Sequence[Candidate], quantize: bool, settings: dict, tokenizer_runs,
                 batch_size: int, max_new_tokens: int, system_prompt: str | None):
        dtype = "fp32" if rt.precision == "fp32" else rt.precision
        model, tokenizer = load_model_and_tokenizer(base, device=rt.device, precision=rt.precision, dtype=dtype,
                                                    quantize_nf4=quantize, **settings)
        self.quantized = quantize
        self.tokenizer = _run_tokenizer(tokenizer_runs) or tokenizer
        self.adapters = AdapterSet(model)
        self.adapter_of: dict[Path, str] = {}
        for c in runs:
            key = c.run.resolve()  # type: ignore[union-attr]
            if key not in self.adapter_of:
                self.adapter_of[key] = f"candidate{len(self.adapter_of)}"
                self.adapters.add(self.adapter_of[key], c.adapter)  # type: ignore[arg-type]
        self.generator = Generator(self.adapters.model, self.tokenizer, device=rt.device, precision=rt.precision,
                                   batch_size=batch_size, max_new_tokens=max_new_tokens, system_prompt=system_prompt)

    def use(self, candidate: Candidate | None) -> None:
        run = None if candidate is None else candidate.run
        self.adapters.use(None if run is None else self.adapter_of[run.resolve()])


class Engine:
    """Loads `base` once and attaches the adapter of every tuned candidate (a run used by several candidates,
    e.g. with and without few-shot, is attached once). QLoRA runs answer on the 4-bit base they were trained
    on; every other candidate, the baselines above all, on the unquantised base (what a user would deploy
    without fine-tuning), so with QLoRA runs and local baselines the base is loaded twice (once in NF4)."""

    def __init__(self, base: str, candidates: Sequence[Candidate], device: str = "auto", precision: str = "auto",
                 batch_size: int = 16, max_new_tokens: int = 64, system_prompt: str | None = None,
                 plain_base: bool = False):
        runs = [c for c in candidates if c.run is not None]
        self.rt = make_runtime(device, precision)
        qlora = [c for c in runs if (c.info or {}).get("adapter_kind") == "qlora"]
        others = [c for c in runs if c not in qlora]
        needs_plain = plain_base or bool(others) or any(c.local and not c.tuned for c in candidates) or not runs
        self.base = base
        self.batch_size = batch_size
        self.system_prompt = system_prompt
        self._backends: dict[bool, _Backend] = {}
        if needs_plain:
            self._backends[False] = _Backend(base, self.rt, others, False, {}, runs, batch_size, max_new_tokens,
                                             system_prompt)
        if qlora:
            self._backends[True] = _Backend(base, self.rt, qlora, True, _quantised_base(qlora), runs, batch_size,
                                            max_new_tokens, system_prompt)
        first = next(iter(self._backends.values()))
        self.tokenizer = first.tokenizer

    def _backend(self, candidate: Candidate | None) -> _Backend:
        quantized = candidate is not None and (candidate.info or {}).get("adapter_kind") == "qlora"
        return self._backends[quantized] if quantized in self._backends else next(iter(self._backends.values()))

    @property
    def adapters(self) -> AdapterSet:
        return self._backend(None).adapters

    @property
    def generator(self) -> Generator:
        return self._backend(None).generator

    @property
    def model(self) -> torch.nn.Module:
        return self.adapters.model

    def ran_on(self, candidate: Candidate) -> str:
        """What the candidate ran on, for the report: the base, its precision or NF4, and the adapter."""
        backend = self._backend(candidate)
        weights = "NF4 4-bit" if backend.quantized else self.rt.precision
        adapter = f" + {(candidate.info or {}).get('adapter_kind', 'lora')} adapter" if candidate.tuned else ""
        return f"{self.base} ({weights}, {self.rt.device.type}){adapter}"

    def use(self, candidate: Candidate | None) -> None:
        """Switch to a candidate's adapter (None or an untuned candidate: the plain base model)."""
        self._backend(candidate).use(candidate)

    def generate(self, candidate: Candidate, prompts: Sequence[Sequence[Message]]) -> list[str]:
        return [a.text for a in self.answer(candidate, prompts)]

    def answer(self, candidate: Candidate, prompts: Sequence[Sequence[Message]],
               max_new_tokens: int | None = None) -> list[Answer]:
        backend = self._backend(candidate)
        backend.use(candidate)
        out = backend.generator.generate_detailed(prompts, max_new_tokens=max_new_tokens)
        return [Answer(g.text, g.prompt_tokens, g.new_tokens, g.hit_limit, g.seconds, None, g.share_seconds)
                for g in out]

    def prompt_ids(self, candidate: Candidate, prompt: Sequence[Message]) -> list[int]:
        return self._backend(candidate).generator.prompt_ids(prompt)

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Mean of the base model's last hidden states over each text's tokens (adapters off): the
        embedding retriever's vectors when no other embedding model is given."""
        backend = self._backend(None)
        backend.use(None)
        model, tok = backend.adapters.model, backend.tokenizer
        out = []
        for k in range(0, len(texts), self.batch_size):
            enc = tok(list(texts[k:k + self.batch_size]), return_tensors="pt", padding=True, truncation=True,
                      max_length=512, add_special_tokens=False)
            enc = {n: v.to(self.rt.device) for n, v in enc.items()}
            hidden = model(**enc, output_hidden_states=True).hidden_states[-1].float()
            mask = enc["attention_mask"].unsqueeze(-1).float()
            out.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 1))

    def scoring_model(self, candidate: Candidate | None) -> tuple[torch.nn.Module, Any]:
        """The model switched to the candidate's adapter (on the base it runs on) and its tokenizer, for
        log-prob scoring outside this class (documents, eval/documents.py)."""
        backend = self._backend(candidate)
        backend.use(candidate)
        return backend.adapters.model, backend.tokenizer

    @torch.no_grad()
    def nll(self, candidate: Candidate, prompts: Sequence[Sequence[Message]],
            targets: Sequence[Sequence[Message]]) -> list[float]:
        """Mean negative log-likelihood (nats per token) of each target's assistant tokens given its prompt,
        with exactly the tokens training would train (the turn's content and its end-of-turn token)."""
        backend = self._backend(candidate)
        backend.use(candidate)
        renderer = Renderer(backend.tokenizer, max_length=1 << 30, system_prompt=self.system_prompt)
        seqs = []
        for i, (prompt, target) in enumerate(zip(prompts, targets, strict=True)):
            context = tuple(replace(m, train=False) for m in prompt)
            item = renderer.sft(Conversation(context + tuple(target)))
            if item is None:
                raise TunesmithError(f"eval example {i}: its reference answer renders to no tokens",
                                     "every eval example needs a non-empty assistant answer")
            seqs.append(item)
        pad = backend.tokenizer.pad_token_id if backend.tokenizer.pad_token_id is not None else 0
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        out = [0.0] * len(seqs)
        model = backend.adapters.model
        model.eval()
        for k in range(0, len(order), self.batch_size):
            chunk = order[k:k + self.batch_size]
            batch = collate([seqs[i] for i in chunk], pad).to(self.rt.device)
            with self.rt.autocast():
                logps = sequence_logps(model, batch)
            for row, i in enumerate(chunk):
                out[i] = float(-logps.logp_sum[row] / logps.n_tokens[row].clamp(min=1))
        return out

    def chat_fn(self, max_new_tokens: int = 16) -> Callable[[list[str]], list[str]]:
        """prompt texts → replies of the plain base model (used when the judge is the base model itself)."""
        def ask(texts: list[str]) -> list[str]:
            backend = self._backend(None)
            backend.use(None)
            return backend.generator.generate([[Message("user", t)] for t in texts], max_new_tokens=max_new_tokens)

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


def embedder_fn(spec: str, device: str, precision: str, batch_size: int) -> Callable[[Sequence[str]], np.ndarray]:
    """A local embedding model (a Hugging Face folder of any encoder, e.g. a sentence-transformers model):
    the mean of its last hidden states over each text's tokens."""
    from transformers import AutoModel, AutoTokenizer

    rt = make_runtime(device, precision)
    if not Path(spec).is_dir():
        raise TunesmithError(f"embedding model {spec}: not a local folder",
                             "give the folder of a Hugging Face encoder (models are never downloaded at run time)")
    tok, model = AutoTokenizer.from_pretrained(spec), AutoModel.from_pretrained(spec).to(rt.device).eval()

    @torch.no_grad()
    def embed(texts: Sequence[str]) -> np.ndarray:
        out = []
        for k in range(0, len(texts), batch_size):
            enc = tok(list(texts[k:k + batch_size]), return_tensors="pt", padding=True, truncation=True,
                      max_length=512)
            enc = {n: v.to(rt.device) for n, v in enc.items()}
            hidden = model(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).float()
            out.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 1))

    return embed


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
