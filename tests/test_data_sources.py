"""Reading raw rows: every file kind, folders, compression, column mapping, hub ids, provenance."""

from __future__ import annotations

import gzip
import json
import re
import time
from pathlib import Path

import pytest

from tunesmith.data import sources
from tunesmith.data.sources import read_rows
from tunesmith.data.types import Source
from tunesmith.errors import DataError, Problem, TunesmithError

FIX = Path(__file__).parent / "fixtures" / "data"


def rows_of(spec, **kw):
    return list(read_rows(str(spec), **kw))


def test_jsonl_rows_keep_one_based_line_numbers_across_blank_lines(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"a": 1}\n\n   \n{"a": 2}\r\n{"a": 3}')
    got = rows_of(path)
    assert [(r["a"], s.line) for r, s in got] == [(1, 1), (2, 4), (3, 5)]
    assert all(s.file == str(path) for _, s in got)


def test_invalid_json_lines_are_all_collected_not_raised_one_at_a_time(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n{"a": \n[1, 2]\n{"a": 4}\n"text"\n')
    problems: list[Problem] = []
    got = list(read_rows(str(path), problems=problems))
    assert [s.line for _, s in got] == [1, 4]
    assert [p.where for p in problems] == [f"{path}:2", f"{path}:3", f"{path}:5"]
    assert "invalid JSON" in problems[0].what
    assert "got an array" in problems[1].what and "got a string" in problems[2].what
    with pytest.raises(DataError) as err:  # without a list, they are raised together after the last row
        rows_of(path)
    assert err.value.total == 3


def test_invalid_utf8_line_is_a_problem_with_its_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": "\xff"}\n')
    problems: list[Problem] = []
    assert len(list(read_rows(str(path), problems=problems))) == 1
    assert problems[0].where == f"{path}:2" and "UTF-8" in problems[0].what


def test_json_array_rows_are_indexed_from_zero():
    got = rows_of(FIX / "alpaca.json")
    assert [s.line for _, s in got] == [0, 1]
    assert got[0][0]["output"] == "chat"


def test_json_data_wrapper_and_jsonl_content_in_json_file(tmp_path):
    assert [r for r, _ in rows_of(FIX / "alpaca_data.json")] == [r for r, _ in rows_of(FIX / "alpaca.json")]
    path = tmp_path / "lines.json"
    path.write_text('{"a": 1}\n{"a": 2}\n')
    assert [(r["a"], s.line) for r, s in rows_of(path)] == [(1, 1), (2, 2)]


def test_broken_json_array_reports_the_line_of_the_error(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"a": 1},\n  {"a": 2}\n  {"a": 3}\n]\n')
    problems: list[Problem] = []
    assert list(read_rows(str(path), problems=problems)) == []
    assert problems[0].where == f"{path}:4" and "invalid JSON" in problems[0].what


def test_csv_rows_count_data_rows_not_the_header_or_physical_lines():
    got = rows_of(FIX / "qa.csv")
    assert [s.line for _, s in got] == [1, 2]
    assert got[1][0] == {"question": "Multi-line, with comma?", "answer": "Line one,\nline two.", "id": "2"}


def test_csv_ragged_row_is_a_problem(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("prompt,completion\na,b\nc,d,e\n")
    problems: list[Problem] = []
    assert len(list(read_rows(str(path), problems=problems))) == 1
    assert problems[0].where == f"{path}:2" and "3 cells" in problems[0].what


def test_csv_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(b"prompt,completion\nok,fine\n\xff\xfe,x\n")
    with pytest.raises(TunesmithError, match=re.escape(f"{path}:3: not valid UTF-8")):
        rows_of(path)


def test_parquet_rows_with_nested_messages(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    got = rows_of(tmp_path / "t.parquet")
    assert [r for r, _ in got] == rows
    assert [s for _, s in got] == [Source(str(tmp_path / "t.parquet"), i) for i in range(3)]


def test_gzip_variants_read_like_the_plain_file(tmp_path):
    plain = [r for r, _ in rows_of(FIX / "messages.jsonl")]
    assert [r for r, _ in rows_of(FIX / "messages.jsonl.gz")] == plain
    with gzip.open(tmp_path / "qa.csv.gz", "wb") as f:
        f.write((FIX / "qa.csv").read_bytes())
    assert [r for r, _ in rows_of(tmp_path / "qa.csv.gz")] == [r for r, _ in rows_of(FIX / "qa.csv")]


def test_corrupt_gzip_is_one_clear_error(tmp_path):
    path = tmp_path / "t.jsonl.gz"
    path.write_bytes(b"definitely not gzip")
    with pytest.raises(TunesmithError, match="cannot read file"):
        rows_of(path)


def test_folder_is_read_recursively_sorted_skipping_hidden_and_non_data_files():
    got = rows_of(FIX / "folder")
    assert [Path(s.file).relative_to(FIX / "folder").as_posix() for _, s in got] == ["a/part1.jsonl",
                                                                                     "b/part2.jsonl.gz"]
    assert all("junk" not in r for r, _ in got)


def test_list_of_specs_is_concatenated():
    got = list(read_rows([str(FIX / "alpaca.json"), str(FIX / "qa.csv")]))
    assert [Path(s.file).name for _, s in got] == ["alpaca.json", "alpaca.json", "qa.csv", "qa.csv"]


def test_column_mapping_renames_source_columns_to_canonical_ones():
    got = rows_of(FIX / "qa.csv", columns={"prompt": "question", "completion": "answer"})
    assert got[0][0] == {"prompt": "What is the boiling point of water?", "completion": "100 C at sea level.",
                         "id": "1"}


def test_column_mapping_can_swap_columns(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"prompt": "A", "completion": "B"}) + "\n")
    got = rows_of(path, columns={"prompt": "completion", "completion": "prompt"})
    assert got[0][0] == {"prompt": "B", "completion": "A"}


def test_missing_mapped_column_is_a_problem_listing_the_real_columns():
    problems: list[Problem] = []
    assert list(read_rows(str(FIX / "qa.csv"), columns={"prompt": "query"}, problems=problems)) == []
    assert len(problems) == 2
    assert "'query' (for prompt) not found" in problems[0].what
    assert "question, answer, id" in problems[0].hint


def test_unknown_canonical_column_name_is_rejected_up_front():
    with pytest.raises(TunesmithError, match="unknown canonical name"):
        rows_of(FIX / "qa.csv", columns={"question": "prompt"})


@pytest.mark.parametrize("name", ["missing.jsonl", "dir/missing.csv.gz", "x.parquet"])
def test_missing_local_file_is_not_treated_as_a_hub_id(tmp_path, name):
    with pytest.raises(TunesmithError, match="data file not found"):
        rows_of(tmp_path / name)


def test_unsupported_file_type_and_empty_folder(tmp_path):
    (tmp_path / "notes.rtf").write_text("hi")
    with pytest.raises(TunesmithError, match="unsupported file type"):
        rows_of(tmp_path / "notes.rtf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TunesmithError, match="holds no data files"):
        rows_of(tmp_path / "empty")


def test_hub_id_offline_is_one_clear_error_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(TunesmithError) as err:
        rows_of("someone-xyz/no-such-dataset-123")
    assert time.monotonic() - start < 10
    assert "someone-xyz/no-such-dataset-123" in err.value.message
    assert "local" in err.value.hint and "HF_HUB_OFFLINE" in err.value.hint


def test_hub_id_without_network_does_not_retry(monkeypatch):
    monkeypatch.setattr(sources, "_hub_offline", lambda: False)
    start = time.monotonic()
    with pytest.raises(TunesmithError, match="someone-xyz/no-such-dataset-123"):
        rows_of("someone-xyz/no-such-dataset-123")
    assert time.monotonic() - start < 15  # one probe with a timeout, not load_dataset's ~25 s of back-off


def test_text_and_markdown_files_are_one_document_each(tmp_path):
    (tmp_path / "a.txt").write_text("first line\nsecond line\n")
    (tmp_path / "b.md.gz").write_bytes(gzip.compress(b"# Title\n\nbody"))
    got = list(read_rows([str(tmp_path / "a.txt"), str(tmp_path / "b.md.gz")]))
    assert got == [({"text": "first line\nsecond line\n"}, Source(str(tmp_path / "a.txt"), 1)),
                   ({"text": "# Title\n\nbody"}, Source(str(tmp_path / "b.md.gz"), 1))]


def test_folder_of_documents_and_folder_with_data_files(tmp_path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "z.md").write_text("zed")
    (docs / "sub" / "a.txt").write_text("ay")
    (docs / ".draft.txt").write_text("hidden")
    got = rows_of(docs)
    assert [(r["text"], Path(s.file).relative_to(docs).as_posix()) for r, s in got] == [("ay", "sub/a.txt"),
                                                                                         ("zed", "z.md")]
    # next to structured data, .txt/.md files (READMEs, notes) are not data: the fixture folder has a notes.txt
    assert all(s.file.endswith((".jsonl", ".jsonl.gz")) for _, s in rows_of(FIX / "folder"))


def test_text_file_that_is_not_utf8_is_a_problem_with_its_line(tmp_path):
    (tmp_path / "ok.txt").write_text("fine")
    (tmp_path / "bad.txt").write_bytes(b"line one\nline \xff two\n")
    problems: list[Problem] = []
    got = list(read_rows(str(tmp_path), problems=problems))
    assert [s.file for _, s in got] == [str(tmp_path / "ok.txt")]
    assert problems == [Problem(f"{tmp_path / 'bad.txt'}:2", "not valid UTF-8 text (byte 14)",
                                "save the file as UTF-8")]
