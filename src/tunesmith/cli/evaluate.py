"""`tunesmith eval`: prove (or disprove) that a fine-tune beats the base model and few-shot prompting."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

HELP_CANDIDATES = ("comma-separated: base, base+fewshot:K (K training examples in the prompt), run folders "
                   "(runs/x, the tuned candidates), runs/x+fewshot:K")


def register(sub) -> None:
    p = sub.add_parser("eval", help="compare fine-tuned runs with the base model and few-shot prompting",
                       description="Every candidate answers the held-out examples; each tuned candidate is "
                                   "tested against each baseline with paired statistics. See docs/eval.md.")
    p.add_argument("--data", required=True, help="held-out examples (file, folder or hub id)")
    p.add_argument("--candidates", default="base,base+fewshot:5", help=HELP_CANDIDATES)
    p.add_argument("--metric", dest="metrics", action="append", default=[], metavar="M",
                   help="exact, choice[:LABELS.json], contains, regex:PATTERN, json, json_schema:FILE, loss; "
                        "repeatable, the first is primary (default: exact)")
    p.add_argument("--base", help="base model (default: the runs' base model from run.json, else 'default')")
    p.add_argument("--train-data", help="where few-shot examples come from (default: the run's training data)")
    p.add_argument("--format", default="auto", help="data format of --data / --train-data (default: detect)")
    p.add_argument("--max-examples", type=int, help="evaluate a seeded random subset of this many examples")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--fewshot-seed", type=int, default=0, help="which training examples few-shot shows")
    p.add_argument("--judge", metavar="URL#MODEL|MODEL",
                   help="also compare outputs pairwise with an LLM judge: an OpenAI-compatible server "
                        "(http://host:8000/v1#model) or a local model spec")
    p.add_argument("--require-win", action="store_true",
                   help="exit with code 1 unless every tuned candidate significantly beats every baseline")
    p.add_argument("--regression", metavar="DATA", help="a general set: what did the fine-tune break?")
    p.add_argument("--system-prompt", help="system message for prompts without one (default: the run's)")
    p.add_argument("--out", help="output folder (default: <run>/eval for one run, else ./eval)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice; on a busy shared "
                                              "CPU, 1 is often much faster)")
    p.set_defaults(handler=run)


def default_out(candidates: str) -> Path:
    from ..eval.candidates import FEWSHOT, split_specs

    runs = {s.rpartition(FEWSHOT)[0] if FEWSHOT in s else s for s in split_specs(candidates)} - {"base"}
    return Path(runs.pop().rstrip("/")) / "eval" if len(runs) == 1 else Path("eval")


def run(args, console: Console) -> int:
    from ..errors import TunesmithError
    from ..eval.run import evaluate

    for flag, value in (("--max-examples", args.max_examples), ("--batch-size", args.batch_size),
                        ("--max-new-tokens", args.max_new_tokens), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise TunesmithError(f"{flag} must be at least 1, got {value}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    evaluate(args.data, args.candidates, args.metrics or ["exact"], base=args.base, train_data=args.train_data,
             out_dir=args.out or default_out(args.candidates), batch_size=args.batch_size,
             max_new_tokens=args.max_new_tokens, max_examples=args.max_examples, judge=args.judge,
             require_win=args.require_win, regression=args.regression, console=console,
             fewshot_seed=args.fewshot_seed, device=args.device, precision=args.precision, data_format=args.format,
             system_prompt=args.system_prompt)
    return 0
