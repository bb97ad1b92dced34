"""`tunesmith` command line. Each command group lives in its own module with a `register(subparsers)`.

Exit codes (errors.py): 0 done, 2 invalid input, 3-5 and 75 training stopped (docs/reliability.md), 6 the
verdict failed (--require-win / --require-worth), 70 an unexpected error inside tunesmith, 130 interrupted.
An unexpected error prints one line; `--debug` (anywhere on the command line) or TUNESMITH_DEBUG=1 prints
the full traceback."""

from __future__ import annotations

import argparse
import os
import sys

from rich.console import Console

from ..errors import EXIT_INTERNAL, EXIT_INTERRUPTED, TunesmithError

COMMAND_MODULES = ("train", "plan", "infer", "data", "evaluate", "deploy")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="tunesmith", description="Fine-tune open language models on your own "
                                     "data, and prove the result was worth it.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("--debug", action="store_true",
                        help="print the full traceback of an unexpected error (also: TUNESMITH_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("TUNESMITH_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))  # under torchrun only rank 0 talks; every rank reports its errors
    console = Console(stderr=True, soft_wrap=True, quiet=rank > 0)  # soft wrap: file:line messages stay whole
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

        console.quiet = False
        console.print(f"[bold red]error:[/bold red] {escape(e.message)}", highlight=False, markup=True)
        if e.hint:
            console.print(f"[yellow]hint:[/yellow] {escape(e.hint)}", highlight=False)
        return e.exit_code
    except KeyboardInterrupt:
        console.print("[red]interrupted")
        return EXIT_INTERRUPTED
    except Exception as e:  # a bug in tunesmith or a library: one line, the traceback only on request
        if debug:
            console.print_exception()
        else:
            from rich.markup import escape

            first = (str(e).strip().splitlines() or [""])[0][:300]
            console.print(f"[bold red]internal error:[/bold red] {type(e).__name__}: {escape(first)} "
                          "(rerun with --debug or TUNESMITH_DEBUG=1 for the traceback)", highlight=False)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
