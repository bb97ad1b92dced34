"""Raw rows from local files, folders and hub datasets, each with where it came from.

Rows are plain dicts; nothing here knows about formats. Rows that cannot be read (invalid JSON, a line that
is not an object, a missing mapped column) become Problems, collected rather than raised one at a time.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import DataError, Problem, TunesmithError
from .types import Source

Row = dict[str, Any]

KINDS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text", ".md": "text"}
CANONICAL_COLUMNS = ("messages", "conversations", "system", "instruction", "input", "output", "prompt",
                     "completion", "chosen", "rejected", "label", "reference", "tools", "text")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?$")

csv.field_size_limit(2**31 - 1)


def read_rows(spec: str | Iterable[str], columns: dict[str, str] | None = None, split: str | None = None,
              problems: list[Problem] | None = None) -> Iterator[tuple[Row, Source]]:
    """Yield (row, source) for every readable row of `spec`: a file, a folder, a hub dataset id, or a list.

    `columns` maps canonical names to source columns ({"prompt": "question"}). Unreadable rows are appended
    to `problems` when given; otherwise they are collected and raised as one DataError after the last row.
    """
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not specs:
        raise TunesmithError("no data given", "name a file, a folder or a hub dataset id")
    _check_columns(columns or {})
    found: list[Problem] = [] if problems is None else problems
    for one in specs:
        for row, src in _rows_of_spec(str(one), split, found):
            mapped = _map_columns(row, columns or {}, src, found)
            if mapped is not None:
                yield mapped, src
    if problems is None and found:
        raise DataError(found)


def data_files(spec: str) -> list[Path] | None:
    """The local files `spec` names (a file, or every data file under a folder), or None for a hub id.
    A folder with structured data files (.jsonl/.json/.csv/.parquet) is read for those, and its .txt/.md files
    (READMEs, notes) are ignored like other file types; a folder of .txt/.md files only is a folder of
    documents, one per file."""
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted((p for p in path.rglob("*") if p.is_file() and _kind(p) and not _hidden(p, path)),
                       key=lambda p: p.relative_to(path).as_posix())
        structured = [p for p in files if _kind(p) != "text"]
        if not files:
            raise TunesmithError(f"folder {spec} holds no data files",
                                 f"supported: {', '.join(KINDS)} (optionally .gz compressed)")
        return structured or files
    if path.is_file():
        if _kind(path) is None:
            raise TunesmithError(f"{spec}: unsupported file type",
                                 f"use one of {', '.join(KINDS)} (optionally .gz compressed)")
        return [path]
    if _kind(path) is not None or not _HUB_ID.match(spec):
        raise TunesmithError(f"data file not found: {spec}", "check the path (relative to where you run)")
    return None


def _rows_of_spec(spec: str, split: str | None, problems: list[Problem]) -> Iterator[tuple[Row, Source]]:
    files = data_files(spec)
    if files is None:
        yield from _hub_rows(spec, split)
        return
    for path in files:
        yield from _rows_of_file(path, problems)


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return KINDS.get(Path(name).suffix)


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _rows_of_file(path: Path, problems: list[Problem]) -> Iterator[tuple[Row, Source]]:
    kind = _kind(path)
    data = _read_bytes(path)
    if kind == "text":
        yield from _text_rows(data, str(path), problems)
    elif kind == "parquet":
        yield from _parquet_rows(data, str(path))
    elif kind == "jsonl":
        yield from _jsonl_rows(data, str(path), problems)
    elif kind == "json":
        yield from _json_rows(data, str(path), problems)
    else:
        yield from _csv_rows(data, str(path), problems)


def _read_bytes(path: Path) -> bytes:
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise TunesmithError(f"{path}: cannot read file ({e})",
                             "check that the file is complete; a .gz file must be gzip-compressed") from None


def _jsonl_rows(data: bytes, file: str, problems: list[Problem], first_line: int = 1
                ) -> Iterator[tuple[Row, Source]]:
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for offset, raw in enumerate(data.splitlines()):
        src = Source(file, first_line + offset)
        if not raw.strip():
            continue
        row = _parse_json_line(raw, src, problems)
        if row is not None:
            yield row, src


def _parse_json_line(raw: bytes, src: Source, problems: list[Problem]) -> Row | None:
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        problems.append(Problem(str(src), f"line is not valid UTF-8 text (byte {e.start})",
                                "save the file as UTF-8"))
        return None
    except json.JSONDecodeError as e:
        problems.append(Problem(str(src), f"invalid JSON: {e.msg} at column {e.colno}",
                                "each line must be one complete JSON object"))
        return None
    except RecursionError:
        problems.append(Problem(str(src), "invalid JSON: nested too deeply"))
        return None
    if not isinstance(value, dict):
        problems.append(Problem(str(src), f"expected a JSON object, got {_json_type(value)}",
                                'each row must be an object such as {"messages": [...]}'))
        return None
    return value


def _text_rows(data: bytes, file: str, problems: list[Problem]) -> Iterator[tuple[Row, Source]]:
    """A .txt/.md file is one document: {"text": its whole content}, at line 1."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        problems.append(Problem(f"{file}:{line}", f"not valid UTF-8 text (byte {e.start})", "save the file as UTF-8"))
        return
    yield {"text": text}, Source(file, 1)


def _json_rows(data: bytes, file: str, problems: list[Problem]) -> Iterator[tuple[Row, Source]]:
    text = _decode(data, file)
    try:
        value = json.loads(text)
    except RecursionError:
        raise TunesmithError(f"{file}: JSON nested too deeply") from None
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("["):
            problems.append(Problem(f"{file}:{e.lineno}", f"invalid JSON: {e.msg} at column {e.colno}",
                                    "the file starts with '[' so it must be one valid JSON array"))
            return
        yield from _jsonl_rows(data, file, problems)  # JSON Lines content in a .json file
        return
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if isinstance(value, dict):
        yield value, Source(file, 1)
        return
    if not isinstance(value, list):
        raise TunesmithError(f"{file}: expected a JSON array of objects, got {_json_type(value)}",
                             'use [{...}, {...}], {"data": [...]} or one JSON object per line')
    for index, item in enumerate(value):
        src = Source(file, index)
        if isinstance(item, dict):
            yield item, src
        else:
            problems.append(Problem(str(src), f"array item {index} is {_json_type(item)}, not an object"))


def _csv_rows(data: bytes, file: str, problems: list[Problem]) -> Iterator[tuple[Row, Source]]:
    reader = csv.reader(io.StringIO(_decode(data, file), newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return
        repeated = sorted({h for h in header if header.count(h) > 1})
        if repeated:
            raise TunesmithError(f"{file}: the header repeats column(s) {', '.join(map(repr, repeated))}",
                                 "give every column a distinct name")
        for number, cells in enumerate(reader, start=1):
            if not cells:
                continue
            src = Source(file, number)
            if len(cells) != len(header):
                problems.append(Problem(str(src), f"row has {len(cells)} cells but the header has {len(header)}",
                                        "quote cells that contain commas or newlines"))
                continue
            yield dict(zip(header, cells, strict=True)), src
    except csv.Error as e:
        raise TunesmithError(f"{file}: invalid CSV near data row {reader.line_num - 1}: {e}") from None


def _parquet_rows(data: bytes, file: str) -> Iterator[tuple[Row, Source]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    index = 0
    try:
        for batch in pq.ParquetFile(pa.BufferReader(data)).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield row, Source(file, index)
                index += 1
    except (pa.ArrowException, OSError, ValueError) as e:
        raise TunesmithError(f"{file}: cannot read Parquet file near row {index} ({e})") from None


def _decode(data: bytes, file: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise TunesmithError(f"{file}:{line}: not valid UTF-8 text (byte {e.start})",
                             "save the file as UTF-8") from None


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _hub_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_rows(spec: str, split: str | None) -> Iterator[tuple[Row, Source]]:
    name, _, explicit = spec.partition(":")
    split = explicit or split or "train"
    hint = "use a local .jsonl/.json/.csv/.parquet file or folder instead"
    if not _hub_offline():
        # Probe once without retries: load_dataset would back off for ~20 s when the network is down.
        from huggingface_hub import HfApi
        from huggingface_hub.errors import RepositoryNotFoundError

        try:
            HfApi().dataset_info(name, timeout=10)
        except RepositoryNotFoundError:
            raise TunesmithError(f"'{spec}' is neither a local file or folder nor a dataset on the Hub",
                                 hint) from None
        except Exception as e:  # network errors come from several libraries
            raise TunesmithError(f"could not reach hub dataset '{name}' ({type(e).__name__}); "
                                 f"'{spec}' is not a local file or folder either", hint) from None
    import datasets

    try:
        rows = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, missing split, or not cached
        raise TunesmithError(f"could not load hub dataset '{name}' split '{split}' "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                             f"'{spec}' is not a local file or folder either",
                             hint + "; HF_HUB_OFFLINE is set, so only cached datasets load"
                             if _hub_offline() else hint) from None
    for index, row in enumerate(rows):
        yield dict(row), Source(f"{name}:{split}", index)


def _check_columns(columns: dict[str, str]) -> None:
    unknown = [k for k in columns if k not in CANONICAL_COLUMNS]
    if unknown:
        raise TunesmithError(f"data.columns maps unknown canonical name(s): {', '.join(unknown)}",
                             f"keys are canonical names ({', '.join(CANONICAL_COLUMNS)}), values are your "
                             "column names, e.g. columns: {prompt: question}")


def _map_columns(row: Row, columns: dict[str, str], src: Source, problems: list[Problem]) -> Row | None:
    if not columns:
        return row
    missing = [f"'{source}' (for {canonical})" for canonical, source in columns.items() if source not in row]
    if missing:
        problems.append(Problem(str(src), f"column {', '.join(missing)} not found (data.columns)",
                                f"columns in this row: {', '.join(map(str, row)) or 'none'}"))
        return None
    mapped = {k: v for k, v in row.items() if k not in columns.values()}
    mapped.update({canonical: row[source] for canonical, source in columns.items()})
    return mapped
