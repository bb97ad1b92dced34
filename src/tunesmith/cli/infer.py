"""`tunesmith generate` and `tunesmith chat`."""

from __future__ import annotations

from rich.console import Console

from ..errors import TunesmithError


def register(sub) -> None:
    g = sub.add_parser("generate", help="generate a reply with a run, a model, or one of several adapters")
    g.add_argument("target", nargs="?", help="run folder or model (default model when omitted)")
    g.add_argument("--prompt", action="append", required=True, help="user message (repeatable: one reply each)")
    g.add_argument("--system", help="system message (default: the one the run trained with; \"\" for none)")
    g.add_argument("--base", help="base model when switching between several --adapter")
    g.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="attach an adapter (a run folder or adapter folder) under a name; repeatable")
    g.add_argument("--use", help="which --adapter answers ('base' for none)")
    _common(g)
    g.set_defaults(handler=generate)

    c = sub.add_parser("chat", help="chat with a run or a model in the terminal")
    c.add_argument("target", nargs="?", help="run folder or model (default model when omitted)")
    c.add_argument("--system", help="system message (default: the one the run trained with; \"\" for none)")
    _common(c)
    c.set_defaults(handler=chat)


def _common(p) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--allow-pickle-weights", action="store_true",
                   help="also load a model whose weights are pickle (*.bin) files; only for files you trust")


def generate(args, console: Console) -> int:
    from ..api import open_model

    if args.adapter or args.base:
        if args.target:
            raise TunesmithError("give either a target or --base with --adapter, not both")
        gen = _adapter_set(args)
        if args.system is not None:
            gen.system_prompt = args.system
    else:
        gen = open_model(args.target, device=args.device, precision=args.precision, system_prompt=args.system,
                         allow_pickle_weights=args.allow_pickle_weights)
    _say_system(gen, args, console)
    prompts = [[{"role": "user", "content": p}] for p in args.prompt]
    for reply in gen.generate(prompts, temperature=args.temperature, max_new_tokens=args.max_new_tokens):
        print(reply)
    return 0


def _say_system(gen, args, console: Console) -> None:
    """Say which system message goes in front of every prompt when the user did not choose one."""
    if args.system is None and gen.system_prompt:
        from rich.markup import escape

        console.print(f"[dim]system message (every training example had it; --system \"\" for none): "
                      f"{escape(gen.system_prompt)}[/dim]", highlight=False)


def _adapter_set(args):
    from ..api import open_adapters

    named = {}
    for item in args.adapter:
        if "=" not in item:
            raise TunesmithError(f"--adapter {item}: expected NAME=PATH", hint="e.g. --adapter a=runs/x")
        name, path = item.split("=", 1)
        named[name] = path
    gen = open_adapters(args.base, named, device=args.device, precision=args.precision)
    gen.use(None if args.use in (None, "base") else args.use)
    return gen


def chat(args, console: Console) -> int:
    from ..api import open_model

    gen = open_model(args.target, device=args.device, precision=args.precision, system_prompt=args.system,
                     allow_pickle_weights=args.allow_pickle_weights)
    _say_system(gen, args, console)
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    console.print("[dim]chat: empty line or Ctrl-D to quit, /reset to start over[/dim]")
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            break
        if not text:
            break
        if text == "/reset":
            history = history[:1] if args.system else []  # the renderer adds the run's system message itself
            continue
        history.append({"role": "user", "content": text})
        reply = gen.generate([history], temperature=args.temperature, max_new_tokens=args.max_new_tokens)[0]
        history.append({"role": "assistant", "content": reply})
        print(f"model> {reply}")
    return 0
