"""The training recipe, top to bottom: load the model, attach the adapter, load and render the data, train
with the one loop, save the adapter and the run record. Multi-stage configs (SFT then DPO) run the recipe
once per stage, each stage starting from the previous stage's adapter."""

from __future__ import annotations

import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from ..config import DataConfig, RunConfig, TrainConfig
from ..console import counted, make_console, phase
from ..data.batching import pack_setting
from ..errors import TunesmithError
from ..methods import get_method
from ..model.device import make_runtime
from .loop import Trainer, TrainState
from .rundir import RunDir, data_hash
from .session import run_loop


@dataclass
class Run:
    """A finished (or resumed) training run and where its outputs are."""

    path: Path
    config: RunConfig
    state: TrainState | None = None
    info: dict = field(default_factory=dict)
    stages: list[Run] = field(default_factory=list)

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def metrics(self) -> list[dict]:
        from .rundir import read_metrics

        return read_metrics(self.path)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def base_dtype(cfg: RunConfig, precision: str) -> str:
    """Frozen base weights are stored in the (resolved) compute precision (half the memory); trained weights
    in fp32."""
    if cfg.adapter.kind == "full" or precision == "fp32":
        return "fp32"
    return precision


def train(cfg: RunConfig, console: Console | None = None, progress: bool = True, resume: str | None = None,
          trackers=None) -> Run:
    """Run a whole config: one stage, or each of `stages` in order. With `resume` ("auto" or a checkpoint
    folder), finished stages are kept and the interrupted one continues from its newest complete checkpoint."""
    console = console or make_console()
    if not cfg.stages:
        return train_stage(cfg, cfg.run_dir, console, progress, resume, trackers)
    runs: list[Run] = []
    from_adapter = cfg.adapter.from_adapter
    for i, stage_cfg in enumerate(stage_configs(cfg)):
        if from_adapter and stage_cfg.adapter.kind == "full":
            stage_cfg = stage_cfg.model_copy(update={"model": str(from_adapter)})  # a full checkpoint
        elif from_adapter:
            stage_cfg = stage_cfg.model_copy(update={"adapter": stage_cfg.adapter.model_copy(
                update={"from_adapter": str(from_adapter)})})
        name = cfg.stages[i].name or f"{i + 1}-{stage_cfg.method}"
        console.print(f"[bold]stage {i + 1}/{len(cfg.stages)}[/bold]: {name} ({stage_cfg.method})")
        stage_dir = cfg.run_dir / "stages" / name
        done = RunDir(stage_dir).read_run_json() if resume and stage_dir.exists() else {}
        if done.get("complete"):
            console.print(f"stage {name} already finished; reusing {stage_dir / 'adapter'}")
            run = Run(stage_dir, stage_cfg, None, done)
            if trackers is not None:
                trackers.finished_stage(stage_dir, name)
        else:
            run = train_stage(stage_cfg, stage_dir, console, progress, resume, trackers, stage=name)
        runs.append(run)
        from_adapter = run.adapter
    final = RunDir(cfg.run_dir)
    final.write_config(cfg)
    if final.adapter.exists():
        shutil.rmtree(final.adapter)
    shutil.copytree(runs[-1].adapter, final.adapter)
    info = {**runs[-1].info, "stages": [str(r.path) for r in runs]}
    final.write_run_json(info)
    return Run(cfg.run_dir, cfg, runs[-1].state, info, runs)


def stage_configs(cfg: RunConfig) -> list[RunConfig]:
    """Expand `stages:` into one full RunConfig per stage (unset fields inherit from the top level)."""
    out = []
    for st in cfg.stages:
        data = cfg.data
        if isinstance(st.data, str):
            data = cfg.data.model_copy(update={"train": st.data, "eval": None})
        elif isinstance(st.data, DataConfig):
            data = st.data
        train_cfg = TrainConfig.model_validate({**cfg.train.model_dump(), **st.train})
        margs = cfg.method_args.model_copy(update={**st.method_args, **({"beta": st.beta} if st.beta else {})})
        out.append(cfg.model_copy(update={"method": st.method, "data": data, "train": train_cfg,
                                          "method_args": margs, "stages": []}))
    return out


def train_stage(cfg: RunConfig, run_path: Path, console: Console, progress: bool = True,
                resume: str | None = None, trackers=None, stage: str | None = None) -> Run:
    from ..data.load import load_data, write_rejects
    from ..data.render import Renderer
    from ..model.adapters import (
        apply_adapter,
        format_summary,
        load_adapter,
        save_adapter,
        trainable_summary,
    )
    from ..model.load import load_model_and_tokenizer, model_identity

    started = time.time()
    rt = make_runtime(cfg.device, cfg.precision, cfg.threads)
    run = RunDir(run_path, rt.is_main)
    if trackers is not None:
        trackers.attach(run, rt, stage)  # train.report_to: mirrors metrics.jsonl
    run.write_config(cfg)
    seed_everything(cfg.train.seed)
    method = get_method(cfg.method, cfg.method_args)

    train_ds, eval_ds = load_data(cfg.data, cfg.train.seed)
    if train_ds.kind != method.example_kind:
        raise TunesmithError(
            f"method '{cfg.method}' trains on {method.example_kind} examples but the data in {cfg.data.train} "
            f"is {train_ds.kind} ({train_ds.format} format)",
            hint="use preference data (prompt/chosen/rejected) for dpo/ipo/orpo/simpo, labelled "
                 "prompt/completion/label rows for kto, and conversations for sft")
    if train_ds.rejected:
        write_rejects(train_ds, run.path / "rejects.jsonl")
        console.print(f"[yellow]skipped {len(train_ds.rejected)} invalid rows; see {run.path / 'rejects.jsonl'}")

    shown = progress and rt.is_main
    with phase("load model", console=console, enabled=shown):
        model, tokenizer = load_model_and_tokenizer(
            cfg.model, device=rt.device, precision=rt.precision, dtype=base_dtype(cfg, rt.precision),
            quantize_nf4=cfg.adapter.kind == "qlora", double_quant=cfg.adapter.double_quant,
            quantize_embeddings=cfg.adapter.embeddings_in_4bit,
            trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    if cfg.adapter.from_adapter:
        model = load_adapter(model, cfg.adapter.from_adapter, trainable=True)
    else:
        model = apply_adapter(model, cfg.adapter)
    if cfg.train.grad_checkpointing:
        from ..model.adapters import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
    choose_attention(model, rt, cfg.train.fused)  # before compiling: it swaps module forwards
    if cfg.train.compile:
        from ..model.adapters import compile_layers

        compile_layers(model)
    summary = trainable_summary(model)
    if rt.is_main:
        console.print(format_summary(summary))

    renderer = Renderer(tokenizer, cfg.data.max_length, cfg.data.truncation, cfg.data.train_on,
                        cfg.data.system_prompt)
    n_examples = len(train_ds.examples) + (len(eval_ds.examples) if eval_ds is not None else 0)
    with phase("tokenise", n_examples, console, "examples", enabled=shown):
        items = [x for x in (method.render(renderer, ex) for ex in counted(train_ds.examples)) if x is not None]
        train_stats = renderer.stats.as_dict()
        eval_items = None
        if eval_ds is not None:
            eval_items = [x for x in (method.render(renderer, ex) for ex in counted(eval_ds.examples))
                          if x is not None]
    _report_render(console, train_stats, cfg)
    if cfg.method == "kto":
        items, eval_items = _kto_items(items, eval_items, cfg.train.micro_batch_size, console)

    reference = None
    if method.needs_reference:
        from ..methods.reference import build_reference

        reference = build_reference(model, method, items, eval_items, cfg, rt, tokenizer, run.path, console)

    optimizer = _optimizer(model, cfg)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainer = Trainer(model, method, items, cfg.train, rt, pad_id, optimizer, eval_items=eval_items,
                      reference=reference, pack_length=pack_setting(cfg.train.packing, cfg.train.pack_length))
    extra = {"reference_key": getattr(reference, "key", None)}
    state = run_loop(trainer, run, cfg, console, progress, resume, extra)

    if rt.is_main:
        save_adapter(model, run.adapter)
        tokenizer.save_pretrained(run.adapter)
    info = {
        "name": cfg.name, "method": cfg.method, "model": cfg.model, "adapter_kind": cfg.adapter.kind,
        "base_dtype": base_dtype(cfg, rt.precision), "double_quant": cfg.adapter.double_quant,
        "quantize_embeddings": cfg.adapter.embeddings_in_4bit,
        "base_model": model_identity(cfg.model, cfg.revision),
        "data": {"train": cfg.data.train, "format": train_ds.format, "examples": len(train_ds.examples),
                 "sha256": data_hash(train_ds.files), "render": train_stats,
                 "eval_examples": len(eval_items or [])},
        "trainable": summary, "state": state.as_dict(), "steps": trainer.total_steps,
        "wall_time_s": round(time.time() - started, 2), "device": str(rt.device), "precision": rt.precision,
        "final": state.history[-1] if state.history else {}, "complete": True,
    }
    if reference is not None:
        info["reference"] = {"key": reference.key, "cache_hit": reference.cache_hit,
                             "path": str(reference.path) if reference.path else None}
    run.write_run_json(info)
    if rt.is_main:
        from .report import write_run_report

        write_run_report(run.path)
    return Run(run.path, cfg, state, info)


def _optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    from ..model.adapters import optimizer_param_groups

    groups = optimizer_param_groups(model, cfg.adapter, cfg.train.lr, cfg.train.weight_decay)
    if cfg.train.optimizer == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=cfg.train.lr)
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(0.9, 0.999), eps=1e-8)


def _kto_items(items: list, eval_items: list | None, micro_batch_size: int, console: Console):
    """KTO cannot score a micro-batch of one example; leave out a single example left over."""
    from ..methods.preference import drop_lone_example

    items, dropped = drop_lone_example(items, micro_batch_size, "training")
    if eval_items:
        eval_items, dropped_eval = drop_lone_example(eval_items, micro_batch_size, "eval")
        dropped += dropped_eval
    if dropped:
        console.print(f"[yellow]kto: left out {dropped} example(s) that would have formed a micro-batch of one "
                      f"(micro_batch_size={micro_batch_size})")
    return items, eval_items


def _report_render(console: Console, stats: dict, cfg: RunConfig) -> None:
    msg = f"rendered {stats['rendered']} examples"
    if stats["truncated"]:
        msg += f"; {stats['truncated']} longer than max_length={cfg.data.max_length} were truncated " \
               f"({cfg.data.truncation})"
    if stats["dropped"]:
        msg += f"; {stats['dropped']} dropped (over max_length with truncation: drop, or nothing left to train)"
    console.print(msg)


def choose_attention(model: torch.nn.Module, rt, fused: bool = True) -> str:
    """Set up the layers training runs: with `train.fused`, the fused RMSNorm / SwiGLU / LoRA forwards
    (`model.fused.fuse`) and, on CPU, tunesmith's matmul attention (model/fused.py) for rows of up to
    MATMUL_ATTENTION_MAX_ROW tokens and SDPA for longer ones, picked per batch. torch's CPU flash-attention
    kernel has a slow backward for 64-dim heads (SmolLM2-135M, 30 layers of 4 x 421 tokens, one thread:
    2.1 s against 1.0 s), while the matmul attention's memory grows with the square of the row length.
    Otherwise (CUDA, or fused off): SDPA. All of them read the same additive mask."""
    from ..model.fused import MATMUL_ATTENTION_MAX_ROW, fuse, register_attention
    from ..model.unwrap import unwrap

    base = unwrap(model)
    if getattr(base.config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return base.config._attn_implementation  # e.g. flash_attention_2 chosen by the user's setup
    if fused:
        fuse(model)
    if fused and rt.device.type == "cpu":
        register_attention()
        base.matmul_attention_max_row = MATMUL_ATTENTION_MAX_ROW
        return f"tunesmith up to {MATMUL_ATTENTION_MAX_ROW} tokens, sdpa above"
    base.set_attn_implementation("sdpa")
    return "sdpa"
