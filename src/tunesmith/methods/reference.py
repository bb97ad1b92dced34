"""Reference log-probs for DPO, IPO and KTO: the policy as it is at step 0, computed once and cached on disk.

No second model is kept. Before the first optimizer step, one pass (eval mode, no grad, the training
autocast, packed batches) scores every sequence of the train and eval items:
  - a fresh LoRA / DoRA / QLoRA adapter: the base model, with the adapter switched off (`disable_adapter`);
    PiSSA / OLoRA adapters move part of each base weight into the adapter, so there the adapter stays on;
  - a stage that starts from an adapter (`adapter.from_adapter`, e.g. the SFT stage): that adapter, as loaded;
  - full fine-tuning: the initial weights.
KTO's mismatched (prompt, completion) sequences depend on which examples share a micro-batch; the batch plan
is a pure function of (seed, epoch), so every pair the run will form is scored in the same pass.

The result is stored as `<cache>/reference/<key>.safetensors` (+ `<key>.json`). The key is the sha256 of
everything the numbers depend on, so a rerun or a resume reuses it and any change computes afresh.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..console import advance, phase
from ..data.batching import Batch, batch_order, collate, pack_setting
from ..data.render import IGNORE, Tokenized
from ..errors import TrainingAborted, TunesmithError
from .logps import SeqLogps, sequence_logps

CACHE_FORMAT = 1


@dataclass
class Table:
    """Reference log-probs of one item set: `logp[i, s]` for sequence s of item i (method.sequences order);
    for KTO also the mismatched pairs (prompt item, completion item) and their log-probs."""

    logp: torch.Tensor  # [N, k]
    n_tokens: torch.Tensor  # [N, k]
    kl_pairs: torch.Tensor | None = None  # [M, 2] int64
    kl_logp: torch.Tensor | None = None  # [M]
    kl_n_tokens: torch.Tensor | None = None  # [M]
    _row: dict[tuple[int, int], int] = field(default_factory=dict, repr=False)

    def kl_row(self, prompt: int, completion: int) -> int:
        if not self._row and self.kl_pairs is not None:
            self._row = {(int(a), int(b)): r for r, (a, b) in enumerate(self.kl_pairs.tolist())}
        if (prompt, completion) not in self._row:
            raise TunesmithError(f"no reference log-prob for the mismatched pair ({prompt}, {completion})",
                                 "this is a bug in tunesmith: the KTO batch plan and the loop disagree")
        return self._row[(prompt, completion)]


class Reference:
    """ReferenceFn: (item indices of a micro-batch, its batch) -> the reference SeqLogps in batch order."""

    def __init__(self, model: torch.nn.Module, method: Any, tables: dict[str, Table], key: str, cache_hit: bool,
                 path: Path | None):
        self.model, self.method, self.tables = model, method, tables
        self.key, self.cache_hit, self.path = key, cache_hit, path

    def __call__(self, indices: Sequence[int], batch: Batch) -> SeqLogps:
        """The loop trains in train mode and evaluates in eval mode, which tells whether `indices` point into
        the train or the eval items; the token counts of the batch confirm it."""
        counts = _target_counts(batch)
        names = ["train", "eval"] if self.model.training else ["eval", "train"]
        for name in names:
            out = self._lookup(name, list(indices))
            if out is not None and torch.equal(out.n_tokens, counts):
                return SeqLogps(out.logp_sum.to(batch.input_ids.device), out.n_tokens.to(batch.input_ids.device))
        raise TunesmithError("the reference log-probs do not match this batch (different token counts)",
                             "this is a bug in tunesmith; rerun with method_args.reference_cache: false and "
                             "report it")

    def _lookup(self, name: str, idx: list[int]) -> SeqLogps | None:
        table = self.tables.get(name)
        if table is None or (idx and max(idx) >= table.logp.shape[0]):
            return None
        logp, n = table.logp[idx].T.reshape(-1), table.n_tokens[idx].T.reshape(-1)
        if hasattr(self.method, "partners"):
            rows = [table.kl_row(idx[i], idx[j]) for i, j in enumerate(self.method.partners(len(idx)))]
            logp = torch.cat([logp, table.kl_logp[rows]])
            n = torch.cat([n, table.kl_n_tokens[rows]])
        return SeqLogps(logp, n)


def _target_counts(batch: Batch) -> torch.Tensor:
    mask = batch.labels[:, 1:] != IGNORE
    seq = batch.seq_ids[:, 1:][mask]
    return torch.bincount(seq, minlength=batch.n_seqs).float().cpu()


# ---------------------------------------------------------------- the KTO batch plan

def kto_pairs(method: Any, items: Sequence[Any], cfg: Any, eval_items: Sequence[Any] | None
              ) -> dict[str, list[tuple[int, int]]]:
    """Every (prompt item, completion item) pair the run's micro-batches will form. Mirrors
    `train.loop.Trainer.micro_batch` (train) and `Trainer.evaluate` (eval); tests check they agree."""
    t = cfg.train
    out = {"train": sorted({p for b in planned_micro_batches(items, method, t) for p in _batch_pairs(method, b)})}
    if eval_items:
        chunks = [list(range(k, min(k + t.micro_batch_size, len(eval_items))))
                  for k in range(0, len(eval_items), t.micro_batch_size)]
        out["eval"] = sorted({p for b in chunks for p in _batch_pairs(method, b)})
    return out


def planned_micro_batches(items: Sequence[Any], method: Any, t: Any) -> list[list[int]]:
    from ..train.loop import plan_steps  # the loop's own arithmetic, so the two cannot drift apart

    lengths = [method.length(x) for x in items]
    per_epoch, total_steps = plan_steps(len(items), t)
    epochs = math.ceil(total_steps * t.grad_accum / per_epoch)
    return [b for e in range(epochs)
            for b in batch_order(lengths, t.micro_batch_size, t.seed, e, t.group_by_length)]


def _batch_pairs(method: Any, batch: list[int]) -> list[tuple[int, int]]:
    return [(batch[i], batch[j]) for i, j in enumerate(method.partners(len(batch)))]


# ---------------------------------------------------------------- the key

def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def items_hash(method: Any, sets: dict[str, Sequence[Any]], pairs: dict[str, list[tuple[int, int]]]) -> str:
    """sha256 of the rendered token ids and labels of every sequence, and of KTO's mismatched pairs."""
    h = hashlib.sha256()
    for name, items in sets.items():
        h.update(f"[{name}:{len(items)}]".encode())
        for item in items:
            for seq in method.sequences(item):
                h.update(json.dumps([seq.input_ids, seq.labels]).encode())
        h.update(json.dumps(pairs.get(name, [])).encode())
    return h.hexdigest()


def reference_mode(cfg: Any) -> str:
    a = cfg.adapter
    if a.kind == "full":
        return "initial-weights"
    if a.from_adapter:
        return "from-adapter"
    return "initial-policy" if a.init in ("pissa", "olora") else "base"


def key_parts(cfg: Any, method: Any, tokenizer: Any, precision: str, data_sha: str) -> dict:
    from ..model.load import model_identity

    a, d = cfg.adapter, cfg.data
    identity = json.dumps(model_identity(cfg.model, cfg.revision), sort_keys=True, default=str)
    adapter = file_sha256(Path(a.from_adapter) / "adapter_model.safetensors") if a.from_adapter else "none"
    return {
        "format": CACHE_FORMAT,
        "model": sha256_bytes(identity.encode()),
        "adapter": adapter,
        "reference": reference_mode(cfg) + (f":{a.init}" if reference_mode(cfg) == "initial-policy" else ""),
        "quantization": (f"nf4:double_quant={a.double_quant},embeddings={a.embeddings_in_4bit}"
                         if a.kind == "qlora" else "none"),
        "data": data_sha,
        "tokenisation": {"max_length": d.max_length, "truncation": d.truncation, "train_on": d.train_on,
                         "system_prompt": d.system_prompt,
                         "template": sha256_bytes((getattr(tokenizer, "chat_template", None) or "").encode())},
        "precision": precision,
        "method_kind": method.example_kind,
    }


def cache_key(parts: dict) -> str:
    return sha256_bytes(json.dumps(parts, sort_keys=True).encode())


def cache_dir() -> Path:
    from ..model.default import cache_root

    return cache_root() / "reference"


# ---------------------------------------------------------------- computing

@torch.no_grad()
def score_sequences(model: torch.nn.Module, seqs: Sequence[Tokenized], pad_id: int, pack_length: int | None,
                    batch_seqs: int, rt: Any, logits_chunk: int,
                    pairs: Sequence[tuple[int, int]] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs and token counts of each sequence's trained tokens, [S] each. Sequences go through
    in batches of about `batch_seqs`, longest first; each of `pairs` (i, j) stays in one batch with its
    shared prompt computed once, as in training."""
    logp, count = torch.zeros(len(seqs)), torch.zeros(len(seqs))
    in_pair = {i for pair in pairs for i in pair}
    units = [list(p) for p in pairs] + [[i] for i in range(len(seqs)) if i not in in_pair]
    units.sort(key=lambda u: -sum(len(seqs[i]) for i in u))
    batches: list[list[list[int]]] = []
    for unit in units:
        if not batches or sum(len(u) for u in batches[-1]) + len(unit) > max(batch_seqs, len(unit)):
            batches.append([])
        batches[-1].append(unit)
    for group in batches:
        idx = [i for u in group for i in u]
        at = {i: k for k, i in enumerate(idx)}
        share = [(at[u[0]], at[u[1]]) for u in group if len(u) == 2]
        batch = collate([seqs[i] for i in idx], pad_id, pack_length, share=share).to(rt.device)
        with rt.autocast():
            out = sequence_logps(model, batch, logits_chunk)
        logp[idx], count[idx] = out.logp_sum.float().cpu(), out.n_tokens.float().cpu()
        advance(len(idx))
    return logp, count


def compute_tables(model: torch.nn.Module, method: Any, sets: dict[str, Sequence[Any]],
                   pairs: dict[str, list[tuple[int, int]]], cfg: Any, rt: Any, pad_id: int) -> dict[str, Table]:
    t = cfg.train
    pack = pack_setting(t.packing, t.pack_length)
    per_set = {}
    for name, items in sets.items():
        seqs = [s for item in items for s in method.sequences(item)]
        seqs += [method.kl_sequence(items[a], items[b]) for a, b in pairs.get(name, [])]
        per_set[name] = seqs
    # a sequence that occurs more than once (eval items that are also train items) is scored once
    unique: dict[tuple, int] = {}
    for seqs in per_set.values():
        for s in seqs:
            unique.setdefault((s.input_ids, s.labels), len(unique))
    todo = [Tokenized(ids, labels) for ids, labels in unique]
    shared: list[tuple[int, int]] = []  # (chosen, rejected), each sequence in at most one pair
    if getattr(method, "shares_prompt", False):
        used: set[int] = set()
        for items in sets.values():
            for item in items:
                c, r = (unique[(s.input_ids, s.labels)] for s in method.sequences(item))
                if c != r and not {c, r} & used:
                    shared.append((c, r))
                    used.update((c, r))
    with phase("reference pass", len(todo), unit="sequences", enabled=rt.is_main):
        all_logp, all_n = score_sequences(model, todo, pad_id, pack, 2 * t.micro_batch_size, rt, t.logits_chunk,
                                          pairs=shared)
    tables = {}
    for name, items in sets.items():
        k = len(method.sequences(items[0]))
        kl_pairs = pairs.get(name)
        rows = torch.tensor([unique[(s.input_ids, s.labels)] for s in per_set[name]], dtype=torch.long)
        logp, n = all_logp[rows], all_n[rows]
        main = len(items) * k
        table = Table(logp[:main].view(len(items), k), n[:main].view(len(items), k))
        if kl_pairs:
            table.kl_pairs = torch.tensor(kl_pairs, dtype=torch.long)
            table.kl_logp, table.kl_n_tokens = logp[main:], n[main:]
        tables[name] = table
    return tables


def reference_context(model: torch.nn.Module, cfg: Any):
    """A fresh adapter is switched off, so the pass sees exactly the base model."""
    if reference_mode(cfg) == "base" and hasattr(model, "disable_adapter"):
        return model.disable_adapter()
    return contextlib.nullcontext()


# ---------------------------------------------------------------- storage (safetensors + JSON only)

def save_tables(tables: dict[str, Table], path: Path, sidecar: dict) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for name, t in tables.items():
        tensors[f"{name}.logp"], tensors[f"{name}.n_tokens"] = t.logp.contiguous(), t.n_tokens.contiguous()
        if t.kl_pairs is not None:
            tensors[f"{name}.kl_pairs"] = t.kl_pairs.contiguous()
            tensors[f"{name}.kl_logp"], tensors[f"{name}.kl_n_tokens"] = t.kl_logp, t.kl_n_tokens
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"key": sidecar["key"]})
    os.replace(tmp, path)
    meta = path.with_suffix(".json")
    tmp_meta = meta.with_name(meta.name + f".tmp-{os.getpid()}")
    tmp_meta.write_text(json.dumps(sidecar, indent=2, default=str))
    os.replace(tmp_meta, meta)


def load_tables(path: Path, sets: dict[str, Sequence[Any]], method: Any,
                pairs: dict[str, list[tuple[int, int]]]) -> dict[str, Table] | None:
    """The cached tables, or None when the file is missing or does not fit these items."""
    from safetensors.torch import load_file

    if not path.exists():
        return None
    try:
        raw = load_file(str(path))
    except Exception:  # noqa: BLE001 - a damaged cache file is recomputed
        return None
    tables = {}
    for name, items in sets.items():
        k = len(method.sequences(items[0]))
        if raw.get(f"{name}.logp") is None or tuple(raw[f"{name}.logp"].shape) != (len(items), k):
            return None
        table = Table(raw[f"{name}.logp"], raw[f"{name}.n_tokens"])
        if pairs.get(name):
            if raw.get(f"{name}.kl_pairs") is None or raw[f"{name}.kl_pairs"].tolist() != [list(p) for p in pairs[name]]:
                return None
            table.kl_pairs = raw[f"{name}.kl_pairs"]
            table.kl_logp, table.kl_n_tokens = raw[f"{name}.kl_logp"], raw[f"{name}.kl_n_tokens"]
        tables[name] = table
    return tables


# ---------------------------------------------------------------- the entry point

def build_reference(model: torch.nn.Module, method: Any, items: Sequence[Any], eval_items: Sequence[Any] | None,
                    cfg: Any, rt: Any, tokenizer: Any, run_path: Path, console: Any) -> Reference:
    """Score (or load from the cache) the reference log-probs of every train and eval item."""
    if not items:
        raise TrainingAborted("no training examples left after rendering", hint="check `tunesmith data check`")
    sets = {"train": list(items)}
    if eval_items:
        sets["eval"] = list(eval_items)
    pairs = kto_pairs(method, items, cfg, eval_items) if hasattr(method, "partners") else {}
    parts = key_parts(cfg, method, tokenizer, rt.precision, items_hash(method, sets, pairs))
    key = cache_key(parts)
    path = cache_dir() / f"{key}.safetensors"
    use_cache = cfg.method_args.reference_cache
    tables = load_tables(path, sets, method, pairs) if use_cache else None
    if tables is not None:
        console.print(f"reference log-probs: cache hit ({key})")
        return Reference(model, method, tables, key, True, path)
    n_items = " + ".join(f"{len(s)} {name}" for name, s in sets.items())
    console.print(f"reference log-probs: scoring {n_items} items ({reference_mode(cfg)}"
                  f"{', cache miss' if use_cache else ', cache off'})")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    started, was_training = time.time(), model.training
    model.eval()
    try:
        with reference_context(model, cfg):
            tables = compute_tables(model, method, sets, pairs, cfg, rt, pad_id)
    finally:
        model.train(was_training)
    if use_cache and rt.is_main:
        sidecar = {"key": key, "parts": parts, "model": cfg.model, "from_adapter": cfg.adapter.from_adapter,
                   "items": {n: len(s) for n, s in sets.items()}, "kl_pairs": {n: len(p) for n, p in pairs.items()},
                   "seconds": round(time.time() - started, 2), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        save_tables(tables, path, sidecar)
        console.print(f"reference log-probs: cached as {key}")
    return Reference(model, method, tables, key, False, path if use_cache else None)
