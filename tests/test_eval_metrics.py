import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunesmith.errors import TunesmithError
from tunesmith.eval.metrics import (
    METRIC_SPECS,
    field_accuracy,
    normalize,
    parse_metric,
    score_all,
    strip_code_fence,
    summarize_details,
)


@pytest.mark.parametrize("raw, expected", [
    ('  "Paris."  ', "paris"),
    ("New   York\n City", "new york city"),
    ("'Yes'", "yes"),
    ("\u201cOK\u201d.", "ok"),
    ("STRASSE", "strasse"),
    ("Wait...", "wait..."),  # an ellipsis is content, not a trailing period
    ('"unbalanced', '"unbalanced'),
    ("", ""),
])
def test_normalize(raw, expected):
    assert normalize(raw) == expected


@given(st.text(max_size=40))
def test_normalize_is_idempotent(text):
    assert normalize(normalize(text)) == normalize(text)


def test_exact():
    m = parse_metric("exact")
    assert (m.name, m.binary, m.higher_is_better, m.needs_logprobs) == ("exact", True, True, False)
    assert score_all(m, [' "Paris." ', "paris france", "Lyon"], ["paris", "Paris  France", "Paris"]) == [1.0, 1.0, 0.0]


def test_contains():
    m = parse_metric("contains")
    assert m.score("The answer is PARIS, France", "paris") == 1.0
    assert m.score("Lyon", "paris") == 0.0
    assert m.score("anything", "") == 0.0  # an empty reference gives no free points
    assert m.score("", "") == 1.0


def test_choice_default_labels_from_references():
    refs = ["positive", "negative", "Neutral"]
    m = parse_metric("choice", references=refs)
    assert m.score("Positive.", "positive") == 1.0
    assert m.score("negative", "positive") == 0.0
    assert m.details("negative", "positive") == {"invalid": False}
    assert m.score("great", "positive") == 0.0
    assert m.details("great", "positive") == {"invalid": True}
    assert m.details("neutral", "positive") == {"invalid": False}
    rates = summarize_details(m, ["positive", "meh", "nope", "negative"], ["positive"] * 4)
    assert rates == {"invalid": 0.5}


def test_choice_needs_labels():
    with pytest.raises(TunesmithError, match="label set"):
        parse_metric("choice")


def test_choice_labels_file(tmp_path):
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(["yes", "no"]))
    m = parse_metric(f"choice:{labels}")
    assert m.score("Yes", "yes") == 1.0
    assert m.details("maybe", "maybe") == {"invalid": True}
    assert m.score("maybe", "maybe") == 0.0  # not a valid label even if it equals the reference
    relative = parse_metric("choice:labels.json", base_dir=tmp_path)
    assert relative.score("no", "no") == 1.0
    labels.write_text(json.dumps({"yes": 1}))
    with pytest.raises(TunesmithError, match="labels.json.*JSON list of strings"):
        parse_metric(f"choice:{labels}")


def test_regex_format_only_and_answer_group():
    fmt = parse_metric(r"regex:\d{3}-\d{4}")
    assert fmt.score("555-1234\n", "ignored") == 1.0
    assert fmt.score("call 555-1234", "ignored") == 0.0  # fullmatch, not search
    ans = parse_metric(r"regex:(?s).*Answer: (?P<answer>\w+)\.?")
    assert ans.score("Let me think. Answer: Paris.", "paris") == 1.0
    assert ans.score("Let me think. Answer: Lyon", "paris") == 0.0
    assert ans.score("no answer here", "paris") == 0.0
    assert ans.details("x Answer: Rome", "paris") == {"matched": True, "answer": "Rome"}


def test_regex_invalid_pattern():
    with pytest.raises(TunesmithError, match="invalid regular expression"):
        parse_metric("regex:(unclosed")


def test_json_metric_and_code_fences():
    m = parse_metric("json")
    assert m.score('{"a": 1}', "") == 1.0
    assert m.score('```json\n{"a": 1}\n```', "") == 1.0
    assert m.score("{'a': 1}", "") == 0.0
    assert m.score("Sure! {\"a\": 1}", "") == 0.0
    assert strip_code_fence("```\n[1, 2]\n```") == "[1, 2]"


@pytest.fixture
def schema_file(tmp_path):
    schema = {"type": "object", "required": ["name", "age"],
              "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}}}
    path = tmp_path / "person.schema.json"
    path.write_text(json.dumps(schema))
    return path


def test_json_schema_validity_and_field_accuracy(schema_file):
    m = parse_metric(f"json_schema:{schema_file}")
    ref = json.dumps({"name": "Ada", "age": 36, "city": "London"})
    assert m.score('{"name": "Ada", "age": 36}', ref) == 1.0
    assert m.score('{"name": "Ada", "age": -1}', ref) == 0.0
    assert m.score('{"name": "Ada"}', ref) == 0.0
    assert m.score("not json", ref) == 0.0
    d = m.details('{"name": "Ada", "age": 35}', ref)
    assert d["valid"] is True and d["error"] is None
    assert d["field_accuracy"] == pytest.approx(1 / 3)  # name right; age wrong; city missing
    bad = m.details('{"name": "Ada", "age": "old"}', ref)
    assert bad["valid"] is False and "integer" in bad["error"]
    assert m.details("[]", ref)["field_accuracy"] == 0.0
    assert m.details('{"name": "Ada", "age": 1}', "not an object")["field_accuracy"] is None


def test_field_accuracy_by_hand():
    assert field_accuracy({"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 5, "d": 4, "c": 3}) == 0.5
    assert field_accuracy({"a": [1, 2]}, {"a": [1, 2]}) == 1.0
    assert field_accuracy({}, {}) is None


def test_json_schema_file_errors(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"type": "object",')
    with pytest.raises(TunesmithError, match="broken.json"):
        parse_metric(f"json_schema:{broken}")
    invalid = tmp_path / "invalid.json"
    invalid.write_text(json.dumps({"type": "objekt"}))
    with pytest.raises(TunesmithError, match="invalid JSON schema in .*invalid.json"):
        parse_metric(f"json_schema:{invalid}")
    with pytest.raises(TunesmithError, match="not found: .*missing.json"):
        parse_metric(f"json_schema:{tmp_path / 'missing.json'}")


def test_loss_metric():
    m = parse_metric("loss")
    assert (m.binary, m.higher_is_better, m.needs_logprobs, m.unit) == (False, False, True, "nats")
    assert m.score_nll(1.25) == 1.25
    with pytest.raises(TunesmithError, match="NLL"):
        m.score_nll(float("nan"))
    with pytest.raises(TypeError, match="log-probs"):
        m.score("x", "y")


@pytest.mark.parametrize("spec", ["bleu", "exact:1", "loss:x", "json_schema:", "Exact"])
def test_bad_specs_list_the_valid_ones(spec):
    with pytest.raises(TunesmithError) as err:
        parse_metric(spec)
    assert all(valid in str(err.value) for valid in METRIC_SPECS)


def test_length_mismatch():
    with pytest.raises(TunesmithError, match="2 predictions but 1 references"):
        score_all(parse_metric("exact"), ["a", "b"], ["a"])
