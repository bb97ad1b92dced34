"""The speed steps of the GPU run: one training setup per process, on the same model, examples and batch
(prepared once by bench/common.prepare, so every side trains on the same tokens), LoRA r16/alpha 32 on all
linear layers, constant learning rate, one epoch of `steps` x `batch` examples.

tokens/s is steady-state: the real tokens of the run (both whole sequences of a pair, as bench/compare_trl.py
counts them) times the share of steps after the warm-up, over the wall time of those steps; a DPO reference
pre-pass is outside it for every side. MFU: bench/mfu.py's model FLOPs of those tokens against the bf16 matmul
peak measured in the env step."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

SETUP = {
    "tunesmith": "defaults: packing, shared prompts, varlen flash attention on CUDA, head on trained tokens, "
                 "fused norm/SwiGLU/LoRA, fused AdamW",
    "tunesmith-sdpa": "the same with train.attention: sdpa (the 4D mask)",
    "tunesmith-compile": "the same with train.compile: true",
    "hf": "transformers Trainer + PEFT, bf16 base, padding-free (DataCollatorWithFlattening), SDPA",
    "trl": "TRL, bf16 base, no checkpointing; SFT padding_free, DPO precomputed reference",
}
TRAIN_OVERRIDES = {"tunesmith": {}, "tunesmith-sdpa": {"attention": "sdpa"}, "tunesmith-compile": {"compile": True}}


def variant(ctx: dict, method: str, name: str) -> dict:
    if name == "tunesmith-compile" and ctx["dry"]:
        return {"status": "skipped: dry run (compiling the layers takes minutes on a CPU)"}
    if name == "hf" and method != "sft":
        return {"status": "skipped: no transformers-only DPO trainer"}
    if name == "trl":
        try:
            import trl  # noqa: F401
        except ImportError as e:
            return {"status": f"skipped: TRL is not importable ({e}); `make gpu-wheels` ships it with datasets, "
                              "pyarrow and pandas when they fit in what may travel"}
    if ctx["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run = {"hf": _hf, "trl": _trl}.get(name, _tunesmith)
    result = run(ctx, method, name)
    return {"status": "ok", "setup": SETUP[name], **result, **_rates(ctx, method, result["stamps"])}


def _rates(ctx: dict, method: str, stamps: list[float]) -> dict:
    import mfu
    from models import llama_config

    s = ctx[method]
    steps, w = len(stamps) - 1, s["warmup"]
    tokens = sum(s["lengths"])
    steady = stamps[-1] - stamps[w]
    tok_s = tokens * (steps - w) / steps / steady
    flops = mfu.training_flops(mfu.Shapes.of(llama_config(ctx["speed_model"])),
                               mfu.SeqStats(tuple(s["lengths"]), tuple(s["trained"])), 16)
    peak = (ctx.get("results", {}).get("env") or {}).get("peak_flops")
    step_times = [b - a for a, b in zip(stamps[w:-1], stamps[w + 1:], strict=True)]
    return {"tokens_per_s": tok_s, "step_s": statistics.median(step_times), "steps": steps, "warmup": w,
            "mfu": flops / tokens * tok_s / peak if peak else None}


def _tunesmith(ctx: dict, method: str, name: str) -> dict:
    import tunesmith

    s = ctx[method]
    cfg = {"name": f"speed-{method}-{name}", "model": ctx["speed_model_dir"], "method": method,
           "output_dir": str(Path(ctx["work"]) / "runs"), "device": "auto", "precision": "auto",
           "threads": 1 if ctx["dry"] else "auto",
           "data": {"train": s["train_file"], "max_length": s["max_length"]},
           "adapter": {"kind": "lora", "r": 16, "alpha": 32, "target": "all-linear"},
           **({"method_args": {"reference_cache": False}} if method != "sft" else {}),
           "train": {"lr": s["lr"], "max_steps": s["steps"], "micro_batch_size": s["batch"], "schedule": "constant",
                     "warmup_ratio": 0.0, **TRAIN_OVERRIDES[name]}}
    stamps = [0.0]
    run = tunesmith.train(cfg, progress=False, evaluate=False)
    stamps += [r["time"] for r in run.state.history]  # cumulative seconds of the steps themselves
    hist = run.state.history
    counted = sum(r["tokens"] for r in hist[s["warmup"]:]) / (hist[-1]["time"] - hist[s["warmup"] - 1]["time"])
    return {"stamps": stamps, "losses": [r["loss"] for r in hist], "memory": run.info["memory"],
            "attention": run.info.get("attention"), "precision": run.info["precision"],
            "tokens_per_s_counted": counted, "plan": _plan_of(run.info.get("plan"))}


def _plan_of(plan: dict | None) -> dict | None:
    """What the planner step compares: the plan tunesmith.train made before the run, and what it measured."""
    if not plan:
        return None
    return {"peak_bytes": plan["peak_bytes"], "peak_phase": plan["memory"]["peak_phase"],
            "verdict": plan["verdict"], "measured": plan.get("measured", {})}


class _Clock:
    def __init__(self):
        from transformers import TrainerCallback

        clock = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                clock.stamp()

            def on_step_end(self, args, state, control, **kw):
                clock.stamp()

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    clock.losses.append(float(logs["loss"]))

        self.stamps: list[float] = []
        self.losses: list[float] = []
        self.callback = Callback()

    def stamp(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())


def _hf(ctx: dict, method: str, name: str) -> dict:
    import common
    import peft
    from transformers import AutoModelForCausalLM, DataCollatorWithFlattening, Trainer, TrainingArguments

    s, cuda = ctx[method], ctx["device"] == "cuda"
    rows = [json.loads(line) for line in Path(s["trl_file"]).read_text().splitlines()]  # input_ids + labels
    model = AutoModelForCausalLM.from_pretrained(ctx["speed_model_dir"], dtype=torch.bfloat16 if cuda else torch.float32,
                                                 attn_implementation="sdpa")
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                       target_modules="all-linear", task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=str(Path(ctx["work"]) / "hf-out"), per_device_train_batch_size=s["batch"],
                             max_steps=s["steps"], learning_rate=s["lr"], lr_scheduler_type="constant", warmup_steps=0,
                             logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
                             remove_unused_columns=False, bf16=cuda, use_cpu=not cuda, dataloader_num_workers=0)
    clock = _Clock()
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[clock.callback],
                      data_collator=DataCollatorWithFlattening(return_position_ids=True))
    trainer.train()
    return {"stamps": [t - clock.stamps[0] for t in clock.stamps], "losses": clock.losses,
            "memory": common.memory_peaks(ctx["device"])}


def _trl(ctx: dict, method: str, name: str) -> dict:
    import common
    import compare_trl

    s = ctx[method]
    spec = {"method": method, "steps": s["steps"], "batch": s["batch"], "max_length": s["max_length"],
            "lr": s["lr"], "seed": 0, "model_dir": ctx["speed_model_dir"], "workdir": ctx["work"],
            "trl_file": s["trl_file"], "use_cpu": ctx["device"] != "cuda",
            "precision": "bf16" if ctx["device"] == "cuda" else "fp32"}
    clock = _Clock()
    trainer = compare_trl.trl_trainer(spec, True, [clock.callback])
    expected = json.loads(Path(s["expect_file"]).read_text())
    got = compare_trl.trl_token_ids(method, trainer.train_dataset)
    identical = sum(g == e for g, e in zip(got, expected, strict=True)) if len(got) == len(expected) else 0
    t0 = time.perf_counter()
    trainer.train()
    # TRL precomputes the reference inside train(), before its first step (with the dataloader's set-up)
    before = clock.stamps[0] - t0
    return {"stamps": [t - clock.stamps[0] for t in clock.stamps], "losses": clock.losses,
            "before_first_step_s": before,
            "memory": common.memory_peaks(ctx["device"]), "tokens_identical": f"{identical}/{len(expected)}"}


def summary(ctx: dict) -> dict:
    """The speed table of each method, with each side's ratio to TRL (else the transformers baseline)."""
    results = ctx.get("results", {})
    tables, ratios = [], {}
    for method in ("sft", "dpo"):
        rows = {k.split(":")[2]: v for k, v in results.items()
                if k.startswith(f"speed:{method}:") and v["status"] == "ok"}
        if not rows:
            continue
        base_name = "trl" if "trl" in rows else "hf" if "hf" in rows else None
        base = rows.get(base_name) if base_name else None
        lines = [f"**{method.upper()}-LoRA** ({ctx['speed_model']} shapes, {ctx[method]['steps']} steps x "
                 f"{ctx[method]['batch']}, max length {ctx[method]['max_length']})", "",
                 f"| variant | setup | tokens/s | vs {base_name or '—'} | peak CUDA reserved MiB | vs {base_name or '—'} "
                 "| MFU | step s |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for name, r in rows.items():
            mem = (r["memory"].get("cuda") or {}).get("peak_reserved_mib")
            bmem = ((base or {}).get("memory", {}).get("cuda") or {}).get("peak_reserved_mib")
            speed_ratio = r["tokens_per_s"] / base["tokens_per_s"] if base else None
            mem_ratio = mem / bmem if mem and bmem else None
            ratios[f"{method}:{name}"] = {"speed": speed_ratio, "memory": mem_ratio}
            mfu_cell = "—" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            lines.append(f"| {name} | {r['setup']} | {r['tokens_per_s']:.0f} | {_x(speed_ratio)} | "
                         f"{mem if mem is not None else '—'} | {_x(mem_ratio)} | {mfu_cell} | {r['step_s']:.3f} |")
        tables.append("\n".join(lines))
    if not tables:
        return {"status": "skipped: no speed step finished"}
    return {"status": "ok", "table": "\n\n".join(tables), "ratios": ratios}


def _x(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}×"
