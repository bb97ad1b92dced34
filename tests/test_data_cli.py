"""`tunesmith data check` and `tunesmith data preview`, called through the CLI entry point."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tunesmith.cli import main
from tunesmith.data.preview import marked, preview_spans
from tunesmith.data.render import IGNORE, Renderer, Tokenized
from tunesmith.data.types import Conversation, Message


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def chat(user, answer):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


@pytest.fixture
def clean(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", [chat(f"hello world {i}", "card_arrival") for i in range(3)]
                       + [chat("what is my card balance", "exchange_rate")])


@pytest.fixture
def bad(tmp_path):
    return write_jsonl(tmp_path / "bad.jsonl", [chat("hello", "card_arrival"),
                                                {"messages": [{"role": "bot", "content": "hi"}]},
                                                "{not json"])


def test_check_json_report(clean, tiny_dir, capsys):
    assert main(["data", "check", str(clean), "--model", str(tiny_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"files", "format", "kind", "rows", "examples", "invalid", "lengths", "findings", "error_count",
            "warning_count"} <= set(report)
    assert (report["format"], report["kind"], report["examples"], report["error_count"]) == ("messages", "sft", 4, 0)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    longest = max(len(Renderer(tok).sft(Conversation((Message("user", u), Message("assistant", a))))) for u, a in
                  [("hello world 0", "card_arrival"), ("what is my card balance", "exchange_rate")])
    assert report["lengths"]["max"] == longest and report["lengths"]["count"] == 4


def test_check_errors_exit_non_zero_with_rows_and_no_traceback(bad, capsys):
    assert main(["data", "check", str(bad)]) == 1
    captured = capsys.readouterr()
    assert f"{bad}:2: messages[0].role: unknown role 'bot'" in captured.out
    assert f"{bad}:3: invalid JSON" in captured.out
    assert "2 error(s)" in captured.out and "Traceback" not in captured.out + captured.err


def test_check_json_lists_error_rows(bad, capsys):
    assert main(["data", "check", str(bad), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    codes = {f["code"]: f for f in report["findings"] if f["level"] == "error"}
    assert set(codes) == {"role", "unreadable"} and report["error_count"] == 2
    assert codes["role"]["rows"] == [f"{bad}:2: messages[0].role: unknown role 'bot'"]


def test_check_eval_leakage_is_an_error(clean, tmp_path, capsys):
    held = write_jsonl(tmp_path / "eval.jsonl", [chat("Hello  World 1", "card_arrival")])
    assert main(["data", "check", str(clean), "--eval", str(held), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert [f["rows"] for f in report["findings"] if f["code"] == "leakage"] == [[f"{held}:1 = {clean}:2"]]


def test_check_missing_file_is_a_clear_error(tmp_path, capsys):
    assert main(["data", "check", str(tmp_path / "nope.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "nope.jsonl" in err and "Traceback" not in err


def test_preview_marks_trained_tokens_and_counts_them(clean, tiny_dir, capsys):
    assert main(["data", "preview", str(clean), "--model", str(tiny_dir), "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("[[card_arrival<|im_end|>]]") == 2 and "exchange_rate" not in out  # -n 2
    assert f"--- {clean}:1 ---" in out and f"--- {clean}:2 ---" in out
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    item = Renderer(tok).sft(Conversation((Message("user", "hello world 0"), Message("assistant", "card_arrival"))))
    assert f"{len(item)} tokens, {item.n_target} trained" in out
    assert "<|im_start|>user\nhello world 0<|im_end|>\n<|im_start|>assistant\n[[card_arrival" in out


def test_preview_shows_truncation_and_dropped_examples(tmp_path, tiny_dir, capsys):
    data = write_jsonl(tmp_path / "long.jsonl", [chat("hello world " * 30, "card_arrival")])
    assert main(["data", "preview", str(data), "--model", str(tiny_dir), "--max-length", "24"]) == 0
    assert "dropped: no trained token within max_length 24 (truncation: right)" in capsys.readouterr().out
    assert main(["data", "preview", str(data), "--model", str(tiny_dir), "--max-length", "24",
                 "--truncation", "left"]) == 0
    out = capsys.readouterr().out
    assert "24 tokens, 4 trained, truncated (left) to max_length 24" in out and "[[card_arrival<|im_end|>]]" in out


def test_preview_preference_pair_shows_both_sides(tmp_path, tiny_dir, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "hello", "chosen": "card_arrival",
                                                   "rejected": "exchange_rate"}])
    assert main(["data", "preview", str(data), "--model", str(tiny_dir)]) == 0
    out = capsys.readouterr().out
    assert f"--- {data}:1 chosen ---" in out and "[[card_arrival<|im_end|>]]" in out
    assert f"--- {data}:1 rejected ---" in out and "[[exchange_rate<|im_end|>]]" in out


def test_preview_of_invalid_file_is_an_error_naming_rows(tmp_path, tiny_dir, capsys):
    data = write_jsonl(tmp_path / "allbad.jsonl", ["{oops", {"messages": [{"role": "user", "content": "hi"}]}])
    assert main(["data", "preview", str(data), "--model", str(tiny_dir)]) != 0
    captured = capsys.readouterr()
    assert f"{data}:1: invalid JSON" in captured.err and f"{data}:2" in captured.err
    assert "Traceback" not in captured.out + captured.err


def test_preview_skips_invalid_rows_and_says_so(bad, tiny_dir, capsys):
    assert main(["data", "preview", str(bad), "--model", str(tiny_dir)]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("--- ") == 1 and "2 invalid row(s) skipped" in captured.err


def test_preview_default_template_warning_is_one_line(clean, tiny_dir, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(tiny_dir, base)
    (base / "chat_template.jinja").unlink()
    assert main(["data", "preview", str(clean), "--model", str(base), "-n", "1"]) == 0
    captured = capsys.readouterr()
    assert "warning: the tokenizer has no chat template" in captured.err
    assert "### User:\nhello world 0\n\n### Assistant:\n[[card_arrival<|im_end|>]]" in captured.out


def test_bad_numbers_are_errors(clean, tiny_dir, capsys):
    assert main(["data", "preview", str(clean), "--model", str(tiny_dir), "-n", "0"]) == 2
    assert main(["data", "check", str(clean), "--max-length", "2"]) == 2
    assert "at least" in capsys.readouterr().err


def test_preview_spans_partition_the_text_exactly(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    item = Renderer(tok).sft(Conversation((Message("user", "hi"), Message("assistant", "héllo wörld ✓")),))
    spans = preview_spans(tok, item)
    assert "".join(t for t, _ in spans) == tok.decode(list(item.input_ids))
    assert [trained for _, trained in spans] == [False, True, False]
    assert spans[1][0] == "héllo wörld ✓<|im_end|>"
    assert marked(spans).endswith("[[héllo wörld ✓<|im_end|>]]\n")


def test_preview_spans_with_a_boundary_inside_a_character(tiny_dir):
    """Labels that start mid-character (left truncation can do this): the spans still cover every token."""
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    ids = tok("a✓b", add_special_tokens=False)["input_ids"]
    assert len(ids) >= 4  # ✓ is three bytes, each its own token in this tiny vocabulary
    labels = [IGNORE, IGNORE] + ids[2:]
    spans = preview_spans(tok, Tokenized(tuple(ids), tuple(labels)))
    assert [trained for _, trained in spans] == [False, True]
    assert spans[0][0].startswith("a") and spans[1][0].endswith("b")


def test_template_errors_are_reported_whole(tmp_path, tiny_dir, capsys):
    """Template messages quote template text such as "[/INST]", which must not be read as terminal markup."""
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    (model / "chat_template.jinja").write_text("{{ raise_exception('the answer goes after [/INST]') }}")
    data = write_jsonl(tmp_path / "d.jsonl", [chat("hi", "hello")])
    assert main(["data", "preview", str(data), "--model", str(model)]) == 2
    err = capsys.readouterr().err
    assert "failed to render: the answer goes after [/INST]" in err and "Traceback" not in err
    strip = (Path(__file__).parent / "fixtures" / "templates" / "reasoning_strip.jinja").read_text()
    (model / "chat_template.jinja").write_text(strip)
    thinking = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>a</think>b"},
                             {"role": "user", "content": "ok"}, {"role": "assistant", "content": "<think>c</think>d"}]}
    data = write_jsonl(tmp_path / "t.jsonl", [thinking])
    assert main(["data", "preview", str(data), "--model", str(model)]) == 2
    err = capsys.readouterr().err
    assert "is not prefix-consistent at messages[1] (assistant)" in err and "train_on: last_assistant" in err
    assert main(["data", "preview", str(data), "--model", str(model), "--train-on", "last_assistant"]) == 0
    assert "[[<think>c</think>d<|im_end|>]]" in capsys.readouterr().out
    # the doctor reports it as an error finding naming the row, and agrees with --train-on
    assert main(["data", "check", str(data), "--model", str(model), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert [(f["code"], f["rows"]) for f in report["findings"] if f["level"] == "error"] == [("template", [f"{data}:1"])]
    assert main(["data", "check", str(data), "--model", str(model), "--train-on", "last_assistant"]) == 0


def test_check_empty_file_exits_one_and_report_file_holds_every_row(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["data", "check", str(empty)]) == 1
    assert f"{empty}: no rows found" in capsys.readouterr().out
    rows = [chat(f"question {i}: I ordered a new debit card two weeks ago and it still has not arrived at my home "
                 "address, can you tell me where it is and when it will come", "Cards arrive within ten working "
                 "days; if yours has not come by then, we can cancel it and send you a new one") for i in range(30)]
    rows += [chat(f"something else entirely: {w}", f"an answer about {w}") for w in "abcdefghij"]
    data = write_jsonl(tmp_path / "dups.jsonl", rows)
    report = tmp_path / "out" / "report.json"
    assert main(["data", "check", str(data), "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "... and 25 more" in out and f"full report: {report}" in out
    [near] = [f for f in json.loads(report.read_text())["findings"] if f["code"] == "near_duplicates"]
    assert near["groups"] == [[f"{data}:{i}" for i in range(1, 31)]]
