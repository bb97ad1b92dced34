"""What the run's data costs: its examples rendered exactly as training renders them (data.load, data.render
and the method's own render / length / collate), and the shape of every micro-batch the run will form."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..config import RunConfig
from ..data.batching import batch_order, pack_setting
from ..data.load import load_data
from ..data.render import Renderer
from ..train.loop import plan_steps
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
    sequences: SeqStats  # every sequence of one epoch (lengths, trained positions): model FLOPs
    reference_sequences: SeqStats | None  # what the reference pre-pass scores (train + eval), if any
    tokenizer_note: str | None = None
    notes: list[str] = field(default_factory=list)


def render_items(cfg: RunConfig, tokenizer, method) -> tuple[list, list | None, dict]:
    """The train and eval items exactly as train.recipe renders them (KTO's lone example left out too)."""
    train_ds, eval_ds = load_data(cfg.data, cfg.train.seed)
    renderer = Renderer(tokenizer, cfg.data.max_length, cfg.data.truncation, cfg.data.train_on,
                        cfg.data.system_prompt)
    items = [x for x in (method.render(renderer, ex) for ex in train_ds.examples) if x is not None]
    stats = renderer.stats.as_dict()
    eval_items = None
    if eval_ds is not None:
        eval_items = [x for x in (method.render(renderer, ex) for ex in eval_ds.examples) if x is not None]
    if cfg.method == "kto":
        from ..methods.preference import drop_lone_example

        items, _ = drop_lone_example(items, cfg.train.micro_batch_size, "training")
        if eval_items:
            eval_items, _ = drop_lone_example(eval_items, cfg.train.micro_batch_size, "eval")
    return items, eval_items, stats


def run_micro_batches(items: list, method, cfg: RunConfig) -> tuple[list[list[int]], int]:
    """The example indices of every micro-batch the loop will run (train.loop.Trainer.micro_batch), and the
    number of optimizer steps."""
    t = cfg.train
    lengths = [method.length(x) for x in items]
    per_epoch, total_steps = plan_steps(len(items), t)
    n = total_steps * t.grad_accum
    batches: list[list[int]] = []
    for epoch in range(math.ceil(n / per_epoch)):
        order = batch_order(lengths, t.micro_batch_size, t.seed, epoch, t.group_by_length)
        batches += order[:n - len(batches)]
    return batches, total_steps


def profile(cfg: RunConfig, tokenizer, method, tokenizer_note: str | None = None) -> DataProfile:
    items, eval_items, stats = render_items(cfg, tokenizer, method)
    if not items:
        from ..errors import TunesmithError

        raise TunesmithError("no training examples left after rendering", "check `tunesmith data check`")
    batches, steps = run_micro_batches(items, method, cfg)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pack = pack_setting(cfg.train.packing, cfg.train.pack_length)
    notes = []
    collated = batches
    if len(batches) > MAX_COLLATED:
        per_epoch = math.ceil(len(items) / cfg.train.micro_batch_size)
        collated = batches[:per_epoch]
        notes.append(f"batch shapes from the first epoch ({per_epoch:,} of {len(batches):,} micro-batches)")
    shapes, tokens, computed, targets = [], 0, 0, 0
    for idx in collated:
        b = method.collate([items[i] for i in idx], pad_id, pack)
        rows, width = b.input_ids.shape
        shapes.append(BatchShape(int(rows), int(width), b.n_target_tokens))
        tokens += b.n_real_tokens
        computed += int(rows * width)
        targets += b.n_target_tokens
    scale = len(batches) / len(collated)
    return DataProfile(
        examples=len(items), eval_examples=len(eval_items or []), steps=steps, micro_batches=len(batches),
        epochs=len(batches) * cfg.train.micro_batch_size / len(items), tokens=round(tokens * scale),
        computed_positions=round(computed * scale), target_tokens=round(targets * scale), render=stats,
        shapes=shapes, sequences=_sequences(method, items),
        reference_sequences=_sequences(method, items + list(eval_items or [])) if method.needs_reference else None,
        tokenizer_note=tokenizer_note, notes=notes)


def _sequences(method, items: list) -> SeqStats:
    seqs = []
    for item in items:
        seqs += method.sequences(item) if hasattr(method, "sequences") else [item]
    return SeqStats(tuple(len(s) for s in seqs), tuple(s.n_target for s in seqs))


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
