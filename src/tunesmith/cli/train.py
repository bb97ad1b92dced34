"""`tunesmith train CONFIG`."""

from __future__ import annotations

import os
import subprocess
import sys

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
    p.add_argument("--nproc", type=int, metavar="N",
                   help="train in N processes on this machine (starts torchrun: --standalone --nproc-per-node N)")
    p.add_argument("--force", action="store_true",
                   help="train even when the plan says the run cannot fit its device (train.ignore_plan)")
    p.set_defaults(handler=run)


def run(args, console: Console) -> int:
    from ..api import load_config, train

    if args.nproc and args.nproc > 1 and "RANK" not in os.environ:
        return launch(args, console)
    overrides = list(args.overrides) + (["data.skip_invalid=true"] if args.skip_invalid else [])
    cfg = load_config(args.config, overrides)
    result = train(cfg, console=console, progress=not args.no_progress, evaluate=not args.no_eval,
                   resume=args.resume, force=args.force)
    console.print(f"[green]done[/green]: adapter in {result.adapter}")
    return 0


def launch(args, console: Console) -> int:
    """This same command in N processes under PyTorch's own launcher (torchrun)."""
    from ..api import load_config
    from ..train.checkpoint import latest

    cfg = load_config(args.config, list(args.overrides))  # a bad config fails here, before N processes start
    rest = [args.config, *(f"--set={o}" for o in args.overrides)]
    rest += [flag for flag, on in (("--skip-invalid", args.skip_invalid), ("--no-progress", args.no_progress),
                                   ("--no-eval", args.no_eval), ("--force", args.force)) if on]
    rest += [f"--resume={args.resume}"] if args.resume else []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           "-m", "tunesmith", "train", *rest]
    console.print(f"starting {args.nproc} processes: {' '.join(cmd[2:])}", highlight=False)
    code = subprocess.call(cmd)
    if code != 0:
        good = latest(cfg.run_dir / "checkpoints")
        console.print(f"[bold red]error:[/bold red] a training process failed (torchrun exit code {code}); the "
                      "others were stopped. " + (f"The newest complete checkpoint is {good}; resume with "
                                                 "--resume auto." if good else "No checkpoint was written."),
                      highlight=False)
    return code
