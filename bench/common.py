"""Shared parts of the tunesmith-vs-TRL benchmark: the data both sides train on (rendered once by tunesmith,
handed to TRL in forms it reproduces token for token), the machine description, child processes, and the
docs/BENCHMARKS.md section."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import os
import platform
import random
import re
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "BENCHMARKS.md"
SECTION = "tunesmith vs TRL"
BANKING = ROOT / "examples" / "banking77"
HH = ROOT / "examples" / "hh-rlhf" / "harmless-test.jsonl.gz"
RESULT_MARK = "BENCH_RESULT "


# ---------------------------------------------------------------- data

def read_rows(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def orpo_pair_rows(rows: list[dict], seed: int) -> list[dict]:
    """banking77 conversations as preference pairs: chosen = the right intent, rejected = another intent."""
    labels = json.loads((BANKING / "labels.json").read_text())
    labels = labels if isinstance(labels, list) else list(labels)
    rng = random.Random(seed)
    out = []
    for row in rows:
        msgs = row["messages"]
        right = msgs[-1]["content"]
        wrong = rng.choice([x for x in labels if x != right])
        out.append({"prompt": msgs[:-1], "chosen": [msgs[-1]],
                    "rejected": [{"role": "assistant", "content": wrong}]})
    return out


def source_rows(method: str, seed: int) -> list[dict]:
    """Candidate rows in tunesmith's input formats, shuffled by seed."""
    if method == "dpo":
        rows = read_rows(HH)
    else:
        rows = read_rows(BANKING / "train.jsonl")
        if method == "orpo":
            rows = orpo_pair_rows(rows, seed)
    random.Random(seed).shuffle(rows)
    return rows


@dataclass
class Prepared:
    method: str
    train_file: Path  # the rows tunesmith trains on, in its own input format
    trl_file: Path  # the same examples as TRL takes them
    expect_file: Path  # the token ids TRL must end up with
    lengths: list[int]  # every sequence tunesmith trains on (a pair gives two)
    trained: list[int]  # trained positions of each sequence
    trl_tokens: int  # tokens of TRL's copies (completions end at the end-of-turn token)
    computed: int  # tokens tunesmith actually runs (a pair's shared prompt once)


def prepare(method: str, n: int, max_length: int, workdir: Path, seed: int = 0) -> Prepared:
    """Render candidate rows with tunesmith, keep the first n whose sequences all fit max_length (so neither
    side truncates), and write them out for both sides."""
    from tunesmith.config import DataConfig
    from tunesmith.data.load import load_data
    from tunesmith.data.render import Renderer
    from tunesmith.methods import get_method
    from tunesmith.model.load import load_tokenizer

    tok = load_tokenizer("default")
    renderer = Renderer(tok, max_length=10**6)
    m = get_method(method)
    rows, items, start = source_rows(method, seed), [], 0
    while len(items) < n and start < len(rows):
        pool = rows[start:start + max(4 * n, 64)]
        pool_file = workdir / f"pool-{start}.jsonl"
        pool_file.write_text("".join(json.dumps(r) + "\n" for r in pool))
        ds, _ = load_data(DataConfig(train=str(pool_file)), seed)
        for ex in ds.examples:
            item = m.render(renderer, ex)
            if item is not None and len(items) < n and all(len(s) <= max_length for s in sequences(item)):
                items.append((pool[ex.source.line - 1], item))
        start += len(pool)
    if len(items) < n:
        raise SystemExit(f"only {len(items)} {method} examples fit --max-length {max_length}; "
                         "lower --steps or --batch, or raise --max-length")
    train_file = workdir / "train.jsonl"
    train_file.write_text("".join(json.dumps(row) + "\n" for row, _ in items))
    from tunesmith.data.batching import shared_prefix

    trl_rows, expect, lengths, trained, trl_tokens, computed = [], [], [], [], 0, 0
    for _, item in items:
        seqs = sequences(item)
        computed += sum(len(s) for s in seqs) - (shared_prefix(*seqs) if len(seqs) == 2 else 0)
        lengths += [len(s) for s in seqs]
        trained += [sum(1 for x in s.labels[1:] if x != -100) for s in seqs]
        row, ids = trl_row(method, item, tok)
        trl_rows.append(row)
        expect.append(ids)
        trl_tokens += sum(len(x) for x in ids)
    trl_file, expect_file = workdir / "trl.jsonl", workdir / "expect.json"
    trl_file.write_text("".join(json.dumps(r) + "\n" for r in trl_rows))
    expect_file.write_text(json.dumps(expect))
    return Prepared(method, train_file, trl_file, expect_file, lengths, trained, trl_tokens, computed)


def sequences(item) -> list:
    """The sequences an item puts into a batch: one for SFT, chosen and rejected for a pair."""
    return [item.chosen, item.rejected] if hasattr(item, "chosen") else [item]


def _span(seq) -> tuple[int, int]:
    """[first, last + 1) of the trained tokens of a rendered sequence."""
    trained = [i for i, x in enumerate(seq.labels) if x != -100]
    return trained[0], trained[-1] + 1


def trl_row(method: str, item, tok) -> tuple[dict, list[list[int]]]:
    """TRL's copy of an example and the token ids (one list per sequence) TRL must produce from it.
    SFT: tunesmith's ids and labels as a pre-tokenized dataset. DPO/ORPO: prompt and completions as text,
    completions ending at the end-of-turn token, so TRL's completion mask is exactly tunesmith's trained tokens."""
    if method == "sft":
        return {"input_ids": list(item.input_ids), "labels": list(item.labels)}, [list(item.input_ids)]
    (c0, c1), (r0, r1) = _span(item.chosen), _span(item.rejected)
    if c0 != r0 or item.chosen.input_ids[:c0] != item.rejected.input_ids[:r0]:
        raise SystemExit("chosen and rejected do not share their prompt tokens")

    def decode(ids) -> str:
        return tok.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    row = {"prompt": decode(item.chosen.input_ids[:c0]), "chosen": decode(item.chosen.input_ids[c0:c1]),
           "rejected": decode(item.rejected.input_ids[r0:r1])}
    return row, [list(item.chosen.input_ids[:c1]), list(item.rejected.input_ids[:r1])]


# ---------------------------------------------------------------- machine and children

def machine() -> dict:
    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        found = re.search(r"^Model name:\s*(.+)$", out, re.M)
        model = found.group(1).strip() if found else model
    except (OSError, subprocess.SubprocessError):
        pass
    import peft
    import torch
    import transformers
    import trl

    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "trl": trl.__version__, "peft": peft.__version__}}


def run_child(script: Path, variant: str, spec_file: Path, log: Path, timeout: int) -> dict:
    """Run one variant in a fresh Python process; its result is the JSON on its last marked stdout line."""
    cmd = [sys.executable, str(script), "--child", variant, "--spec", str(spec_file)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    with open(log, "a") as err:
        err.write(f"\n==== {variant}\n")
        err.flush()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, timeout=timeout, env=env)
    marked = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not marked:
        tail = log.read_text().splitlines()[-25:]
        raise SystemExit(f"{variant} failed (exit {proc.returncode}); last lines of {log}:\n" + "\n".join(tail))
    return json.loads(marked[-1][len(RESULT_MARK):])


def emit(result: dict) -> None:
    print(RESULT_MARK + json.dumps(result), flush=True)


@contextmanager
def fp32(model):
    """Run a model in fp32 for a while (bf16 -> fp32 -> bf16 is lossless), then give every parameter back
    its dtype: a correctness check should see the math, not bf16 rounding."""
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    model.float()
    try:
        yield model
    finally:
        for name, p in model.named_parameters():
            p.data = p.data.to(dtypes[name])


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---------------------------------------------------------------- docs

def write_section(section: str, body: str) -> None:
    """Replace (or add) `## <section>` of docs/BENCHMARKS.md with `body`, keeping every other section."""
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    new = f"## {section}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(section)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: new + "\n", text, count=1) if pattern.search(text) else \
        text.rstrip() + "\n\n" + new
    DOC.write_text(text.rstrip() + "\n")


def write_method_section(method: str, body: str, intro: str) -> None:
    """Replace (or add) `### <method>` inside `## tunesmith vs TRL` of docs/BENCHMARKS.md, keeping the other
    methods' results and every other section."""
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    section_re = re.compile(rf"^## {re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    found = section_re.search(text)
    current = found.group(0) if found else f"## {SECTION}\n\n"
    subsections = dict(re.findall(r"^### (\S+)\n(.*?)(?=^### |\Z)", current, re.S | re.M))
    subsections[method.upper()] = body.strip() + "\n\n"
    order = [m for m in ("SFT", "DPO", "ORPO") if m in subsections] + \
            [m for m in subsections if m not in ("SFT", "DPO", "ORPO")]
    parts = "".join(f"### {m}\n\n{subsections[m].strip()}\n\n" for m in order)
    new = f"## {SECTION}\n\n{intro.strip()}\n\n{parts}"
    text = section_re.sub(lambda _: new, text, count=1) if found else text.rstrip() + "\n\n" + new
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text.rstrip() + "\n")


def today() -> str:
    return dt.date.today().isoformat()
