"""`tunesmith plan CONFIG`: memory, time and cost of a run before it starts."""

from __future__ import annotations

import json

from rich.console import Console


def register(sub) -> None:
    p = sub.add_parser("plan", help="memory, time and cost of a run before it starts, with a verdict per device")
    p.add_argument("config", help="run config (YAML), as for tunesmith train")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set adapter.kind=qlora (repeatable)")
    p.add_argument("--model", help="plan another model: a local folder, a hub id in the local cache, or a shipped "
                                   "architecture (llama-3.1-8b, llama-3.1-70b, qwen2.5-7b, qwen2.5-32b, mistral-7b, "
                                   "gemma-2-9b, smollm2-135m)")
    p.add_argument("--device", help="cpu, cuda (this machine), or a device of the price table, e.g. h100-80gb, "
                                    "a100-40gb, rtx4090-24gb (default: the config's device)")
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) the run will use (default 1)")
    p.add_argument("--parallel", choices=("auto", "ddp", "fsdp"), default="auto",
                   help="with --nproc > 1: DDP replicas or FSDP2 sharding (auto: DDP when a replica fits)")
    p.add_argument("--prices", metavar="FILE", help="a price table (YAML, like tunesmith/prices.yaml) whose "
                                                    "entries replace or add to the shipped one")
    p.add_argument("--calibrate", action="store_true",
                   help="measure throughput with a few real training steps on this machine")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(handler=run)


def run(args, console: Console) -> int:
    from ..api import load_config, plan

    overrides = list(args.overrides) + ([f"model={args.model}"] if args.model else [])
    cfg = load_config(args.config, overrides)
    result = plan(cfg, device=args.device, nproc=args.nproc, parallel=args.parallel, prices=args.prices,
                  calibrate=args.calibrate, console=console if args.calibrate else None)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2, default=str))
    else:
        from ..plan.report import format_plan

        print(format_plan(result))
    return 0
