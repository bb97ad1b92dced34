"""The shipped eval examples: the demo climbs the ladder, and the format-conformance example's data, schema and
metrics agree with each other and are rebuilt exactly by its prepare script."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from tunesmith.config import load_config
from tunesmith.eval.metrics import parse_metric

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_the_demo_climbs_the_ladder():
    cfg = load_config(EXAMPLES / "banking77" / "config.yaml")
    assert cfg.eval.candidates == ["knn:5", "base", "base+labels", "base+fewshot:5", "base+rag:5", "tuned"]
    assert cfg.eval.max_new_tokens == "auto"  # no fixed limit that cuts the longest labels
    assert cfg.precision == "auto"


def _prepare():
    spec = importlib.util.spec_from_file_location("banking77_json_prepare", EXAMPLES / "banking77-json" / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_format_conformance_example_is_consistent(tmp_path):
    folder = EXAMPLES / "banking77-json"
    cfg = load_config(folder / "config.yaml")
    assert cfg.eval.metrics[0] == f"json_schema:{folder / 'schema.json'}"  # resolved next to the config
    schema_metric, fields = parse_metric(cfg.eval.metrics[0]), parse_metric("json_fields")
    labels = set(json.loads((EXAMPLES / "banking77" / "labels.json").read_text()))
    prepare = _prepare()
    for name, rows in (("train.jsonl", 3000), ("test.jsonl", 500)):
        lines = (folder / name).read_text().splitlines()
        assert len(lines) == rows
        for line in lines:
            answer = json.loads(line)["messages"][-1]["content"]
            assert schema_metric.score(answer, answer) == 1.0 and fields.score(answer, answer) == 1.0
            value = json.loads(answer)
            assert value["intent"] in labels and value["category"] == prepare.category(value["intent"])
    assert not schema_metric.score('{"intent": "card_arrival"}', "{}")  # the category is required
    for name in ("train.jsonl", "test.jsonl"):  # the script rebuilds the shipped files byte for byte
        rows = len((folder / name).read_text().splitlines())
        prepare.convert(EXAMPLES / "banking77" / name, tmp_path / name, rows)
        assert (tmp_path / name).read_bytes() == (folder / name).read_bytes()
    assert json.loads((folder / "schema.json").read_text()) == prepare.schema(
        json.loads((EXAMPLES / "banking77" / "labels.json").read_text()))
