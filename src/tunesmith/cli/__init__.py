"""`tunesmith` command line. Each command group lives in its own module with a `register(subparsers)`."""

from __future__ import annotations

import argparse
import os
import sys

from rich.console import Console

from ..errors import TunesmithError

COMMAND_MODULES = ("train", "plan", "infer", "data", "evaluate", "deploy")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="tunesmith", description="Fine-tune open language models on your own "
                                     "data, and prove the result was worth it.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    console = Console(stderr=True, soft_wrap=True)  # no hard wraps: keep file:line messages whole in logs
    if args.version:
        from .. import __version__

        print(__version__)
        return 0
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args, console) or 0)
    except TunesmithError as e:
        from rich.markup import escape  # messages quote user text, e.g. "[/INST]", which is not markup

        console.print(f"[bold red]error:[/bold red] {escape(e.message)}", highlight=False, markup=True)
        if e.hint:
            console.print(f"[yellow]hint:[/yellow] {escape(e.hint)}", highlight=False)
        return e.exit_code
    except KeyboardInterrupt:
        console.print("[red]interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
