"""`tunesmith eval`: climb the ladder (prompting, few-shot, retrieval, a big model) and prove (or disprove) that
the fine-tune is worth it. The flags build an EvalConfig; its defaults are the only ones (docs/eval.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

HELP_CANDIDATES = ("comma-separated: base, run folders (runs/x: the fine-tunes), http(s)://host/v1#MODEL "
                   "(an OpenAI-compatible endpoint), knn:K (majority of the K nearest training examples); "
                   "add +fewshot:K, +rag:K, +docs:K, +labels or +prompt:FILE to base, runs or endpoints")
QUIET = argparse.SUPPRESS  # unset flags stay unset, so EvalConfig's defaults apply


def _default(key: str):
    """EvalConfig's default for a help text (the defaults live there only)."""
    from ..config import EvalConfig

    return EvalConfig.model_fields[key].default


def _limit(value: str) -> int | str:
    return value if value == "auto" else int(value)


def register(sub) -> None:
    p = sub.add_parser("eval", help="compare fine-tuned runs with prompting, few-shot, retrieval and endpoints",
                       description="Every candidate answers the held-out examples; each tuned candidate is "
                                   "tested against each baseline with paired statistics, and the ladder says "
                                   "whether fine-tuning is worth it. See docs/eval.md.",
                       argument_default=QUIET)
    p.add_argument("--data", required=True, help="held-out examples (file, folder or hub id)")
    p.add_argument("--candidates", required=True, help=HELP_CANDIDATES)
    p.add_argument("--metric", dest="metrics", action="append", metavar="M",
                   help="exact, choice[:LABELS.json], contains, f1, regex:PATTERN, json, json_schema:FILE, "
                        "json_fields, python:MODULE:FUNCTION, loss; repeatable, the first is primary (default exact)")
    p.add_argument("--base", help="base model (default: the runs' base model from run.json, else 'default')")
    p.add_argument("--train-data", dest="train_data",
                   help="where shots, labels and retrieval come from (default: the run's training data)")
    p.add_argument("--docs", help="folder of .txt/.md documents for +docs:K")
    p.add_argument("--format", dest="data_format", help="data format of --data / --train-data (default: detect)")
    p.add_argument("--max-examples", dest="max_examples", type=int,
                   help="evaluate a seeded random sample of this many examples (kept in file order)")
    p.add_argument("--sample-seed", dest="sample_seed", type=int, help="which examples --max-examples picks")
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=_limit,
                   help="token limit per answer, or auto (default): the longest reference plus a margin")
    p.add_argument("--fewshot-seed", dest="fewshot_seed", type=int, help="which training examples few-shot shows")
    p.add_argument("--judge", metavar="URL#MODEL|MODEL",
                   help="also compare outputs pairwise with an LLM judge: an OpenAI-compatible server "
                        "(http://host:8000/v1#model) or a local model spec")
    p.add_argument("--require-win", dest="require_win", action="store_true",
                   help="exit with code 6 unless every tuned candidate significantly beats every baseline")
    p.add_argument("--require-worth", dest="require_worth", action="store_true",
                   help="exit with code 6 unless the best fine-tune significantly beats the best rung without it")
    p.add_argument("--regression", metavar="DATA", help="a general set: what did the fine-tune break?")
    p.add_argument("--system-prompt", dest="system_prompt",
                   help="system message for prompts without one (default: the run's)")
    p.add_argument("--no-stages", dest="by_stage", action="store_false",
                   help="evaluate a multi-stage run as one candidate, not stage by stage")
    p.add_argument("--prices", help="a price table (YAML) whose entries override the shipped one")
    p.add_argument("--device-price", dest="device_price", metavar="NAME",
                   help="price the local candidates as this device of the price table (default: detected)")
    p.add_argument("--embedder", metavar="DIR", help="embedding model folder for :embed retrieval (default: base)")
    p.add_argument("--endpoint-concurrency", dest="endpoint_concurrency", type=int,
                   help=f"requests in flight ({_default('endpoint_concurrency')})")
    p.add_argument("--rate-limit", dest="endpoint_rate_limit", type=float, metavar="PER_MINUTE",
                   help="at most this many endpoint requests per minute")
    p.add_argument("--endpoint-retries", dest="endpoint_retries", type=int,
                   help=f"retries per request ({_default('endpoint_retries')})")
    p.add_argument("--endpoint-timeout", dest="endpoint_timeout", type=float,
                   help=f"seconds per request ({_default('endpoint_timeout'):g})")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted eval in the same --out without asking for kept answers again")
    p.add_argument("--out", help="output folder (default: <run>/eval for one run, else ./eval)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice; on a busy shared "
                                              "CPU, 1 is often much faster)")
    p.set_defaults(handler=run)


def default_out(candidates: str) -> Path:
    from ..eval.candidates import spec_head, split_specs

    runs = {spec_head(s) for s in split_specs(candidates)}
    runs = {r for r in runs if r != "base" and not r.startswith(("http://", "https://", "knn:"))}
    return Path(runs.pop().rstrip("/")) / "eval" if len(runs) == 1 else Path("eval")


def run(args, console: Console) -> int:
    from ..config import EvalConfig
    from ..errors import TunesmithError
    from ..eval.run import evaluate

    settings = {k: v for k, v in vars(args).items() if k in EvalConfig.model_fields and k != "data"}
    threads = getattr(args, "threads", None)
    if threads is not None:
        if threads < 1:
            raise TunesmithError(f"--threads must be at least 1, got {threads}")
        import torch

        torch.set_num_threads(threads)
    settings.setdefault("out", str(default_out(args.candidates)))
    evaluate(args.data, console=console, **settings)
    return 0
