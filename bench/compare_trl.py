"""tunesmith vs TRL on the same work: same model (tunesmith's default, converted to an HF directory), same
examples and tokens, LoRA r16/alpha 32 on all linear layers, effective batch, max length, bf16 autocast,
constant learning rate, number of steps (one epoch of steps x batch examples, so both see every example once).

Variants, each run in a FRESH process, alternating, for several rounds:
  tunesmith  its defaults: packing with a block-diagonal mask, shared prompts for pairs, length-grouped
             batches, LM head on trained positions only, bf16 frozen base, fused RMSNorm / SwiGLU /
             attention, no gradient checkpointing; DPO reference log-probs up front
  trl        TRL 1.16 defaults (fp32 weights under bf16 autocast, gradient checkpointing on, padded batches)
  trl-fast   TRL's fastest setting that is still correct here: bf16 base, no gradient checkpointing; SFT
             padding_free (checked in the run: packed sequences must not see each other); DPO precomputed
             reference log-probs. (TRL 1.16 disables padding_free for DPO; legacy ORPO has none.)
Reported: median real tokens/s (tokens of the epoch / wall time of reference pass + all steps), median step
time, peak RSS of the child, losses, and MFU against the measured bf16 matmul peak (bench/mfu.py).

    python bench/compare_trl.py --method sft|dpo|orpo [--steps N] [--rounds R] [--batch B] [--max-length L]
    python bench/compare_trl.py --method grpo [--steps N] [--batch PROMPTS] [--group-size G] [--max-new-tokens T]
    python bench/compare_trl.py --method sft --smoke     # 2 steps, 1 round, tiny batch: prints, writes nothing

GRPO (online: generation plus training) has its own children and table: bench/grpo_bench.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import grpo_bench  # noqa: E402
import mfu  # noqa: E402

VARIANTS = ("tunesmith", "trl", "trl-fast")
DEFAULTS = {"sft": {"batch": 8, "max_length": 128, "lr": 2e-4},
            "dpo": {"batch": 4, "max_length": 384, "lr": 5e-5},
            "orpo": {"batch": 8, "max_length": 128, "lr": 5e-5},
            "grpo": {"batch": grpo_bench.DEFAULTS["batch"], "max_length": 256, "lr": grpo_bench.DEFAULTS["lr"]}}
SETUP = {"tunesmith": "packed, shared prompts (pairs), head on trained tokens, bf16 base, fused norm/SwiGLU/attention",
         "trl": "TRL defaults: padded, grad checkpointing, fp32 base",
         "trl-fast": {"sft": "padding_free, no checkpointing, bf16 base",
                      "dpo": "precomputed reference, no checkpointing, bf16 base",
                      "orpo": "no checkpointing, bf16 base"}}


# ---------------------------------------------------------------- children

def child_tunesmith(spec: dict) -> dict:
    import torch
    from rich.console import Console

    from tunesmith.config import parse_config
    from tunesmith.methods import get_method
    from tunesmith.model.device import make_runtime
    from tunesmith.train import recipe
    from tunesmith.train.parallel import setup_parallel
    from tunesmith.train.rundir import RunDir

    raw = {
        "model": spec["model_dir"], "device": "cpu", "precision": spec["precision"], "method": spec["method"],
        "output_dir": spec["workdir"], "data": {"train": spec["train_file"], "max_length": spec["max_length"]},
        "adapter": {"kind": "lora", "r": 16, "alpha": 32, "target": "all-linear"},
        "method_args": {"reference_cache": False} if spec["method"] == "dpo" else {},
        "train": {"lr": spec["lr"], "max_steps": spec["steps"], "micro_batch_size": spec["batch"],
                  "schedule": "constant", "warmup_ratio": 0.0, "seed": spec["seed"]}}
    for section, values in spec.get("overrides", {}).items():  # bench/ablation.py switches techniques off
        raw[section] = {**raw.get(section, {}), **values}
    cfg = parse_config(raw)
    console = Console(stderr=True)
    rt = make_runtime("cpu", cfg.precision, torch.get_num_threads())  # the threads TRL gets, not a probe
    recipe.seed_everything(cfg.train.seed)
    method = get_method(cfg.method, cfg.method_args)
    run = RunDir(Path(spec["workdir"]) / "tunesmith-run")
    train_ds, _ = recipe.setup_data(cfg, method, run, console)
    model, tok = recipe.setup_model(cfg, rt, console)  # as train_stage does
    items, _, _ = recipe.render_items(cfg, method, tok, train_ds, None, console)
    assert len(items) == spec["steps"] * spec["batch"], "examples were dropped"

    started = time.perf_counter()
    trainer, _ = recipe.setup_trainer(cfg, method, model, tok, items, None, rt, setup_parallel(), console)
    ref_s = time.perf_counter() - started  # the reference pre-pass (DPO); nothing else here takes time
    stamps: list[float] = []
    trainer.callbacks.append(lambda tr, rec: stamps.append(time.perf_counter()))
    stamps.append(time.perf_counter())
    state = trainer.fit()
    peak = common.memory_peaks(str(rt.device))  # before the fp32 check below
    pad_id = tok.pad_token_id
    first = method.collate(items[:spec["batch"]], pad_id, trainer.source.collator.pack_length)
    seqs = method.batch_sequences(items[:spec["batch"]])  # the batch's sequences, in its seq-id order
    return {"losses": [r["loss"] for r in state.history], "ref_s": ref_s, "stamps": stamps,
            "isolation": tunesmith_isolation(model, first, seqs, pad_id), "tokens_identical": None,
            "peak_rss_mib": peak["peak_rss_mib"], "cuda": peak["cuda"]}


def tunesmith_isolation(model, batch, seqs: list, pad_id: int) -> float:
    """Largest per-sequence difference between the log-probs in tunesmith's own batch (packed, prompts
    shared) and alone, in nats per trained token (fp32). `seqs` in the batch's sequence order."""
    import torch

    from tunesmith.data.batching import collate
    from tunesmith.methods.logps import sequence_logps

    with torch.no_grad(), common.fp32(model):
        packed = sequence_logps(model, batch)
        alone = torch.cat([sequence_logps(model, collate([s], pad_id)).logp_sum for s in seqs])
    return float(((packed.logp_sum - alone).abs() / packed.n_tokens.clamp(min=1)).max())


def trl_trainer(spec: dict, fast: bool, callbacks: list):
    import datasets
    import peft
    from transformers import AutoTokenizer

    rows = [json.loads(line) for line in Path(spec["trl_file"]).read_text().splitlines()]
    ds = datasets.Dataset.from_list(rows)
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                           task_type="CAUSAL_LM")
    common_args = dict(
        output_dir=str(Path(spec["workdir"]) / "trl-out"), use_cpu=spec.get("use_cpu", True),
        bf16=spec["precision"] == "bf16", max_steps=spec["steps"],
        per_device_train_batch_size=spec["batch"], gradient_accumulation_steps=1, learning_rate=spec["lr"],
        lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True, seed=spec["seed"], max_length=spec["max_length"])
    if fast:
        common_args.update(gradient_checkpointing=False)
        if spec["precision"] == "bf16":
            common_args["model_init_kwargs"] = {"dtype": "bfloat16"}
    kw = dict(model=spec["model_dir"], train_dataset=ds, processing_class=tok, peft_config=lora,
              callbacks=callbacks)
    if spec["method"] == "sft":
        from trl import SFTConfig, SFTTrainer

        if fast:  # every example already fits; TRL refuses max_length with padding_free and no packing
            common_args["max_length"] = None
        return SFTTrainer(args=SFTConfig(**common_args, padding_free=fast), **kw)
    if spec["method"] == "dpo":
        from trl import DPOConfig, DPOTrainer

        return DPOTrainer(args=DPOConfig(**common_args, beta=0.1, precompute_ref_log_probs=fast), **kw)
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    return ORPOTrainer(args=ORPOConfig(**common_args, beta=0.1), **kw)


def trl_token_ids(method: str, ds) -> list[list[list[int]]]:
    """The token ids TRL's prepared dataset holds, per example and sequence."""
    if method == "sft":
        return [[list(x)] for x in ds["input_ids"]]
    if method == "dpo":
        columns = (ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])
        return [[p + c, p + r] for p, c, r in zip(*columns, strict=True)]
    return [[c, r] for c, r in zip(ds["chosen_input_ids"], ds["rejected_input_ids"], strict=True)]


def trl_isolation(trainer, batch: int) -> float:
    """Largest per-sequence difference between TRL's batched log-probs and each sequence's alone, in nats per
    trained token, in fp32 (a padding-free batch is one row; sequences start where position ids restart)."""
    import torch

    inputs = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(batch)]))
    model = trainer.model
    with torch.no_grad(), common.fp32(model):
        out = model(**{k: v for k, v in inputs.items() if k != "labels"}, labels=inputs["labels"],
                    fused_lm_head=True, use_cache=False).log_probs[0]
        starts = (inputs["position_ids"][0] == 0).nonzero().flatten().tolist() + [inputs["input_ids"].shape[1]]
        worst = 0.0
        for a, b in zip(starts[:-1], starts[1:], strict=True):
            ids, labels = inputs["input_ids"][:, a:b], inputs["labels"][:, a:b]
            alone = model(input_ids=ids, labels=labels, fused_lm_head=True, use_cache=False).log_probs.sum()
            n = max(int((labels[0, 1:] != -100).sum()), 1)
            worst = max(worst, float((out[a:b - 1].sum() - alone).abs()) / n)
    return worst


def child_trl(spec: dict, fast: bool) -> dict:
    from transformers import TrainerCallback

    stamps, losses, timing = [], [], {"ref_s": 0.0}

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    if spec["method"] == "dpo":  # time the up-front reference pass (trl-fast) like tunesmith's
        from trl import DPOTrainer

        original = DPOTrainer._precompute_ref_logps

        def timed(self, *a, **k):
            t0 = time.perf_counter()
            out = original(self, *a, **k)
            timing["ref_s"] += time.perf_counter() - t0
            return out

        DPOTrainer._precompute_ref_logps = timed
    trainer = trl_trainer(spec, fast, [Clock()])
    expected = json.loads(Path(spec["expect_file"]).read_text())
    got = trl_token_ids(spec["method"], trainer.train_dataset)
    identical = sum(g == e for g, e in zip(got, expected, strict=True)) if len(got) == len(expected) else 0
    trainer.train()
    peak = common.memory_peaks(str(trainer.model.device))  # before the fp32 check below
    isolation = trl_isolation(trainer, spec["batch"]) if fast and spec["method"] == "sft" else None
    return {"losses": losses, "ref_s": timing["ref_s"], "stamps": stamps, "isolation": isolation,
            "tokens_identical": f"{identical}/{len(expected)}", "peak_rss_mib": peak["peak_rss_mib"],
            "cuda": peak["cuda"]}


# ---------------------------------------------------------------- parent

def summarize(runs: list[dict], tokens: int, flops: float, peak: float) -> dict:
    tok_s = [tokens / (r["ref_s"] + r["stamps"][-1] - r["stamps"][0]) for r in runs]
    steps = [b - a for r in runs for a, b in zip(r["stamps"][1:-1], r["stamps"][2:], strict=True)]
    losses = runs[0]["losses"]
    best = statistics.median(tok_s)
    return {"tok_s": best, "tok_s_all": tok_s, "step_s": statistics.median(steps) if steps else float("nan"),
            "rss": statistics.median(r["peak_rss_mib"] for r in runs), "losses": losses,
            "cuda_reserved": _median_cuda(runs),
            "mean_loss": statistics.fmean(losses) if losses else float("nan"),
            "final_loss": statistics.median(r["losses"][-1] for r in runs if r["losses"]),
            "mfu": mfu.mfu(flops, tokens / best, peak), "isolation": runs[0]["isolation"],
            "tokens_identical": runs[0]["tokens_identical"], "ref_s": statistics.median(r["ref_s"] for r in runs)}


def _median_cuda(runs: list[dict]) -> float | None:
    peaks = [r["cuda"]["peak_reserved_mib"] for r in runs if r.get("cuda")]
    return statistics.median(peaks) if peaks else None


def ratio(x: float, base: float | None) -> str:
    return f"{x / base:.2f}×" if base else ""


def table(method: str, rows: dict[str, dict], precision: str = "bf16") -> str:
    base, fast = rows.get("trl", {}).get("tok_s"), rows.get("trl-fast", {}).get("tok_s")
    lines = ["| variant | setup | tokens/s | vs TRL default | vs TRL fast | step s | peak RSS MiB | peak CUDA MiB | "
             "mean loss | final loss | MFU | isolation (nats/token) | TRL tokens identical |", "|" + "---|" * 13]
    for name, r in rows.items():
        setup = SETUP[name][method] if isinstance(SETUP[name], dict) else SETUP[name]
        setup = setup.replace("bf16 base", f"{precision} base")  # the precision this CPU computes natively
        cells = [name, setup, f"{r['tok_s']:.0f}", ratio(r["tok_s"], base), ratio(r["tok_s"], fast),
                 f"{r['step_s']:.2f}", f"{r['rss']:.0f}",
                 "—" if r["cuda_reserved"] is None else f"{r['cuda_reserved']:.0f}",
                 f"{r['mean_loss']:.4f}", f"{r['final_loss']:.4f}",
                 f"{100 * r['mfu']:.1f}%", "—" if r["isolation"] is None else f"{r['isolation']:.0e}",
                 r["tokens_identical"] or "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", choices=sorted(DEFAULTS), default="sft")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=None, help="examples (pairs) per optimizer step")
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=None,
                   help="default: all (grpo: tunesmith, trl)")
    p.add_argument("--group-size", type=int, default=grpo_bench.DEFAULTS["group_size"], help="grpo: answers per prompt")
    p.add_argument("--max-new-tokens", type=int, default=grpo_bench.DEFAULTS["max_new_tokens"],
                   help="grpo: the answers' length limit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's own; "
                   "use 1 on a machine shared with other jobs)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per child run")
    p.add_argument("--smoke", action="store_true",
                   help="2 steps, 1 round, batch 2: check the script, write nothing")
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    d = DEFAULTS[args.method]
    args.variants = args.variants or list(grpo_bench.VARIANTS if args.method == "grpo" else VARIANTS)
    if args.smoke:
        args.steps, args.rounds, args.batch = 2, 1, args.batch or 2
        args.group_size, args.max_new_tokens = min(args.group_size, 4), min(args.max_new_tokens, 8)
        args.max_length = args.max_length or (192 if args.method == "dpo" else 96)
    args.batch = args.batch or d["batch"]
    args.max_length = args.max_length or d["max_length"]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.child:
        spec = json.loads(Path(args.spec).read_text())
        if spec.get("threads"):
            import torch

            torch.set_num_threads(spec["threads"])
        if spec["method"] == "grpo":
            child = grpo_bench.child_tunesmith if args.child == "tunesmith" else grpo_bench.child_trl
            common.emit(child(spec))
        elif args.child == "tunesmith":
            common.emit(child_tunesmith(spec))
        else:
            common.emit(child_trl(spec, fast=args.child == "trl-fast"))
        return
    if args.method == "grpo":
        grpo_bench.run(args, Path(__file__), INTRO)
        return
    import torch
    from transformers import AutoConfig

    from tunesmith.model.default import default_model_dir
    from tunesmith.model.device import resolve_precision

    if args.threads:
        torch.set_num_threads(args.threads)  # the peak is measured with the threads the runs get
    model_dir = str(default_model_dir())
    work = Path(tempfile.mkdtemp(prefix=f"tunesmith-bench-{args.method}-"))
    n = args.steps * args.batch
    print(f"{args.method}: {n} examples ({args.steps} steps x {args.batch}), max length {args.max_length}; "
          f"work dir {work}", flush=True)
    data = common.prepare(args.method, n, args.max_length, work, args.seed)
    shapes = mfu.Shapes.of(AutoConfig.from_pretrained(model_dir))
    stats = mfu.SeqStats(tuple(data.lengths), tuple(data.trained))
    flops = mfu.training_flops(shapes, stats, 16, reference_pass=args.method == "dpo")
    # both tools run in the precision this CPU computes natively: bf16 with AVX512-BF16/AMX, else fp32
    precision = resolve_precision("auto", torch.device("cpu"))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    peak = mfu.measured_peak(shapes, dtype, seconds=0.2 if args.smoke else 1.0)["peak_flops"]
    spec = {"method": args.method, "precision": precision, "steps": args.steps, "batch": args.batch, "max_length": args.max_length,
            "lr": DEFAULTS[args.method]["lr"], "seed": args.seed, "threads": args.threads,
            "model_dir": model_dir, "workdir": str(work),
            "train_file": str(data.train_file), "trl_file": str(data.trl_file),
            "expect_file": str(data.expect_file)}
    spec_file = work / "spec.json"
    spec_file.write_text(json.dumps(spec))
    results: dict[str, list[dict]] = {v: [] for v in args.variants}
    for r in range(args.rounds):
        order = args.variants[r % len(args.variants):] + args.variants[:r % len(args.variants)]
        for v in order:
            t0 = time.time()
            results[v].append(common.run_child(Path(__file__), v, spec_file, work / "children.log", args.timeout))
            print(f"  round {r + 1}/{args.rounds} {v}: {time.time() - t0:.0f}s wall", flush=True)
    rows = {v: summarize(results[v], stats.tokens, flops, peak) for v in args.variants}
    report(args, data, rows, stats, flops, peak, precision)


def report(args, data, rows, stats, flops, peak, precision) -> None:
    info = common.machine()
    text = table(args.method, rows, precision)
    print("\n" + text + "\n")
    for v, r in rows.items():
        print(f"losses {v:>9}: " + " ".join(f"{x:.4f}" for x in r["losses"]))
    v = info["versions"]
    unit = "pairs" if args.method != "sft" else "examples"
    shared = " with shared prompts" if data.computed < stats.tokens else ""
    notes = (f"{common.today()} · {info['cpu']}, {info['cores']} cores · torch {v['torch']}, TRL {v['trl']}, "
             f"transformers {v['transformers']} · {args.steps} steps x {args.batch} {unit}, max length "
             f"{args.max_length}, {args.rounds} rounds, torch threads {args.threads or info['torch_threads']} · "
             f"{stats.tokens} real tokens per run ({sum(stats.trained)} trained; TRL's copies {data.trl_tokens}; "
             f"tunesmith computes {data.computed}{shared}) · "
             f"{flops / stats.tokens / 1e6:.0f} MFLOP/token · {precision} (both tools) · {precision} matmul peak "
             f"{peak / 1e9:.0f} GFLOP/s")
    print(notes)
    if args.smoke or args.no_write:
        print("(nothing written)")
        return
    trajectories = "\n".join(f"    {v:>9}: " + " ".join(f"{x:.3f}" for x in r["losses"]) for v, r in rows.items())
    body = f"{notes}\n\n{text}\n\nLoss per step (round 1; batches differ in order, so compare the means):\n\n" \
           f"{trajectories}\n"
    common.write_method_section(args.method, body, INTRO)
    print(f"wrote {common.DOC}")


INTRO = """`python bench/compare_trl.py --method sft|dpo|orpo|grpo` — see docs/performance.md for what each
variant does and how the numbers are measured (GRPO: bench/grpo_bench.py's docstring). tokens/s counts the real (non-pad) tokens of the epoch over the wall time
of the reference pass (DPO) plus every optimizer step; MFU uses the model FLOPs of bench/mfu.py against the
bf16 matmul peak measured on the same machine. For DPO and ORPO every variant is credited with both whole
sequences of each pair; tunesmith computes a pair's shared prompt once (the notes line gives how many tokens it
actually runs), so its MFU there is an effective figure. "isolation" is the largest difference, in nats per
trained token, between a sequence's log-probs in the first batch (packed; for tunesmith also prompt-shared) and
alone, computed in fp32 after training (exact math gives about 1e-5 or less; a leak between packed sequences
gives tenths to whole nats). ORPO: TRL's NLL term covers the prompt too, tunesmith's the completion only, so
their loss values differ by definition."""


if __name__ == "__main__":
    main()
