"""Eval speed on CPU: batched generation throughput, and the wall time of a whole `tunesmith eval` of
banking77 test examples with the default model (`base` candidate, exact metric, 16 new tokens).

    .venv/bin/python bench/eval_speed.py                       # the documented run
    .venv/bin/python bench/eval_speed.py --threads 1 --batch-sizes 16,32,64 --examples 500

Prints one JSON object; docs/BENCHMARKS.md ("Evaluation speed") records the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TEST = ROOT / "examples" / "banking77" / "test.jsonl"
TRAIN = ROOT / "examples" / "banking77" / "train.jsonl"


def machine() -> dict:
    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_avg_1min": load, "python": platform.python_version(), "torch": torch.__version__}


def load_prompts(n: int, fewshot: int = 0) -> list:
    """n banking77 test prompts (the eval's seeded subset), optionally with `fewshot` training examples."""
    from tunesmith.data.formats import prompt_messages
    from tunesmith.data.load import load_examples
    from tunesmith.eval.candidates import pick_shots, with_shots
    from tunesmith.eval.run import subsample

    prompts = [prompt_messages(ex) for ex in subsample(list(load_examples(str(TEST)).examples), n, seed=0)]
    if fewshot:
        shots = pick_shots(list(load_examples(str(TRAIN)).examples), fewshot, seed=0, exclude=prompts)
        prompts = [with_shots(p, shots) for p in prompts]
    return prompts


def timed_generation(gen, prompts: list, tok) -> dict:
    start = time.perf_counter()
    replies = gen.generate(prompts)
    seconds = time.perf_counter() - start
    new_tokens = sum(len(tok(r, add_special_tokens=False)["input_ids"]) for r in replies)
    return {"batch_size": gen.batch_size, "examples": len(prompts), "share_prefix": gen.share_prefix,
            "seconds": round(seconds, 2), "prompt_tokens": sum(len(gen.prompt_ids(p)) for p in prompts),
            "generated_tokens": new_tokens, "generated_tokens_per_s": round(new_tokens / seconds, 1),
            "examples_per_s": round(len(prompts) / seconds, 2)}


def throughput(batch_sizes: list[int], n: int, precision: str, ab_batch_size: int) -> dict:
    """Generated tokens per second of the Generator alone (model already loaded): per batch size; and with
    the shared-prefix cache on and off (zero- and 5-shot prompts, interleaved, best of two)."""
    from tunesmith.model.generate import Generator
    from tunesmith.model.load import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer("default", device="cpu", precision=precision,
                                          dtype="fp32" if precision == "fp32" else precision)
    prompts = load_prompts(n)
    out: dict = {"by_batch_size": []}
    for bs in batch_sizes:
        out["by_batch_size"].append(timed_generation(Generator(model, tok, "cpu", precision, bs, 16), prompts, tok))
        print(json.dumps(out["by_batch_size"][-1]), flush=True)
    for shots in (0, 5):
        gen = Generator(model, tok, "cpu", precision, ab_batch_size, 16)
        shot_prompts = load_prompts(n, shots)
        runs: dict[bool, list[dict]] = {True: [], False: []}
        for _ in range(2):
            for share in (True, False):
                gen.share_prefix = share
                runs[share].append(timed_generation(gen, shot_prompts, tok))
        best = {share: min(r, key=lambda x: x["seconds"]) for share, r in runs.items()}
        out[f"prefix_sharing_{shots}shot"] = [best[True], best[False]]
        print(json.dumps(out[f"prefix_sharing_{shots}shot"]), flush=True)
    return out


def end_to_end(n: int, batch_size: int, precision: str) -> dict:
    """`tunesmith eval --data test.jsonl --candidates base --metric exact --max-new-tokens 16`, timed whole
    (model load, prompts, generation, scoring, statistics)."""
    import tunesmith

    start = time.perf_counter()
    result = tunesmith.evaluate(str(TEST), ["base"], metrics=["exact"], base="default", max_examples=n,
                                max_new_tokens=16, batch_size=batch_size, device="cpu", precision=precision)
    seconds = time.perf_counter() - start
    agg = result.main.comparisons[0].aggregates["base"]
    return {"examples": n, "batch_size": batch_size, "precision": precision, "seconds": round(seconds, 1),
            "exact": round(agg.mean, 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=500, help="banking77 test examples for the end-to-end eval")
    p.add_argument("--throughput-examples", type=int, default=64)
    p.add_argument("--batch-sizes", default="8,16,32,64")
    p.add_argument("--batch-size", type=int, default=16, help="batch size of the end-to-end eval")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-end-to-end", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    report: dict = {"date": time.strftime("%Y-%m-%d"), "machine": machine()}
    if not args.skip_throughput:
        sizes = [int(x) for x in args.batch_sizes.split(",")]
        report["throughput"] = throughput(sizes, args.throughput_examples, args.precision, args.batch_size)
    if not args.skip_end_to_end:
        report["end_to_end"] = end_to_end(args.examples, args.batch_size, args.precision)
    report["machine"]["load_avg_1min_end"] = os.getloadavg()[0]
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
