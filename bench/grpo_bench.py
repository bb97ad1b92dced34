"""`compare_trl.py --method grpo`: tunesmith vs TRL 1.16's GRPOTrainer on the same work — the default model,
LoRA r16/alpha 32 on all linear layers, the same banking77 prompts (examples/banking77/json/grpo.jsonl, system
line included), the same continuous reward (bench/grpo_reward.py: no ties, so both do the same work), group size, max new tokens, temperature 1, beta 0, the
`dapo` loss, prompts per step, learning rate and steps, in the precision this CPU computes natively.

  tunesmith  its defaults: sampling with a KV cache, each prompt prefilled once for its G answers, finished
             rows leaving the batch; log-probs of the sampled tokens from the generating pass; a group's G
             completions attend to one copy of its prompt in the training forward
  trl        TRL 1.16 defaults (transformers generate with its cache, gradient checkpointing on)

Reported per variant (median over rounds): tokens/s = (every sequence's prompt + completion tokens) / wall time
of all steps, generation seconds (tunesmith: its sampler; TRL: `GRPOTrainer._generate`) and the rest of the
step time (scoring, log-probs, backward, optimizer), generated tokens/s, peak RSS of the child, mean reward.
Sampled answers differ between the tools (different random streams), so completion lengths are measured for
each and the token counts use each tool's own.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import common

HERE = Path(__file__).resolve().parent
PROMPTS = common.ROOT / "examples" / "banking77" / "json" / "grpo.jsonl"
VARIANTS = ("tunesmith", "trl")
DEFAULTS = {"batch": 4, "group_size": 8, "max_new_tokens": 32, "lr": 1e-5}
SETUP = {"tunesmith": "KV-cache sampler, prompt prefilled once per group, shared prompt in training, gen-pass log-probs",
         "trl": "TRL defaults: generate(), grad checkpointing"}


def prepare(n: int, workdir: Path) -> dict:
    """The first n prompts, as tunesmith prompt rows and TRL conversational rows (same messages, same label)."""
    rows = [json.loads(x) for x in PROMPTS.read_text(encoding="utf-8").splitlines()[:n]]
    if len(rows) < n:
        raise SystemExit(f"{PROMPTS} has {len(rows)} prompts; run examples/banking77/json/prepare.py or use fewer")
    ours, theirs = workdir / "prompts.jsonl", workdir / "trl.jsonl"
    ours.write_text("".join(json.dumps({"prompt": r["messages"][:-1], "label": r["label"]}) + "\n" for r in rows))
    theirs.write_text("".join(json.dumps({"prompt": r["messages"][:-1], "label": r["label"]}) + "\n" for r in rows))
    return {"train_file": str(ours), "trl_file": str(theirs)}


def prompt_tokens(model_dir: str, trl_file: str) -> list[int]:
    """Each prompt's tokens under the chat template with the generation prompt (what both tools feed)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(x) for x in Path(trl_file).read_text().splitlines()]
    texts = [tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in rows]
    return [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]


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

    cfg = parse_config({
        "model": spec["model_dir"], "device": "cpu", "precision": spec["precision"], "method": "grpo",
        "output_dir": spec["workdir"], "data": {"train": spec["train_file"], "max_length": 256},
        "adapter": {"kind": "lora", "r": 16, "alpha": 32, "target": "all-linear"},
        "method_args": {"group_size": spec["group_size"], "max_new_tokens": spec["max_new_tokens"], "beta": 0.0,
                        "loss_type": "dapo", "rewards": [f"python:{HERE / 'grpo_reward.py'}:tunesmith_reward"]},
        "train": {"lr": spec["lr"], "max_steps": spec["steps"], "micro_batch_size": spec["batch"],
                  "schedule": "constant", "warmup_ratio": 0.0, "seed": spec["seed"]}})
    console = Console(stderr=True)
    rt = make_runtime("cpu", cfg.precision, torch.get_num_threads())
    recipe.seed_everything(cfg.train.seed)
    method = get_method(cfg.method, cfg.method_args)
    run = RunDir(Path(spec["workdir"]) / "tunesmith-run")
    train_ds, _ = recipe.setup_data(cfg, method, run, console)
    model, tok = recipe.setup_model(cfg, rt, console)
    items, _, _ = recipe.render_items(cfg, method, tok, train_ds, None, console)
    trainer, _ = recipe.setup_trainer(cfg, method, model, tok, items, None, rt, setup_parallel(), console)
    stamps: list[float] = [time.perf_counter()]
    trainer.callbacks.append(lambda tr, rec: stamps.append(time.perf_counter()))
    state = trainer.fit()
    h = state.history
    return {"stamps": stamps, "gen_s": [r["gen_s"] for r in h], "completion_tokens": sum(r["gen_tokens"] for r in h),
            "reward": [r["reward"] for r in h], "peak_rss_mib": common.peak_rss_mib(),
            "skipped": statistics.fmean(r["zero_std_groups"] for r in h)}


def child_trl(spec: dict) -> dict:
    import datasets
    import grpo_reward
    import peft
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    stamps, logs, gen = [], [], []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

        def on_log(self, args, state, control, logs_=None, **kw):
            record = kw.get("logs") or logs_
            if record and "reward" in record:
                logs.append(record)

    g = spec["group_size"]
    args = GRPOConfig(
        output_dir=str(Path(spec["workdir"]) / "trl-out"), use_cpu=True, bf16=spec["precision"] == "bf16",
        max_steps=spec["steps"], per_device_train_batch_size=spec["batch"] * g, gradient_accumulation_steps=1,
        num_generations=g, max_completion_length=spec["max_new_tokens"], temperature=1.0, beta=0.0,
        loss_type="dapo", learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, seed=spec["seed"])
    rows = [json.loads(x) for x in Path(spec["trl_file"]).read_text().splitlines()]
    trainer = GRPOTrainer(
        model=spec["model_dir"], reward_funcs=[grpo_reward.trl_reward], args=args,
        train_dataset=datasets.Dataset.from_list(rows), processing_class=AutoTokenizer.from_pretrained(spec["model_dir"]),
        peft_config=peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                    task_type="CAUSAL_LM"), callbacks=[Clock()])
    original = trainer._generate

    def timed(*a, **k):
        t0 = time.perf_counter()
        out = original(*a, **k)
        gen.append(time.perf_counter() - t0)
        return out

    trainer._generate = timed
    trainer.train()
    lengths = [r["completions/mean_length"] for r in logs]
    return {"stamps": stamps, "gen_s": gen, "completion_tokens": sum(x * spec["batch"] * g for x in lengths),
            "reward": [r["reward"] for r in logs], "peak_rss_mib": common.peak_rss_mib()}


# ---------------------------------------------------------------- parent

def summarize(runs: list[dict], prompt_tokens_total: int, group_size: int) -> dict:
    def per_run(r):
        wall = r["stamps"][-1] - r["stamps"][0]
        tokens = group_size * prompt_tokens_total + r["completion_tokens"]
        gen = sum(r["gen_s"])
        return {"tok_s": tokens / wall, "wall": wall, "gen_s": gen, "train_s": wall - gen,
                "gen_tok_s": r["completion_tokens"] / gen if gen else 0.0, "tokens": tokens,
                "completion_tokens": r["completion_tokens"], "rss": r["peak_rss_mib"],
                "reward": statistics.fmean(r["reward"]) if r["reward"] else float("nan"),
                "skipped": r.get("skipped", 0.0)}
    each = [per_run(r) for r in runs]
    return {k: statistics.median(e[k] for e in each) for k in each[0]} | {"tok_s_all": [e["tok_s"] for e in each]}


def table(rows: dict[str, dict]) -> str:
    base = rows.get("trl", {})
    lines = ["| variant | setup | tokens/s | vs TRL | generation s | rest of step s | generated tokens/s | "
             "peak RSS MiB | RSS vs TRL | mean reward | groups not run (all-equal rewards) |", "|" + "---|" * 11]
    for name, r in rows.items():
        vs = f"{r['tok_s'] / base['tok_s']:.2f}×" if base else ""
        rss = f"{r['rss'] / base['rss']:.2f}×" if base else ""
        lines.append(f"| {name} | {SETUP[name]} | {r['tok_s']:.0f} | {vs} | {r['gen_s']:.1f} | {r['train_s']:.1f} | "
                     f"{r['gen_tok_s']:.0f} | {r['rss']:.0f} | {rss} | {r['reward']:.3f} | "
                     f"{100 * r['skipped']:.0f}% |")
    return "\n".join(lines)


def run(args, child_main: Path, intro: str) -> None:
    import tempfile

    import torch

    from tunesmith.model.default import default_model_dir
    from tunesmith.model.device import resolve_precision

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = str(default_model_dir())
    work = Path(tempfile.mkdtemp(prefix="tunesmith-bench-grpo-"))
    n = args.steps * args.batch
    files = prepare(n, work)
    precision = resolve_precision("auto", torch.device("cpu"))
    spec = {"method": "grpo", "precision": precision, "steps": args.steps, "batch": args.batch,
            "group_size": args.group_size, "max_new_tokens": args.max_new_tokens, "lr": DEFAULTS["lr"],
            "seed": args.seed, "threads": args.threads, "model_dir": model_dir, "workdir": str(work), **files}
    print(f"grpo: {n} prompts ({args.steps} steps x {args.batch}) x {args.group_size} answers of at most "
          f"{args.max_new_tokens} tokens, {precision}; work dir {work}", flush=True)
    spec_file = work / "spec.json"
    spec_file.write_text(json.dumps(spec))
    variants = [v for v in args.variants if v in VARIANTS]
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:
            t0 = time.time()
            results[v].append(common.run_child(child_main, v, spec_file, work / "children.log", args.timeout))
            print(f"  round {r + 1}/{args.rounds} {v}: {time.time() - t0:.0f}s wall", flush=True)
    total_prompt = sum(prompt_tokens(model_dir, files["trl_file"]))
    rows = {v: summarize(results[v], total_prompt, args.group_size) for v in variants}
    report(args, rows, precision, total_prompt, intro)


def report(args, rows: dict, precision: str, total_prompt: int, intro: str) -> None:
    info = common.machine()
    v = info["versions"]
    text = table(rows)
    notes = (f"{common.today()} · {info['cpu']}, {info['cores']} cores · torch {v['torch']}, TRL {v['trl']}, "
             f"transformers {v['transformers']} · {args.steps} steps x {args.batch} prompts x {args.group_size} "
             f"answers, max {args.max_new_tokens} new tokens, {args.rounds} rounds, torch threads "
             f"{args.threads or info['torch_threads']} · {total_prompt} prompt tokens per run (x {args.group_size} "
             f"sequences each) · {precision} (both tools)")
    print("\n" + text + "\n\n" + notes)
    if args.smoke or args.no_write:
        print("(nothing written)")
        return
    common.write_method_section("grpo", f"{notes}\n\n{text}\n", intro)
    print(f"wrote {common.DOC}")

