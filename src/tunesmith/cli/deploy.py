"""`tunesmith merge` and `tunesmith export`."""

from __future__ import annotations

import json

from rich.console import Console


def register(sub) -> None:
    m = sub.add_parser("merge", help="merge a run's adapter into its base: a standalone HF checkpoint")
    m.add_argument("run", help="run folder")
    m.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    m.add_argument("--out", help="output folder (default RUN/merged)")
    m.set_defaults(handler=merge)

    e = sub.add_parser("export", help="export a run for vLLM, transformers, llama.cpp or Ollama")
    e.add_argument("run", help="run folder")
    e.add_argument("--format", required=True, choices=["peft", "merged", "gguf", "gguf-lora", "ollama"])
    e.add_argument("--out", help="output folder (default RUN/export/FORMAT)")
    e.add_argument("--dtype", help="merged: bf16|fp16|fp32 (default bf16); gguf/ollama: f16|bf16|q8_0|f32 "
                                   "(default f16); gguf-lora: f32|f16")
    e.add_argument("--name", help="model name for serving (default: the run's name)")
    e.set_defaults(handler=export)


def merge(args, console: Console) -> int:
    from ..model.merge import merge_run

    path, report = merge_run(args.run, args.out, dtype=args.dtype)
    console.print(f"merged checkpoint written to {path}")
    console.print(f"parity: max |logit difference| merged vs adapter = {report['max_abs_diff']:.3g} "
                  f"(tolerance {report['tol']:.3g}); after writing {report['written_dtype']}: "
                  f"{report['written_max_abs_diff']:.3g}, top-1 agreement {report['written_top1_agreement']:.1%}")
    return 0


def export(args, console: Console) -> int:
    from ..export.run import export_run

    result = export_run(args.run, args.format, args.out, args.dtype, args.name)
    console.print(f"[green]{result.format}[/green] written to {result.path}")
    for key, check in result.checks.items():
        console.print(f"check {key}: {json.dumps(check, default=str)[:300]}")
    for cmd in result.commands:
        print(cmd)
    return 0
