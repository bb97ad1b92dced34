"""Build train.jsonl and test.jsonl (one document per line: {"text", "topic"}) from the Python documentation
topics that ship inside every CPython installation (`pydoc_data.topics`, the text `help("for")` prints; from
the Python Language Reference, PSF License Version 2, see LICENSE), and general.jsonl: 100 general chat
single-turn conversations (a seeded sample of the valid single-turn pairs of ../hh-rlhf, MIT, each question
with its chosen reply) on which the eval measures what the adaptation cost.

The committed files were made with CPython 3.11.7: `python examples/python-docs/prepare.py`. Topics differ a
little between Python versions, so a rerun on another version writes slightly different files.

Held out: a seeded sample of whole topics. Some topics repeat each other: a text under two names (`if` and
`else`) is kept once, and since others share paragraphs (`break`, `continue` and `for`), topics that share long verbatim passages (20% of either's
13-word runs) are grouped and each group goes to one side: the held-out perplexity then measures the domain,
not memorised text (`tunesmith data check train.jsonl --eval test.jsonl` confirms it). Topics over 10,000
characters (the longest tenth) are left out and the general replies are single-turn, to keep the example
within ten minutes on a 2-core CPU.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

MAX_CHARS = 10_000  # topics longer than this (the data model's special methods, ...) are left out
HELD_OUT = 14  # at least this many held-out topics
GENERAL = 100
RUN, SHARED = 13, 0.2
HERE = Path(__file__).parent


def grams(text: str) -> set[int]:
    words = re.findall(r"\w+", text.casefold())
    return {hash(" ".join(words[i:i + RUN])) for i in range(len(words) - RUN + 1)}


def groups(names: list[str], texts: dict[str, str]) -> list[list[str]]:
    """Topics linked by shared passages, as connected groups (sorted)."""
    parent = {n: n for n in names}

    def root(n: str) -> str:
        while parent[n] != n:
            n = parent[n]
        return n

    g = {n: grams(texts[n]) for n in names}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = len(g[a] & g[b])
            if shared and shared >= SHARED * min(len(g[a]), len(g[b])):
                parent[root(a)] = root(b)
    out: dict[str, list[str]] = {}
    for n in names:
        out.setdefault(root(n), []).append(n)
    return sorted(out.values())


def main() -> None:
    from pydoc_data.topics import topics

    first = {}
    for name in sorted(topics):  # a text under two names (`if`, `else`) is kept once
        first.setdefault(topics[name], name)
    names = sorted(name for text, name in first.items() if len(text) <= MAX_CHARS and text.strip())
    order = groups(names, topics)
    random.Random(0).shuffle(order)
    held: list[str] = []
    for group in order:
        if len(held) >= HELD_OUT:
            break
        held += group
    for file, chosen in (("train.jsonl", [n for n in names if n not in held]), ("test.jsonl", sorted(held))):
        with open(HERE / file, "w", encoding="utf-8") as f:
            for name in chosen:
                f.write(json.dumps({"text": topics[name], "topic": name}, ensure_ascii=False) + "\n")
        size = (HERE / file).stat().st_size
        print(f"{file}: {len(chosen)} topics, {size / 1000:.0f} KB (Python {sys.version.split()[0]})")
    write_general()


def write_general() -> None:
    """Single-turn hh-rlhf rows that tunesmith reads (a few have an empty Assistant turn), as conversations."""
    from tunesmith.data.load import load_examples

    pairs = load_examples(str(HERE.parent / "hh-rlhf" / "harmless-test.jsonl.gz"), skip_invalid=True).examples
    pairs = [p for p in pairs if len(p.prompt) == 1 and len(p.chosen) == 1]
    chosen = sorted(random.Random(0).sample(range(len(pairs)), GENERAL))
    with open(HERE / "general.jsonl", "w", encoding="utf-8") as f:
        for i in chosen:
            messages = [{"role": m.role, "content": m.content} for m in pairs[i].prompt + pairs[i].chosen]
            f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    print(f"general.jsonl: {GENERAL} single-turn conversations, {(HERE / 'general.jsonl').stat().st_size / 1000:.0f} KB")


if __name__ == "__main__":
    main()
