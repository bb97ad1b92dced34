"""`tunesmith data check` (the data doctor) and `tunesmith data preview` (what the model learns from)."""

from __future__ import annotations

import json
import sys
import warnings
from contextlib import contextmanager

from rich.console import Console

FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt_completion", "preference", "preference_implicit",
           "hh_rlhf", "kto", "text", "prompt")


def register(sub) -> None:
    p = sub.add_parser("data", help="check data or preview what a model learns from it",
                       description="Inspect training data before training on it. See docs/data.md.")
    commands = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    p.set_defaults(handler=lambda args, console: _usage(p))

    check = commands.add_parser("check", help="report invalid rows, duplicates, leakage, lengths and balance",
                                description="Load the data leniently and report what is wrong (errors: exit "
                                            "code 1) or worth a look (warnings).")
    check.add_argument("data", nargs="+", metavar="DATA", help="training data: file(s), folder or hub id")
    check.add_argument("--model", help="model whose tokenizer and chat template measure token lengths")
    check.add_argument("--eval", dest="eval_data", metavar="EVAL", help="held-out data to check for leakage")
    check.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    check.add_argument("--report", metavar="FILE", help="also write the full report (every row of every finding, "
                                                         "every member of every duplicate group) as JSON to FILE")
    _render_options(check)
    check.set_defaults(handler=run_check)

    preview = commands.add_parser("preview", help="show rendered examples with the trained tokens marked",
                                  description="Render examples exactly as training does. Trained tokens are "
                                              "coloured in a terminal and put between [[ and ]] otherwise.")
    preview.add_argument("data", nargs="+", metavar="DATA", help="file(s), folder or hub id")
    preview.add_argument("--model", required=True, help="model whose tokenizer and chat template render the data")
    preview.add_argument("-n", type=int, default=3, help="how many examples to show, from the start (default 3)")
    _render_options(preview)
    preview.set_defaults(handler=run_preview)


def _render_options(p) -> None:
    p.add_argument("--format", default="auto", choices=FORMATS, help="data format (default: detect)")
    p.add_argument("--max-length", type=int, default=1024, help="token limit per example (data.max_length)")
    p.add_argument("--truncation", choices=["right", "left", "drop"], default="right",
                   help="what happens to longer examples (data.truncation)")
    p.add_argument("--system-prompt", help="system message for examples without one (data.system_prompt)")
    p.add_argument("--train-on", choices=["all_assistant", "last_assistant"], default="all_assistant",
                   help="which assistant turns are trained (data.train_on)")
    p.add_argument("--window-overlap", type=int, default=0,
                   help="documents: tokens a window repeats from the previous one as context (data.window_overlap)")
    p.add_argument("--cross-document", action="store_true",
                   help="documents: windows cut from one stream of all documents (data.cross_document)")


def _usage(parser) -> int:
    parser.print_help()
    return 2


def _spec(paths: list[str]) -> str | list[str]:
    return paths[0] if len(paths) == 1 else paths


def _check_numbers(args) -> None:
    from ..errors import TunesmithError

    if args.max_length < 8:
        raise TunesmithError(f"--max-length must be at least 8, got {args.max_length}")
    if getattr(args, "n", 1) < 1:
        raise TunesmithError(f"-n must be at least 1, got {args.n}")
    if not 0 <= args.window_overlap < args.max_length - 1:
        raise TunesmithError(f"--window-overlap must be at least 0 and below --max-length - 1, got {args.window_overlap}")


@contextmanager
def _warnings_to(console: Console):
    """Show Python warnings (default chat template, folded system message) as one plain line each."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    from rich.markup import escape

    for message in dict.fromkeys(str(w.message) for w in caught):
        console.print(f"[yellow]warning:[/yellow] {escape(message)}")


def run_check(args, console: Console) -> int:
    from ..data.doctor import check_data
    from ..model.load import load_tokenizer

    _check_numbers(args)
    with _warnings_to(console):
        tokenizer = load_tokenizer(args.model) if args.model else None
        report = check_data(_spec(args.data), tokenizer, args.max_length, args.eval_data, format=args.format,
                            system_prompt=args.system_prompt, truncation=args.truncation, train_on=args.train_on,
                            window_overlap=args.window_overlap, cross_document=args.cross_document)
    if args.report:
        report.write(args.report)
    if args.json:
        out = {**report.to_dict(), "error_count": len(report.errors), "warning_count": len(report.warnings)}
        sys.stdout.write(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    else:
        out = Console(soft_wrap=True, highlight=False, emoji=False)
        report.render(out)
        if args.report:
            out.print(f"full report: {args.report}", markup=False)
    return 1 if report.errors else 0


def run_preview(args, console: Console) -> int:
    from ..data.load import load_examples
    from ..data.render import Renderer
    from ..model.load import load_tokenizer

    _check_numbers(args)
    out = Console(soft_wrap=True, highlight=False, emoji=False)
    colour = out.is_terminal and not out.no_color
    dataset = load_examples(_spec(args.data), args.format, skip_invalid=True)
    with _warnings_to(console):
        tokenizer = load_tokenizer(args.model)
        renderer = Renderer(tokenizer, args.max_length, args.truncation, args.train_on, args.system_prompt,
                            args.window_overlap, args.cross_document)
        for example in dataset.examples[: args.n]:
            _show_example(out, tokenizer, renderer, example, colour, args)
    if dataset.rejected:
        console.print(f"[yellow]{len(dataset.rejected)} invalid row(s) skipped[/yellow]; "
                      "`tunesmith data check` lists them")
    if not colour:
        print("(trained tokens are between [[ and ]])")
    return 0


def _show_example(out: Console, tokenizer, renderer, example, colour: bool, args) -> None:
    from rich.rule import Rule
    from rich.text import Text

    from ..data.preview import example_views, marked, preview_spans

    where = str(example.source) if example.source else "example"
    views, truncated = example_views(renderer, example)
    for view in views:
        title = f"{where} {view.title}".strip()
        if colour:
            out.print(Rule(title, style="dim"))
        else:
            print(f"--- {title} ---")
        if view.tokenized is None:
            _line(out, colour, f"dropped: no trained token within max_length {args.max_length} "
                               f"(truncation: {args.truncation})")
            continue
        spans = preview_spans(tokenizer, view.tokenized)
        if colour:
            out.print(Text.assemble(*((text, "bold black on green" if trained else "") for text, trained in spans)))
        else:
            print(marked(spans))
        note = f", truncated ({args.truncation}) to max_length {args.max_length}" if truncated else ""
        _line(out, colour, f"{len(view.tokenized)} tokens, {view.tokenized.n_target} trained{note}")


def _line(out: Console, colour: bool, text: str) -> None:
    if colour:
        out.print(text, markup=False, style="dim")
    else:
        print(text)
