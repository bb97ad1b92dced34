"""`tunesmith train CONFIG`."""

from __future__ import annotations

from rich.console import Console


def register(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a model as a YAML config describes")
    p.add_argument("config", help="run config (YAML); see examples/")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=1e-4 (repeatable)")
    p.add_argument("--skip-invalid", action="store_true",
                   help="leave out invalid data rows (written to rejects.jsonl) instead of stopping")
    p.add_argument("--resume", metavar="auto|CHECKPOINT",
                   help="continue an interrupted run: 'auto' = its newest complete checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-eval", action="store_true", help="skip the end-of-training comparison eval")
    p.add_argument("--force", action="store_true",
                   help="train even when the plan says the run cannot fit its device (train.ignore_plan)")
    p.set_defaults(handler=run)


def run(args, console: Console) -> int:
    from ..api import load_config, train

    overrides = list(args.overrides) + (["data.skip_invalid=true"] if args.skip_invalid else [])
    cfg = load_config(args.config, overrides)
    result = train(cfg, console=console, progress=not args.no_progress, evaluate=not args.no_eval,
                   resume=args.resume, force=args.force)
    console.print(f"[green]done[/green]: adapter in {result.adapter}")
    return 0
