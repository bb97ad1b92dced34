"""The console: one line (a log) or one bar (a terminal) per phase, library noise only with --verbose, and
tunesmith's own calls free of warnings."""

import io
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from tunesmith import console as ts_console
from tunesmith.console import advance, counted, duration, phase, quiet

ROOT = Path(__file__).resolve().parents[1]


def log_console():
    buf = io.StringIO()
    return Console(file=buf, force_terminal=False, soft_wrap=True, width=200), buf


def test_durations_read_well():
    assert [duration(s) for s in (0.04, 3.25, 59.9, 60, 245, 3725)] == ["0.0s", "3.2s", "59.9s", "1m00s", "4m05s",
                                                                       "1h02m"]


def test_a_phase_in_a_log_is_one_line(monkeypatch):
    con, buf = log_console()
    with phase("tokenise", 3, con, "examples") as p:
        for _ in counted(["a", "b", "c"]):
            pass
        assert p.done == 3
    with phase("load model", console=con):
        pass
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("tokenise: 3 examples in ") and lines[0].endswith("s")
    assert lines[1].startswith("load model: ") and "examples" not in lines[1]


def test_a_long_phase_in_a_log_reports_as_it_goes(monkeypatch):
    monkeypatch.setattr(ts_console, "LOG_EVERY_S", -1.0)  # every advance is "30 s later"
    con, buf = log_console()
    with phase("eval tuned", 4, con, "answers"):
        advance(2)
        advance(2)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2, lines  # no progress line at 100%: the closing line says it
    assert lines[0].startswith("eval tuned: 2/4 answers (50%), ") and ", eta " in lines[0]
    assert lines[1].startswith("eval tuned: 4 answers in ")


def test_nested_phases_and_stray_advances_stay_silent():
    con, buf = log_console()
    advance(5)  # no phase open: nothing happens
    with phase("eval", 2, con, "answers") as outer:
        with phase("load model", console=con) as inner:
            advance()
        assert inner.done == 1 and outer.done == 0
        advance(2)
    assert buf.getvalue().splitlines() == [buf.getvalue().splitlines()[0]]
    assert buf.getvalue().startswith("eval: 2 answers in ")


def test_a_failed_phase_prints_no_done_line():
    con, buf = log_console()
    with pytest.raises(ValueError):
        with phase("load model", console=con):
            raise ValueError("no such model")
    assert buf.getvalue() == ""


def test_a_phase_in_a_terminal_is_one_bar_left_on_screen():
    buf = io.StringIO()
    con = Console(file=buf, force_terminal=True, width=100, color_system=None)
    with phase("reference pass", 6, con, "sequences"):
        advance(6)
    final = buf.getvalue().split("\r")[-1]  # the bar's last redraw, which stays on screen
    assert final.startswith("\x1b[2Kreference pass ━━━━")
    assert re.search(r"6/6 sequences \d:\d\d:\d\d eta 0.0s\n", final)


def test_quiet_hides_the_libraries_and_puts_them_back(tiny_dir, capfd):
    from transformers.utils import logging as tf_logging

    from tunesmith.model.load import load_model_and_tokenizer

    assert tf_logging.is_progress_bar_enabled()
    with quiet(False):
        load_model_and_tokenizer(str(tiny_dir))
        shown = warnings.formatwarning("chat template has no system role", UserWarning, "y.py", 2)
        with warnings.catch_warnings(record=True) as recorded:  # code that records warnings still gets ours
            warnings.warn_explicit("old API", FutureWarning, "x.py", 1, module="transformers.modeling_utils")
            warnings.warn_explicit("kept", UserWarning, "y.py", 2, module="tunesmith.data.render")
    assert "Loading weights" not in capfd.readouterr().err
    assert shown == "warning: chat template has no system role\n"  # one line, no file:line and source
    assert [str(w.message) for w in recorded] == ["kept"]  # the library's warning was filtered out
    assert tf_logging.is_progress_bar_enabled() and "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ
    assert warnings.formatwarning is not ts_console._one_line
    with quiet(True):
        load_model_and_tokenizer(str(tiny_dir))
    assert "Loading weights" in capfd.readouterr().err  # --verbose: the library's own bar


def test_wrapping_a_model_in_peft_raises_no_future_warning(tiny_dir):
    """transformers 5 deprecates `is_gradient_checkpointing`, which PEFT reads on every wrap."""
    from peft import LoraConfig, get_peft_model

    from tunesmith.config import AdapterConfig
    from tunesmith.model.adapters import apply_adapter, load_adapter, save_adapter
    from tunesmith.model.load import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(str(tiny_dir))
    with warnings.catch_warnings(record=True) as raw:
        warnings.simplefilter("always")
        get_peft_model(load_model_and_tokenizer(str(tiny_dir))[0], LoraConfig(target_modules=["q_proj"]))
    assert any("is_gradient_checkpointing" in str(w.message) for w in raw)  # what tunesmith's calls avoid
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapped = apply_adapter(model, AdapterConfig())
        save_adapter(wrapped, Path(tiny_dir).parent / "peft-wrap-adapter")
        load_adapter(load_model_and_tokenizer(str(tiny_dir))[0], Path(tiny_dir).parent / "peft-wrap-adapter")
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []


def test_train_in_a_log_reads_well(tiny_dir, tmp_path):
    """`tunesmith train` with stderr to a file (CI): one line per phase, no library bars or warnings."""
    labels = ["card_arrival", "exchange_rate", "top_up_failed", "card_linking"]
    rows = [{"messages": [{"role": "user", "content": f"hello world {i}"},
                          {"role": "assistant", "content": labels[i % 4]}]} for i in range(12)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:8]) + "\n")
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows[8:]) + "\n")
    cfg = {"name": "quiet", "model": str(tiny_dir), "output_dir": str(tmp_path / "runs"), "device": "cpu",
           "precision": "fp32", "data": {"train": str(tmp_path / "train.jsonl")},
           "train": {"max_steps": 2, "micro_batch_size": 4},
           "eval": {"data": str(tmp_path / "test.jsonl"), "candidates": ["base", "tuned"], "max_new_tokens": 2}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("TUNESMITH_VERBOSE", None)
    done = subprocess.run([sys.executable, "-m", "tunesmith", "train", str(tmp_path / "c.yaml")], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stderr.splitlines()
    starts = [line.split(":")[0] for line in lines]
    for want in ("plan", "load model", "tokenise", "train sft", "eval base", "eval tuned", "done"):
        assert want in starts, (want, done.stderr)
    assert starts.count("load model") == 2  # training, then the eval's model
    assert not [line for line in lines if "Warning" in line or "it/s]" in line or "warnings.warn" in line]
    # none from tunesmith's calls into the libraries either (the eval's own notes on cut-off answers are fine:
    # a tiny model's answers run to max_new_tokens)
    assert not [line for line in lines if line.startswith("warning:") and "max_new_tokens" not in line]
    assert lines[starts.index("train sft")].startswith("train sft: step 1/2  loss ")


def test_a_preference_run_shows_its_plan_and_reference_pass(tiny_dir, tmp_path):
    """DPO in a log: the plan and the reference pass are phases too, the pass counting every example of the
    planned micro-batches (9 pairs, 2 per micro-batch of 4 rows: the short last one counts too); progress=False
    drops both."""
    import tunesmith

    rows = [{"prompt": f"hello {i}", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(9)]
    (tmp_path / "pref.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = {"name": "pref", "method": "dpo", "model": str(tiny_dir), "output_dir": str(tmp_path / "runs"),
           "device": "cpu", "precision": "fp32", "data": {"train": str(tmp_path / "pref.jsonl")},
           "train": {"epochs": 1, "micro_batch_size": 4}, "method_args": {"reference_cache": False}}
    shown, buf = log_console()
    tunesmith.train(cfg, console=shown)
    lines = buf.getvalue().splitlines()
    passes = [line for line in lines if line.startswith("reference pass:")]
    assert len(passes) == 1 and passes[0].startswith("reference pass: 9 examples in "), lines
    assert any(re.fullmatch(r"plan: \d+\.\ds", line) for line in lines), lines
    hidden, buf = log_console()
    tunesmith.train(cfg, console=hidden, progress=False)
    assert not [line for line in buf.getvalue().splitlines() if line.startswith(("plan:", "reference pass:"))]
