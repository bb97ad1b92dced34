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


@pytest.mark.parametrize("prediction, reference, expected", [
    ("the card arrived", "card arrived", 1.0),  # articles and case are normalised away (SQuAD)
    ("my card has not arrived yet", "card not arrived", 2 * (3 / 6) * (3 / 3) / (3 / 6 + 3 / 3)),
    ("Paris, France.", "paris", 2 * 0.5 * 1.0 / 1.5),
    ("london", "paris", 0.0),
    ("", "", 1.0),
    ("", "paris", 0.0),
    ("x y y", "y y z", 2 * (2 / 3) * (2 / 3) / (4 / 3)),  # repeated tokens count with multiplicity
])
def test_f1_by_hand(prediction, reference, expected):
    metric = parse_metric("f1")
    assert metric.binary is False and metric.unit == "pts"
    assert metric.score(prediction, reference) == pytest.approx(expected)


def test_json_fields_per_example_and_per_field_by_hand():
    metric = parse_metric("json_fields")
    ref = '{"intent": "card_arrival", "urgent": false, "entities": {"card": "visa", "amount": 10}}'
    # 4 reference fields (intent, urgent, entities.card, entities.amount); the prediction gets intent and
    # entities.card right, urgent wrong, misses amount and adds an extra field: tp 2, fp 2, fn 2
    pred = '```json\n{"intent": "card_arrival", "urgent": true, "entities": {"card": "visa"}, "lang": "en"}\n```'
    assert metric.score(pred, ref) == pytest.approx(2 * 2 / (2 * 2 + 2 + 2))
    assert metric.score(ref, ref) == 1.0
    assert metric.score("not json", ref) == 0.0
    details = metric.details(pred, ref)
    assert details["parsed"] is True and details["fields"]["urgent"] == [0, 1, 1]
    from tunesmith.eval.metrics import per_field_scores

    fields = per_field_scores(metric, [pred, ref, "oops"], [ref, ref, ref])
    assert fields["intent"] == {"precision": 1.0, "recall": 2 / 3, "f1": 2 * 2 / (2 * 2 + 0 + 1), "support": 3}
    assert fields["urgent"]["precision"] == 0.5 and fields["urgent"]["recall"] == pytest.approx(1 / 3)
    assert fields["lang"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    with pytest.raises(TunesmithError, match="not a JSON object"):
        metric.score("{}", "card_arrival")


def test_python_metric_from_a_file_and_a_module(tmp_path, monkeypatch):
    grader = tmp_path / "grader.py"
    grader.write_text("def starts(prediction, reference, example):\n"
                      "    return float(prediction.startswith(reference))\n"
                      "def bad(prediction, reference, example):\n    return 2\n"
                      "def boom(prediction, reference, example):\n    raise ValueError('no')\n")
    metric = parse_metric(f"python:{grader}:starts")
    assert metric.binary is False and metric.unit == "pts"
    assert score_all(metric, ["card_arrival now", "x"], ["card", "card"]) == [1.0, 0.0]
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "mygrader.py").write_text("def g(p, r, ex):\n    SEEN.append(ex)\n    return 1\nSEEN = []\n")
    module_metric = parse_metric("python:mygrader:g")
    assert score_all(module_metric, ["a"], ["b"], examples=["the example"]) == [1.0]
    import mygrader

    assert mygrader.SEEN == ["the example"]  # the function gets the eval example too
    with pytest.raises(TunesmithError, match=r"(?s)returned 2 .*\[0, 1\]"):
        score_all(parse_metric(f"python:{grader}:bad"), ["a"], ["a"])
    with pytest.raises(TunesmithError, match="raised ValueError: no"):
        score_all(parse_metric(f"python:{grader}:boom"), ["a"], ["a"])
    with pytest.raises(TunesmithError, match="has no function nope"):
        parse_metric(f"python:{grader}:nope")
    with pytest.raises(TunesmithError, match="cannot import no_such_module"):
        parse_metric("python:no_such_module:f")
    with pytest.raises(TunesmithError, match="file not found"):
        parse_metric(f"python:{tmp_path / 'missing.py'}:f")
