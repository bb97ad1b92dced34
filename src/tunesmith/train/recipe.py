"""The training recipe, top to bottom: set up the process, load the data, load the model and attach the
adapter, render the examples, set up the reference and the loop, train, save the adapter and the run record.
Multi-stage configs (SFT then DPO) run the recipe once per stage, each stage starting from the previous
stage's adapter."""

from __future__ import annotations

import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from ..config import RunConfig, dump_config, stage_config
from ..console import advance, counted, make_console, phase
from ..data.batching import pack_setting
from ..data.formats import common_system_prompt
from ..data.load import load_data, write_rejects
from ..data.plan import BatchPlan
from ..data.render import Renderer
from ..data.types import Dataset
from ..errors import TunesmithError
from ..methods import Method, get_method
from ..methods.logps import check_head
from ..methods.reference import Reference, build_reference
from ..model import adapters
from ..model.attention import attention_summary
from ..model.device import Runtime, make_runtime
from ..model.load import load_model_and_tokenizer, model_identity
from ..model.memory import memory_report, reset_peaks
from ..model.sampling import Sampler
from ..model.unwrap import unwrap
from .loop import Policy, Trainer, TrainState
from .optim import build_optimizer
from .parallel import SingleProcess, setup_parallel, world_from_env
from .rollout import RolloutSource
from .rundir import RunDir, data_hash
from .session import run_loop
from .source import Collator, PlannedSource, eval_batches, planned_items


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
    folder), finished stages are kept and the interrupted one continues from its newest complete checkpoint.
    `trackers` (train/trackers.py) receive every stage's metrics."""
    console = console or make_console()
    if not cfg.stages:
        return train_stage(cfg, cfg.run_dir, console, progress, resume, trackers)
    runs: list[Run] = []
    from_adapter = cfg.adapter.from_adapter
    for i in range(len(cfg.stages)):
        stage_cfg = _continuing(stage_config(cfg, i), from_adapter)
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
    return _finish_stages(cfg, runs)


def _continuing(stage_cfg: RunConfig, from_adapter: str | Path | None) -> RunConfig:
    """A stage that starts where the previous one ended: from its adapter, or its full checkpoint."""
    if not from_adapter:
        return stage_cfg
    if stage_cfg.adapter.kind == "full":
        return stage_cfg.model_copy(update={"model": str(from_adapter)})
    return stage_cfg.model_copy(update={"adapter": stage_cfg.adapter.model_copy(
        update={"from_adapter": str(from_adapter)})})


def _finish_stages(cfg: RunConfig, runs: list[Run]) -> Run:
    final = RunDir(cfg.run_dir)
    final.write_config(cfg)
    if final.adapter.exists():
        shutil.rmtree(final.adapter)
    shutil.copytree(runs[-1].adapter, final.adapter)
    info = {**runs[-1].info, "stages": [str(r.path) for r in runs]}
    final.write_run_json(info)
    return Run(cfg.run_dir, cfg, runs[-1].state, info, runs)


# ---------------------------------------------------------------- one stage, in named steps

@dataclass
class Stage:
    """Everything one stage's loop needs, built by `prepare_stage` (benchmarks reuse it)."""

    cfg: RunConfig
    rt: Runtime
    parallel: SingleProcess
    run: RunDir
    method: Method
    train_ds: Dataset
    model: torch.nn.Module
    tokenizer: Any
    items: list
    eval_items: list | None
    render_stats: dict
    trainer: Trainer
    reference: Reference | None


def train_stage(cfg: RunConfig, run_path: Path, console: Console, progress: bool = True,
                resume: str | None = None, trackers=None, stage: str | None = None) -> Run:
    started = time.time()
    st = prepare_stage(cfg, run_path, console, progress)
    if trackers is not None:
        trackers.attach(st.run, st.rt, stage)  # train.report_to: mirrors metrics.jsonl
    extra = {"reference_key": getattr(st.reference, "key", None)}
    state = run_loop(st.trainer, st.run, cfg, console, progress, resume, extra, examples=len(st.items))
    return finish_stage(st, state, console, time.time() - started)


def prepare_stage(cfg: RunConfig, run_path: Path, console: Console, progress: bool = True) -> Stage:
    cfg = with_accumulation(cfg, world_from_env()[1])
    rt = make_runtime(cfg.device, cfg.precision, cfg.threads)
    parallel = setup_processes(cfg, rt, console)
    reset_peaks(rt.device)
    run = RunDir(run_path, rt.is_main)
    run.write_config(cfg)
    seed_everything(cfg.train.seed)
    method = get_method(cfg.method, cfg.method_args)
    refuse_online_parallel(cfg, method, parallel)
    train_ds, eval_ds = setup_data(cfg, method, run, console)
    shown = progress and rt.is_main  # the phases' progress bars
    model, tokenizer = setup_model(cfg, rt, console, progress=shown)
    items, eval_items, stats = render_items(cfg, method, tokenizer, train_ds, eval_ds, console, progress=shown)
    trainer, reference = setup_trainer(cfg, method, model, tokenizer, items, eval_items, rt, parallel, console,
                                       progress=shown)
    return Stage(cfg, rt, parallel, run, method, train_ds, model, tokenizer, items, eval_items, stats, trainer,
                 reference)


def refuse_online_parallel(cfg: RunConfig, method: Method, parallel: SingleProcess) -> None:
    """Before any data or model is loaded: an online method trains in one process only, for now (the rollout
    source does not yet make ranks agree on skipped groups, sampling metrics or a batch pending at a checkpoint)."""
    if method.online and parallel.world_size > 1:
        raise TunesmithError(f"method '{cfg.method}' samples its batches during training and runs in one process "
                             f"only; this run was started as {parallel.world_size} processes",
                             hint="run `tunesmith train CONFIG` without torchrun for an online method (in a "
                                  "multi-stage config: run the online stage in a config of its own)")


def with_accumulation(cfg: RunConfig, world_size: int) -> RunConfig:
    """`train.global_batch_size` fixes the examples per optimizer step over all processes; the accumulation
    follows from the micro-batch and the number of processes, which must divide it."""
    t = cfg.train
    if t.global_batch_size is None:
        return cfg
    per_pass = t.micro_batch_size * world_size
    if t.grad_accum != 1 or t.global_batch_size % per_pass:
        fits = [m for m in range(1, t.global_batch_size + 1) if t.global_batch_size % (m * world_size) == 0]
        raise TunesmithError(
            f"train.global_batch_size {t.global_batch_size} is not micro_batch_size {t.micro_batch_size} x "
            f"{world_size} process(es) x a whole number of accumulation steps"
            + (" (and train.grad_accum is set too)" if t.grad_accum != 1 else ""),
            f"leave train.grad_accum unset and use a micro_batch_size that divides it: {fits[-4:] or 'none'}, "
            f"or change the number of processes")
    accum = t.global_batch_size // per_pass
    return cfg.model_copy(update={"train": t.model_copy(update={"grad_accum": accum})})


def setup_processes(cfg: RunConfig, rt: Runtime, console: Console) -> SingleProcess:
    """Join the other processes (under torchrun) and check that this run can use them, before any work."""
    t = cfg.train
    if world_from_env()[1] > 1 and cfg.adapter.kind == "qlora" and t.parallel == "fsdp" and rt.device.type != "cuda":
        raise TunesmithError("QLoRA with FSDP2 needs CUDA: FSDP2 shards bitsandbytes' 4-bit storage only with "
                             "its CUDA kernels", "use train.parallel: ddp on CPU, or run on GPUs")
    parallel = setup_parallel(t.parallel, rt.device, cpu_offload=t.fsdp_cpu_offload, timeout_s=t.dist_timeout_s)
    parallel.same_on_every_rank(dump_config(cfg), "the config")
    return parallel


def setup_data(cfg: RunConfig, method: Method, run: RunDir, console: Console) -> tuple[Dataset, Dataset | None]:
    train_ds, eval_ds = load_data(cfg.data, cfg.train.seed, method.example_kind)
    check_data_kind(cfg, method, train_ds)
    if train_ds.rejected:
        write_rejects(train_ds, run.path / "rejects.jsonl")
        console.print(f"[yellow]skipped {len(train_ds.rejected)} invalid rows; see {run.path / 'rejects.jsonl'}")
    return train_ds, eval_ds


def check_data_kind(cfg: RunConfig, method: Method, train_ds: Dataset) -> None:
    """The training data are of the kind the method trains on (what training and the plan both check)."""
    if train_ds.kind != method.example_kind:
        raise TunesmithError(
            f"method '{cfg.method}' trains on {method.example_kind} examples but the data in {cfg.data.train} "
            f"is {train_ds.kind} ({train_ds.format} format)",
            hint="use preference data (prompt/chosen/rejected) for dpo/ipo/orpo/simpo, labelled "
                 "prompt/completion/label rows for kto, conversations for sft, documents (a text column, "
                 ".txt/.md files) for cpt, and any data with prompts for grpo")


def setup_model(cfg: RunConfig, rt: Runtime, console: Console, progress: bool = True
                ) -> tuple[torch.nn.Module, Any]:
    """The base model as the adapter kind needs it, with the adapter attached and the training layers set."""
    with phase("load model", console=console, enabled=progress):
        model, tokenizer = load_model_and_tokenizer(
            cfg.model, device=rt.device, precision=rt.precision, dtype=base_dtype(cfg, rt.precision),
            quantize_nf4=cfg.adapter.kind == "qlora", double_quant=cfg.adapter.double_quant,
            quantize_embeddings=cfg.adapter.embeddings_in_4bit,
            trust_remote_code=cfg.trust_remote_code, revision=cfg.revision,
            allow_pickle_weights=cfg.allow_pickle_weights,
            quant_storage="bf16" if _sharded_qlora(cfg) else "uint8")
    if cfg.adapter.from_adapter:
        model = adapters.load_adapter(model, cfg.adapter.from_adapter, trainable=True)
    else:
        model = adapters.apply_adapter(model, cfg.adapter)
    if cfg.train.grad_checkpointing:
        adapters.enable_gradient_checkpointing(model)
    choose_attention(model, rt, cfg.train.fused, cfg.train.attention, cfg.train.liger)  # before compiling
    check_head(model)  # the chunked LM head reproduces this model's own log-probs, or the run stops here
    if cfg.train.compile:
        adapters.compile_layers(model)
    if rt.is_main:
        console.print(adapters.format_summary(adapters.trainable_summary(model)))
    return model, tokenizer


def _sharded_qlora(cfg: RunConfig) -> bool:
    """QLoRA under FSDP2 (only when asked for: `train.parallel: auto` keeps 4-bit replicas, which are small)."""
    return cfg.adapter.kind == "qlora" and cfg.train.parallel == "fsdp" and world_from_env()[1] > 1


def render_items(cfg: RunConfig, method: Method, tokenizer: Any, train_ds: Dataset, eval_ds: Dataset | None,
                 console: Console, progress: bool = True) -> tuple[list, list | None, dict]:
    d = cfg.data
    renderer = Renderer(tokenizer, d.max_length, d.truncation, d.train_on, d.system_prompt, d.window_overlap,
                        d.cross_document)
    n_examples = len(train_ds.examples) + (len(eval_ds.examples) if eval_ds is not None else 0)
    with phase("tokenise", n_examples, console, "examples", enabled=progress):
        items = [x for x in (method.render(renderer, ex) for ex in counted(train_ds.examples)) if x is not None]
        stats = renderer.stats.as_dict()
        rendered_eval = None
        if eval_ds is not None:
            rendered_eval = [x for x in (method.render(renderer, ex) for ex in counted(eval_ds.examples))
                             if x is not None]
    _report_render(console, stats, cfg)
    items, note = method.prepare(items, cfg.train.micro_batch_size, "train")
    notes = [note]
    eval_items = None
    if rendered_eval is not None:
        eval_items, note = method.prepare(rendered_eval, cfg.train.micro_batch_size, "eval")
        notes.append(note)
    for note in filter(None, notes):
        console.print(f"[yellow]{note}")
    if not items:
        raise TunesmithError("no training examples left after rendering", "check `tunesmith data check`")
    return items, eval_items, stats


def setup_trainer(cfg: RunConfig, method: Method, model: torch.nn.Module, tokenizer: Any, items: list,
                  eval_items: list | None, rt: Runtime, parallel: SingleProcess, console: Console,
                  progress: bool = True) -> tuple[Trainer, Reference | None]:
    t = cfg.train
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pack = pack_setting(t.packing, t.pack_length)
    plan = BatchPlan.from_config([method.length(x) for x in items], t, parallel.world_size)
    collator = Collator(method, pad_id, pack, rt.device)
    policy = Policy(model, method, t.logits_chunk)
    parallel.resolve(policy, "ddp" if cfg.adapter.kind == "qlora" else None)
    if parallel.sharded and cfg.adapter.embeddings_in_4bit:
        raise TunesmithError("FSDP2 cannot shard tunesmith's 4-bit embedding table (one packed table shared by "
                             "the embedding and the head)", "set adapter.quantize_embeddings: false with "
                             "train.parallel: fsdp (the embedding and head then stay bf16)")
    policy = parallel.wrap(policy)  # before the optimizer is built: FSDP2 replaces the parameters
    if parallel.world_size > 1 and rt.is_main:
        console.print(f"{parallel.world_size} processes, {parallel.engine} ({parallel.why}); global batch "
                      f"{t.micro_batch_size} x {t.grad_accum} accumulation x {parallel.world_size}")
    reference = None
    if method.needs_reference:
        reference = build_reference(model, method, planned_items(plan, items, eval_items, t.micro_batch_size),
                                    cfg, rt, tokenizer, pack, console, progress=advance if progress else None,
                                    forward=policy, reducer=parallel)
    source = batch_source(cfg, method, model, tokenizer, plan, items, collator, rt, parallel)
    eval_source = None
    if eval_items and isinstance(source, RolloutSource):
        def eval_source():
            return source.eval_batches(eval_items, t.micro_batch_size, parallel.world_size)
    elif eval_items:
        def eval_source():
            return eval_batches(eval_items, t.micro_batch_size, collator, parallel.rank, parallel.world_size)
    trainer = Trainer(model, method, source, t, rt, build_optimizer(model, cfg), reference=reference,
                      eval_source=eval_source, parallel=parallel, policy=policy)
    return trainer, reference


def batch_source(cfg: RunConfig, method: Method, model: torch.nn.Module, tokenizer: Any, plan: BatchPlan,
                 items: list, collator: Collator, rt: Runtime, parallel: SingleProcess
                 ) -> PlannedSource | RolloutSource:
    """The fixed batch plan, or for an online method the plan's prompts answered by the current policy."""
    if not method.online:
        return PlannedSource(plan, items, collator, parallel.rank)
    sampler = Sampler(model, tokenizer, rt.device, rt.precision)
    return RolloutSource(method, plan, items, collator, sampler, cfg.train.seed, cfg.method_args.iterations,
                         parallel.rank)


def finish_stage(st: Stage, state: TrainState, console: Console, seconds: float) -> Run:
    cfg, rt = st.cfg, st.rt
    gathered = gathered_weights(st.trainer.policy, st.model) if st.parallel.sharded else None  # every rank takes part
    if rt.is_main:
        adapters.save_adapter(st.model, st.run.adapter, gathered)
        st.tokenizer.save_pretrained(st.run.adapter)
    warnings = st.method.diagnose(state.history)
    for w in warnings:
        console.print(f"[yellow]warning: {w}", soft_wrap=True, highlight=False)
    info = {
        "name": cfg.name, "method": cfg.method, "model": cfg.model, "adapter_kind": cfg.adapter.kind,
        "base_dtype": base_dtype(cfg, rt.precision), "double_quant": cfg.adapter.double_quant,
        "quantize_embeddings": cfg.adapter.embeddings_in_4bit,
        "base_model": model_identity(cfg.model, cfg.revision),
        "data": {"train": cfg.data.train, "format": st.train_ds.format, "examples": len(st.train_ds.examples),
                 "sha256": data_hash(st.train_ds.files), "render": st.render_stats,
                 "eval_examples": len(st.eval_items or [])},
        "system_prompt": common_system_prompt(st.train_ds.examples, cfg.data.system_prompt) or None,
        "trainable": adapters.trainable_summary(st.model), "state": state.as_dict(),
        "steps": st.trainer.total_steps, "wall_time_s": round(seconds, 2), "device": str(rt.device),
        "precision": rt.precision, "final": state.history[-1] if state.history else {}, "warnings": warnings,
        "memory": memory_report(rt.device), "attention": attention_summary(st.model), "complete": True,
    }
    if st.reference is not None:
        info["reference"] = {"key": st.reference.key, "cache_hit": st.reference.cache_hit,
                             "path": str(st.reference.path) if st.reference.path else None}
    st.run.write_run_json(info)
    if rt.is_main:
        from .report import write_run_report

        write_run_report(st.run.path)
    st.parallel.close()
    return Run(st.run.path, cfg, state, info)


def gathered_weights(policy: torch.nn.Module, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) weights of an FSDP2 model on rank 0, named as the model itself names them, less
    the tied copies (a tied head is saved once, as one process saves it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    tied = getattr(unwrap(model), "all_tied_weights_keys", None) or {}
    return {name: v for k, v in full.items() if (name := k.removeprefix("model.")) not in tied}


def _report_render(console: Console, stats: dict, cfg: RunConfig) -> None:
    if "documents" in stats:
        console.print(f"rendered {stats['documents']} documents into {stats['windows']} windows of at most "
                      f"{cfg.data.max_length} tokens: {stats['tokens']} tokens, {stats['trained_tokens']} trained"
                      + (f"; {stats['dropped']} dropped (no text tokens)" if stats["dropped"] else ""))
        return
    msg = f"rendered {stats['rendered']} examples"
    if stats["truncated"]:
        msg += f"; {stats['truncated']} longer than max_length={cfg.data.max_length} were truncated " \
               f"({cfg.data.truncation})"
    if stats["dropped"]:
        msg += f"; {stats['dropped']} dropped (over max_length with truncation: drop, or nothing left to train)"
    console.print(msg)


def choose_attention(model: torch.nn.Module, rt, fused: bool = True, attention: str = "auto",
                     liger: bool = True) -> str:
    """Set up the layers and kernels training runs (model/attention.py): with `train.fused`, the fused
    RMSNorm / SwiGLU / LoRA forwards; per batch, a variable-length flash kernel on CUDA, tunesmith's matmul
    attention for short CPU rows, SDPA with the mask otherwise; Liger's fused cross-entropy for a trained
    head on CUDA. Returns a description of the attention."""
    from ..model.attention import setup

    return setup(model, rt.device, rt.precision, fused, attention, liger)
