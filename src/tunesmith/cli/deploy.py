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

    p = sub.add_parser("push", help="export a run and upload it to the Hugging Face Hub (with its model card)")
    p.add_argument("run", help="run folder")
    p.add_argument("repo_id", help="model repo to upload to, OWNER/NAME (created if missing)")
    p.add_argument("--what", default="adapter", choices=["adapter", "merged", "gguf"],
                   help="adapter (PEFT, default), merged checkpoint, or GGUF")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--dtype", help="merged: bf16|fp16|fp32 (default bf16); gguf: f16|bf16|q8_0|f32 (default f16)")
    p.add_argument("--dry-run", action="store_true", help="export and list exactly what would be uploaded; send nothing")
    p.set_defaults(handler=push)


def merge(args, console: Console) -> int:
    from ..export.card import write_model_card
    from ..model.merge import merge_run

    path, report = merge_run(args.run, args.out, dtype=args.dtype)
    write_model_card(path, args.run, "merged")
    console.print(f"merged checkpoint written to {path} (model card: README.md)")
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


def push(args, console: Console) -> int:
    from ..export.push import push_run

    result = push_run(args.run, args.repo_id, what=args.what, private=args.private, dry_run=args.dry_run,
                      dtype=args.dtype)
    for line in result.lines():
        print(line)
    if result.uploaded:
        console.print(f"[green]uploaded[/green]: {result.url}", highlight=False)
    else:
        console.print("dry run: nothing was uploaded", highlight=False)
    return 0
