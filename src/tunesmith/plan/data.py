"""What the run's data costs: its examples rendered exactly as training renders them (`train.recipe.render_items`:
data.load, data.render and the method's own render / prepare), and the shape of every micro-batch the run's
batch plan (`data.plan.BatchPlan`) forms, collated by the method's own `collate`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from rich.console import Console

from ..config import RunConfig
from ..data.batching import pack_setting
from ..data.load import load_data
from ..data.plan import BatchPlan
from .flops import SeqStats
from .memory import BatchShape

MAX_COLLATED = 20_000  # micro-batches collated for their shapes; beyond, the first epoch's stand for the rest


@dataclass
class DataProfile:
    examples: int  # rendered training items
    eval_examples: int
    steps: int  # optimizer steps of the run
    micro_batches: int  # micro-batches of the run
    epochs: float
    tokens: int  # real tokens of the run's micro-batches (a shared prompt counted for each sequence)
    computed_positions: int  # positions the model runs (padding included, a shared prompt once)
    target_tokens: int
    render: dict
    shapes: list[BatchShape]  # one per collated micro-batch
    sequences: SeqStats  # every sequence of the collated micro-batches (lengths, trained positions)
    reference_sequences: SeqStats | None  # what the reference pre-pass scores (train + eval), if any
    tokenizer_note: str | None = None
    notes: list[str] = field(default_factory=list)


def render_items(cfg: RunConfig, tokenizer, method) -> tuple[list, list | None, dict]:
    """The train and eval items exactly as the recipe renders them (KTO's lone example left out too)."""
    from ..train.recipe import check_data_kind
    from ..train.recipe import render_items as recipe_render

    train_ds, eval_ds = load_data(cfg.data, cfg.train.seed, method.example_kind)
    check_data_kind(cfg, method, train_ds)
    return recipe_render(cfg, method, tokenizer, train_ds, eval_ds, Console(quiet=True))


def profile(cfg: RunConfig, tokenizer, method, tokenizer_note: str | None = None, world: int = 1) -> DataProfile:
    items, eval_items, stats = render_items(cfg, tokenizer, method)
    plan = BatchPlan.from_config([method.length(x) for x in items], cfg.train, world)
    batches = list(plan.micro_batches())
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pack = pack_setting(cfg.train.packing, cfg.train.pack_length)
    notes, collated = [], batches
    if len(batches) > MAX_COLLATED:
        collated = batches[:plan.per_epoch]
        notes.append(f"batch shapes from the first epoch ({plan.per_epoch:,} of {len(batches):,} micro-batches)")
    shapes, lengths, trained, tokens, computed, targets = [], [], [], 0, 0, 0
    for idx in collated:
        chosen = method.plan_items([items[i] for i in idx])  # an online method: its sampled answers too
        b = method.collate(chosen, pad_id, pack)
        rows, width = b.input_ids.shape
        shapes.append(BatchShape(int(rows), int(width), b.n_target_tokens))
        tokens, computed, targets = tokens + b.n_real_tokens, computed + int(rows * width), targets + b.n_target_tokens
        for seq in method.batch_sequences(chosen):
            lengths.append(len(seq))
            trained.append(seq.n_target)
    scale = len(batches) / len(collated)
    ref = None
    if method.needs_reference:
        seqs = method.batch_sequences(method.plan_items(items)) + (
            method.batch_sequences(method.plan_items(eval_items)) if eval_items else [])
        ref = SeqStats(tuple(len(x) for x in seqs), tuple(x.n_target for x in seqs))
    return DataProfile(
        examples=len(items), eval_examples=len(eval_items or []), steps=plan.total_steps,
        micro_batches=len(batches), epochs=len(batches) / max(plan.per_epoch, 1), tokens=round(tokens * scale),
        computed_positions=round(computed * scale), target_tokens=round(targets * scale), render=stats,
        shapes=shapes, sequences=_scaled(lengths, trained, scale), reference_sequences=ref,
        tokenizer_note=tokenizer_note, notes=notes)


def _scaled(lengths: list[int], trained: list[int], scale: float) -> SeqStats:
    """The collated sequences, repeated to stand for the micro-batches that were not collated."""
    times = max(1, math.floor(scale))
    return SeqStats(tuple(lengths) * times, tuple(trained) * times)


def load_plan_tokenizer(cfg: RunConfig):
    """(tokenizer, note): the model's own tokenizer when it is here; for a shipped architecture whose tokenizer
    is not in the local Hugging Face cache, the default model's, with a note that counts are approximate."""
    from ..model.load import load_tokenizer
    from .architecture import _shipped_name, hub_id_of

    shipped = _shipped_name(cfg.model) if cfg.model else None
    hub_id = hub_id_of(cfg.model) if cfg.model else None
    if shipped is None and hub_id is None:
        return load_tokenizer(cfg.model, cfg.trust_remote_code, cfg.revision), None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(hub_id, local_files_only=True, revision=cfg.revision)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        return tok, None
    except Exception:  # noqa: BLE001 - not cached here: fall back, and say so
        tok = load_tokenizer("default")
        return tok, (f"{hub_id}'s tokenizer is not on this machine; tokens were counted with the default "
                     "model's tokenizer and chat template, so token counts (and time and cost) are approximate")
