"""Reference log-probs for DPO, IPO and KTO (and the KL term of online methods): the policy as it is at
step 0. No second model is kept. Two implementations of one interface, chosen by `method_args.reference`:

- `precomputed` (default): before the first optimizer step, one pass (eval mode, no grad, the training
  autocast) scores every sequence of every micro-batch the batch plan will form, and of every eval chunk,
  with the very collation training uses; the result is cached on disk. A method whose sequences depend on
  the micro-batch (KTO's mismatched pairs) is served by the same code, because the pass asks the method for
  each micro-batch's sequences (`Method.batch_sequences`).
- `live`: computed on each micro-batch during training — the base model with the adapter switched off for a
  fresh adapter, otherwise the trainable weights swapped for a copy of their step-0 values.

What "step 0" means (`reference_mode`):
  - a fresh LoRA / DoRA / QLoRA adapter: the base model, with the adapter switched off (`disable_adapter`);
    PiSSA / OLoRA adapters move part of each base weight into the adapter, so there the adapter stays on;
  - a stage that starts from an adapter (`adapter.from_adapter`, e.g. the SFT stage): that adapter, as loaded;
  - full fine-tuning: the initial weights.

The cache is `<cache>/reference/<key>.safetensors` (+ `<key>.json`); the key is the sha256 of everything the
numbers depend on (the base model's weights, the starting adapter, quantisation, precision, and every
sequence to score), so a rerun or a resume reuses it and any change computes afresh.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from ..console import phase
from ..data.batching import Batch
from ..data.render import IGNORE, Tokenized
from ..errors import TrainingAborted, TunesmithError
from ..model.unwrap import reshard
from .base import Method, Split
from .logps import SeqLogps

CACHE_FORMAT = 2
SeqKey = tuple[tuple[int, ...], tuple[int, ...]]


class Reference(Protocol):
    """(the split the items come from, a micro-batch's items, its collated batch) -> reference log-probs of
    the batch's sequences, in seq-id order."""

    key: str | None

    def __call__(self, split: Split, items: Sequence[Any], batch: Batch) -> SeqLogps: ...


def target_counts(batch: Batch) -> torch.Tensor:
    mask = batch.labels[:, 1:] != IGNORE
    return torch.bincount(batch.seq_ids[:, 1:][mask], minlength=batch.n_seqs).float().cpu()


# ---------------------------------------------------------------- precomputed

@dataclass
class Table:
    """Reference log-probs of the sequences of one split, in the split's canonical (sorted) order."""

    seqs: list[SeqKey]
    logp: torch.Tensor  # [N]
    n_tokens: torch.Tensor  # [N]

    def __post_init__(self) -> None:
        self.row = {s: i for i, s in enumerate(self.seqs)}

    def lookup(self, seqs: Sequence[Tokenized]) -> SeqLogps | None:
        try:
            rows = torch.tensor([self.row[(s.input_ids, s.labels)] for s in seqs], dtype=torch.long)
        except KeyError:
            return None
        return SeqLogps(self.logp[rows], self.n_tokens[rows])


class PrecomputedReference:
    def __init__(self, method: Method, tables: dict[str, Table], key: str, cache_hit: bool, path: Path | None):
        self.method, self.tables = method, tables
        self.key, self.cache_hit, self.path = key, cache_hit, path

    def __call__(self, split: Split, items: Sequence[Any], batch: Batch) -> SeqLogps:
        table = self.tables.get(split)
        out = table.lookup(self.method.batch_sequences(items)) if table is not None else None
        if out is None or not torch.equal(out.n_tokens, target_counts(batch)):
            raise TunesmithError(f"the precomputed reference log-probs do not cover this {split} micro-batch",
                                 "this is a bug in tunesmith; rerun with method_args.reference: live (or "
                                 "method_args.reference_cache: false) and report it")
        device = batch.input_ids.device
        return SeqLogps(out.logp_sum.to(device), out.n_tokens.to(device))


def planned_sequences(method: Method, batches: dict[str, list[list[Any]]]) -> dict[str, list[SeqKey]]:
    """Every distinct sequence the micro-batches of each split put into a batch, in sorted order."""
    out = {}
    for split, groups in batches.items():
        seen = {(s.input_ids, s.labels) for items in groups for s in method.batch_sequences(items)}
        out[split] = sorted(seen)
    return out


Forward = Callable[[Batch], SeqLogps]


class Reducer(Protocol):
    """What the pre-pass needs to share its work between processes (train.parallel provides it)."""

    rank: int
    world_size: int

    def sum_tensor(self, t: torch.Tensor) -> torch.Tensor: ...


class OneProcess:
    rank, world_size = 0, 1

    def sum_tensor(self, t: torch.Tensor) -> torch.Tensor:
        return t


def distinct_groups(method: Method, groups: Iterable[list[Any]]) -> list[list[Any]]:
    """The micro-batches that hold a sequence no earlier one holds (the same list on every rank)."""
    covered: set[SeqKey] = set()
    out = []
    for items in groups:
        keys = [(s.input_ids, s.labels) for s in method.batch_sequences(items)]
        if not all(k in covered for k in keys):
            covered.update(keys)
            out.append(items)
    return out


@torch.no_grad()
def score_batches(forward: Forward, method: Method, groups: Iterable[tuple[list[Any], bool]], pad_id: int,
                  pack_length: int | None, rt: Any, scored: dict[SeqKey, tuple[float, float]],
                  progress: Callable[[int], None] | None = None) -> None:
    """Score each micro-batch (collated exactly as training collates it) and add its sequences to `scored`;
    a group marked False is run but not kept (padding that keeps sharded ranks' forwards in step)."""
    for items, keep in groups:
        batch = method.collate(items, pad_id, pack_length).to(rt.device)
        with rt.autocast():
            out = forward(batch)
        if not keep:
            continue
        seqs = [(s.input_ids, s.labels) for s in method.batch_sequences(items)]
        for s, lp, n in zip(seqs, out.logp_sum.float().tolist(), out.n_tokens.float().tolist(), strict=True):
            scored[s] = (lp, n)
        if progress is not None:
            progress(len(items))
    reshard(forward)  # FSDP2's root keeps what a no-grad forward gathered; training must gather its own


def build_tables(planned: dict[str, list[SeqKey]], scored: dict[SeqKey, tuple[float, float]],
                 reducer: Reducer) -> dict[str, Table]:
    """The tables of every split from this rank's scores and, summed over ranks, everyone else's."""
    every = sorted({s for seqs in planned.values() for s in seqs})
    at = {s: i for i, s in enumerate(every)}
    values, counts = torch.zeros(len(every), 2, dtype=torch.float64), torch.zeros(len(every), dtype=torch.float64)
    for s, v in scored.items():
        values[at[s]] += torch.tensor(v, dtype=torch.float64)
        counts[at[s]] += 1
    values, counts = reducer.sum_tensor(values), reducer.sum_tensor(counts)
    if bool((counts == 0).any()):
        raise TunesmithError("the reference pass left sequences unscored",
                             "this is a bug in tunesmith; rerun with method_args.reference: live and report it")
    values = (values / counts[:, None]).float()
    tables = {}
    for split, seqs in planned.items():
        rows = torch.tensor([at[s] for s in seqs], dtype=torch.long)
        tables[split] = Table(seqs, values[rows, 0].contiguous(), values[rows, 1].contiguous())
    return tables


# ---------------------------------------------------------------- live

class LiveReference:
    """The step-0 policy computed on each micro-batch: with the adapter switched off (a fresh adapter), or
    with the trainable weights swapped for a copy of their step-0 values (a starting adapter, PiSSA/OLoRA,
    full fine-tuning — the copy is as large as the trainable weights)."""

    key = None
    cache_hit = False
    path = None

    def __init__(self, model: torch.nn.Module, mode: str, rt: Any, forward: Forward):
        self.model, self.mode, self.rt, self.forward = model, mode, rt, forward
        self.initial = None if mode == "base" else {
            n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def __call__(self, split: Split, items: Sequence[Any], batch: Batch) -> SeqLogps:
        """What the method scores the policy with (`Method.policy_logps`: per-sequence sums, or per-token
        log-probs for GRPO's KL), for the step-0 policy."""
        was_training = self.model.training
        self.model.eval()
        try:
            with self._step0(), self.rt.autocast():
                return self.forward(batch).detach()
        finally:
            self.model.train(was_training)

    @contextlib.contextmanager
    def _step0(self):
        if self.initial is None:
            with self.model.disable_adapter():
                yield
            return
        params = dict(self.model.named_parameters())
        swap = [(params[n], t) for n, t in self.initial.items()]
        for p, t in swap:
            _exchange(p, t)
        reshard(self.forward)
        try:
            yield
        finally:
            for p, t in swap:
                _exchange(p, t)
            reshard(self.forward)


def _exchange(p: torch.Tensor, t: torch.Tensor) -> None:
    """Swap two parameters' values. FSDP2 gathers a parameter from its own shard storage, so a sharded one
    (a DTensor) swaps values in place; pointing it at other storage would not reach the forward."""
    if not hasattr(p, "to_local"):
        p.data, t.data = t.data, p.data
        return
    mine, other = p.to_local().detach(), t.to_local()
    held = mine.clone()
    mine.copy_(other)
    other.copy_(held)



# ---------------------------------------------------------------- the key

def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sequences_hash(planned: dict[str, list[SeqKey]]) -> str:
    h = hashlib.sha256()
    for split, seqs in planned.items():
        h.update(f"[{split}:{len(seqs)}]".encode())
        for ids, labels in seqs:
            h.update(json.dumps([ids, labels]).encode())
    return h.hexdigest()


def reference_mode(cfg: Any) -> str:
    a = cfg.adapter
    if a.kind == "full":
        return "initial-weights"
    if a.from_adapter:
        return "from-adapter"
    return "initial-policy" if a.init in ("pissa", "olora") else "base"


def key_parts(cfg: Any, tokenizer: Any, precision: str, planned: dict[str, list[SeqKey]]) -> dict | None:
    """Everything the reference numbers depend on; None when the base model's content cannot be pinned
    (then nothing is cached)."""
    from ..model.load import model_identity

    a = cfg.adapter
    identity = model_identity(cfg.model, cfg.revision)
    if not (identity.get("sha256") or identity.get("commit")):
        return None
    adapter = file_sha256(Path(a.from_adapter) / "adapter_model.safetensors") if a.from_adapter else "none"
    mode = reference_mode(cfg)
    return {
        "format": CACHE_FORMAT,
        "model": sha256_bytes(json.dumps(identity, sort_keys=True, default=str).encode()),
        "adapter": adapter,
        "reference": mode + (f":{a.init}" if mode == "initial-policy" else ""),
        "quantization": (f"nf4:double_quant={a.double_quant},embeddings={a.embeddings_in_4bit}"
                         if a.kind == "qlora" else "none"),
        "template": sha256_bytes((getattr(tokenizer, "chat_template", None) or "").encode()),
        "precision": precision,
        "sequences": sequences_hash(planned),
    }


def cache_key(parts: dict) -> str:
    return sha256_bytes(json.dumps(parts, sort_keys=True).encode())


def cache_dir() -> Path:
    from ..model.default import cache_root

    return cache_root() / "reference"


# ---------------------------------------------------------------- storage (safetensors + JSON only)

def save_tables(tables: dict[str, Table], path: Path, sidecar: dict) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for split, t in tables.items():
        tensors[f"{split}.logp"], tensors[f"{split}.n_tokens"] = t.logp, t.n_tokens
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"key": sidecar["key"]})
    os.replace(tmp, path)
    meta = path.with_suffix(".json")
    tmp_meta = meta.with_name(meta.name + f".tmp-{os.getpid()}")
    tmp_meta.write_text(json.dumps(sidecar, indent=2, default=str))
    os.replace(tmp_meta, meta)


def load_tables(path: Path, planned: dict[str, list[SeqKey]]) -> dict[str, Table] | None:
    """The cached tables, or None when the file is missing, damaged or does not fit these sequences."""
    from safetensors.torch import load_file

    if not path.exists():
        return None
    try:
        raw = load_file(str(path))
    except Exception:  # noqa: BLE001 - a damaged cache file is recomputed
        return None
    tables = {}
    for split, seqs in planned.items():
        logp, n = raw.get(f"{split}.logp"), raw.get(f"{split}.n_tokens")
        if logp is None or n is None or logp.shape != (len(seqs),) or n.shape != (len(seqs),):
            return None
        tables[split] = Table(seqs, logp, n)
    return tables


# ---------------------------------------------------------------- the entry point

def build_reference(model: torch.nn.Module, method: Method, batches: dict[str, list[list[Any]]], cfg: Any,
                    rt: Any, tokenizer: Any, pack_length: int | None, console: Any,
                    progress: Callable[[int], None] | None = None, forward: Forward | None = None,
                    reducer: Reducer | None = None) -> Reference:
    """The run's reference: live, or precomputed for every micro-batch in `batches` (per split, the items
    of each micro-batch the run will form) and cached. `forward` runs a batch through the policy as training
    runs it (the wrapped model under DDP/FSDP2; by default the method's own policy log-probs); `reducer`
    shares the pre-pass between processes. With `progress` (a callback, such as
    `tunesmith.console.advance`), the pass is a "reference pass" phase on `console`, counted in the examples
    this process scores."""
    forward = forward or (lambda b: method.policy_logps(model, b, cfg.train.logits_chunk))
    reducer = reducer or OneProcess()
    if cfg.method_args.reference == "live" or method.online:  # an online method's sequences are not known yet
        console.print(f"reference log-probs: live ({reference_mode(cfg)})")
        return LiveReference(model, reference_mode(cfg), rt, forward)
    if not batches.get("train"):
        raise TrainingAborted("no training examples left after rendering", hint="check `tunesmith data check`")
    planned = planned_sequences(method, batches)
    parts = key_parts(cfg, tokenizer, rt.precision, planned) if cfg.method_args.reference_cache else None
    key = cache_key(parts) if parts else sequences_hash(planned)
    path = cache_dir() / f"{key}.safetensors" if parts else None
    tables = load_tables(path, planned) if path else None
    if tables is not None:
        console.print(f"reference log-probs: cache hit ({key})")
        return PrecomputedReference(method, tables, key, True, path)
    sizes = " + ".join(f"{len(s)} {split}" for split, s in planned.items())
    why = ("cache miss" if path else "cache off" if not cfg.method_args.reference_cache
           else "not cached: the base model's content cannot be pinned")
    console.print(f"reference log-probs: scoring {sizes} sequences ({reference_mode(cfg)}, {why})")
    started = time.time()
    tables = _score(model, method, batches, planned, cfg, (rt, tokenizer, pack_length, console), progress, forward,
                    reducer)
    if path is not None and rt.is_main:
        sidecar = {"key": key, "parts": parts, "model": cfg.model, "from_adapter": cfg.adapter.from_adapter,
                   "sequences": {s: len(v) for s, v in planned.items()},
                   "seconds": round(time.time() - started, 2), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        save_tables(tables, path, sidecar)
        console.print(f"reference log-probs: cached as {key}")
    return PrecomputedReference(method, tables, key, False, path)


def _score(model, method, batches, planned, cfg, setup, progress, forward, reducer) -> dict[str, Table]:
    """Rank r scores every world_size-th distinct micro-batch (all ranks run as many forwards); the tables
    are then summed over ranks."""
    rt, tokenizer, pack_length, console = setup
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    todo = distinct_groups(method, (g for groups in batches.values() for g in groups))
    mine = todo[reducer.rank::reducer.world_size]
    n = -(-len(todo) // reducer.world_size)
    groups = [(g, True) for g in mine] + [(mine[-1] if mine else todo[0], False)] * (n - len(mine))
    scored: dict[SeqKey, tuple[float, float]] = {}
    was_training = model.training
    model.eval()
    try:
        shown = progress is not None and rt.is_main
        with reference_context(model, cfg), phase("reference pass", sum(len(g) for g in mine), console, "examples",
                                                  enabled=shown):
            score_batches(forward, method, groups, pad_id, pack_length, rt, scored, progress)
    finally:
        model.train(was_training)
    return build_tables(planned, scored, reducer)


def reference_context(model: torch.nn.Module, cfg: Any):
    """A fresh adapter is switched off, so the pass sees exactly the base model."""
    if reference_mode(cfg) == "base" and hasattr(model, "disable_adapter"):
        return model.disable_adapter()
    return contextlib.nullcontext()
