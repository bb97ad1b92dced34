"""Property tests: whatever is in a data file, loading either succeeds or raises a TunesmithError that says
where the problem is. Never a raw traceback, never a silently dropped row."""

from __future__ import annotations

import gzip
import json
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunesmith.data.doctor import check_data
from tunesmith.data.formats import FORMATS
from tunesmith.data.load import load_examples
from tunesmith.errors import DataError, TunesmithError

FIX = Path(__file__).parent / "fixtures" / "data"
LOCATED = re.compile(r".+:\d+$")
KEYS = ["messages", "conversations", "role", "content", "from", "value", "instruction", "input", "output",
        "prompt", "completion", "chosen", "rejected", "label", "system", "weight", "type", "text"]
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False) | \
    st.sampled_from(["", " ", "user", "assistant", "system", "tool", "human", "gpt", "hi",
                     "\n\nHuman: q\n\nAssistant: a", "true"]) | st.text(max_size=8)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), inner, max_size=4),
                           max_leaves=20)
rows = st.dictionaries(st.sampled_from(KEYS), json_values, max_size=5)


def check_loading(path: Path, fmt: str, skip_invalid: bool) -> None:
    try:
        ds = load_examples(str(path), format=fmt, skip_invalid=skip_invalid)
    except DataError as e:
        assert e.problems, "a DataError must name at least one problem"
        for p in e.problems:  # "file:line", or the file itself for whole-file problems (empty, mixed formats)
            assert p.where == str(path) or (p.where.startswith(f"{path}:") and LOCATED.match(p.where)), p.where
        return
    except TunesmithError as e:
        assert str(path) in e.message, e.message
        return
    assert ds.examples
    for ex in ds.examples:
        assert ex.source is not None and ex.source.file == str(path)
    for source, reason in ds.rejected:
        assert source is not None and source.file == str(path) and reason


def write(data: bytes, name: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="fuzz"))
    path = folder / name
    path.write_bytes(gzip.compress(data, mtime=0) if name.endswith(".gz") else data)
    return path


@SETTINGS
@given(st.lists(rows, min_size=1, max_size=6), st.sampled_from(("auto",) + FORMATS), st.booleans())
def test_random_json_rows(rows_, fmt, skip_invalid):
    data = "".join(json.dumps(r) + "\n" for r in rows_).encode()
    check_loading(write(data, "rows.jsonl"), fmt, skip_invalid)


@SETTINGS
@given(st.lists(json_values, min_size=1, max_size=6), st.sampled_from(["x.jsonl", "x.json", "x.jsonl.gz"]))
def test_random_json_values_of_any_type(values, name):
    data = "".join(json.dumps(v) + "\n" for v in values).encode()
    check_loading(write(data, name), "auto", False)


@SETTINGS
@given(st.binary(max_size=200), st.sampled_from(["x.jsonl", "x.json", "x.csv", "x.jsonl.gz", "x.parquet",
                                                 "x.csv.gz"]), st.booleans())
def test_random_bytes(data, name, skip_invalid):
    check_loading(write(data, name), "auto", skip_invalid)


@SETTINGS
@given(st.sampled_from(sorted(p.name for p in FIX.glob("*.json*") if not p.name.endswith(".gz"))),
       st.floats(0.0, 1.0), st.booleans())
def test_truncated_real_files(name, fraction, skip_invalid):
    data = (FIX / name).read_bytes()
    cut = data[: int(len(data) * fraction)]
    check_loading(write(cut, name), "auto", skip_invalid)


@SETTINGS
@given(st.lists(st.lists(st.text(max_size=6) | st.sampled_from(["prompt", "completion", "label", "true"]),
                         min_size=1, max_size=4), min_size=1, max_size=5))
def test_random_csv(table):
    import csv
    import io

    out = io.StringIO()
    csv.writer(out).writerows(table)
    check_loading(write(out.getvalue().encode(), "x.csv"), "auto", True)


@settings(max_examples=25, deadline=None)
@given(st.lists(rows, min_size=1, max_size=6))
def test_doctor_reports_instead_of_raising(rows_):
    path = write("".join(json.dumps(r) + "\n" for r in rows_).encode(), "rows.jsonl")
    report = check_data(str(path))
    assert report.rows == len(rows_)
    assert report.examples + report.invalid == len(rows_)
    for finding in report.errors:
        assert finding.code == "mixed_format" or finding.rows


def test_truncated_gzip_is_a_located_error(tmp_path):
    data = gzip.compress((FIX / "messages.jsonl").read_bytes())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TunesmithError, match=re.escape(str(path))):
        load_examples(str(path))
