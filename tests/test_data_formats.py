"""Format detection and normalisation into canonical examples; bad rows; skip_invalid; load_data."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from tunesmith.config import DataConfig
from tunesmith.data.formats import common_system_prompt, hh_messages
from tunesmith.data.load import load_data, load_examples, prompt_key, split_eval, write_rejects
from tunesmith.data.types import Conversation, Document, Message, Preference, Source, Unpaired
from tunesmith.errors import DataError, TunesmithError

FIX = Path(__file__).parent / "fixtures" / "data"
U, A, S, T = "user", "assistant", "system", "tool"


def msgs(*pairs, untrained=()):
    return tuple(Message(r, c, i not in untrained) for i, (r, c) in enumerate(pairs))


def hh_rlhf_file() -> Path:
    """The real Anthropic hh-rlhf harmless test split, as the repository ships it in examples/."""
    return Path(__file__).parent.parent / "examples" / "hh-rlhf" / "harmless-test.jsonl.gz"


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- each format, from fixture files ----------------------------------------------------------------------

def test_messages_format():
    ds = load_examples(str(FIX / "messages.jsonl"))
    assert (ds.format, ds.kind) == ("messages", "sft")
    assert ds.examples == [
        Conversation(msgs((S, "You are terse."), (U, "What is 2+2?"), (A, "4")), Source(str(FIX / "messages.jsonl"), 1)),
        Conversation(msgs((U, "Name a colour."), (A, "Blue."), (U, "Another one."), (A, "Green."), untrained={1}),
                     Source(str(FIX / "messages.jsonl"), 2)),
        Conversation(msgs((U, "Weather in Paris?"), (A, "Let me check."), (T, '{"temp": 18}'),
                          (A, "It is 18 degrees.")), Source(str(FIX / "messages.jsonl"), 3)),
    ]


def test_gzip_file_gives_the_same_examples_with_its_own_provenance():
    plain = load_examples(str(FIX / "messages.jsonl")).examples
    packed = load_examples(str(FIX / "messages.jsonl.gz")).examples
    assert [e.messages for e in packed] == [e.messages for e in plain]
    assert packed[2].source == Source(str(FIX / "messages.jsonl.gz"), 3)


def test_sharegpt_format_maps_speakers_and_top_level_system():
    ds = load_examples(str(FIX / "sharegpt.jsonl"))
    assert ds.format == "sharegpt"
    assert [e.messages for e in ds.examples] == [
        msgs((S, "Be kind."), (U, "Hi"), (A, "Hello!")),
        msgs((S, "You call tools."), (U, "Time?"), (A, '{"name": "now"}'), (T, "12:00"), (A, "It is noon.")),
    ]


@pytest.mark.parametrize("name", ["alpaca.json", "alpaca_data.json"])
def test_alpaca_format(name):
    ds = load_examples(str(FIX / name))
    assert ds.format == "alpaca"
    assert [e.messages for e in ds.examples] == [
        msgs((U, "Translate to French.\n\ncat"), (A, "chat")),
        msgs((S, "Be brief."), (U, "Say hi."), (A, "Hi!")),
    ]
    assert [e.source.line for e in ds.examples] == [0, 1]


def test_prompt_completion_strings_and_message_lists():
    ds = load_examples(str(FIX / "prompt_completion.jsonl"))
    assert ds.format == "prompt_completion"
    assert [e.messages for e in ds.examples] == [
        msgs((U, "Capital of France?"), (A, "Paris.")),
        msgs((S, "Answer in one word."), (U, "Capital of Italy?"), (A, "Rome.")),
    ]


def test_prompt_completion_never_trains_assistant_turns_inside_the_prompt(tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": [{"role": "user", "content": "a"},
                                                           {"role": "assistant", "content": "b"},
                                                           {"role": "user", "content": "c"}],
                                                "completion": "d"}])
    assert load_examples(str(path)).examples[0].messages == msgs((U, "a"), (A, "b"), (U, "c"), (A, "d"),
                                                                 untrained={1})


def test_csv_with_column_mapping_is_prompt_completion():
    ds = load_examples(str(FIX / "qa.csv"), columns={"prompt": "question", "completion": "answer"})
    assert ds.format == "prompt_completion"
    assert ds.examples[1] == Conversation(msgs((U, "Multi-line, with comma?"), (A, "Line one,\nline two.")),
                                          Source(str(FIX / "qa.csv"), 2))


def test_parquet_file_normalises(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(4)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    ds = load_examples(str(tmp_path / "a.parquet"))
    assert ds.format == "alpaca" and len(ds.examples) == 4
    assert ds.examples[3].messages == msgs((U, "Say 3."), (A, "3"))


def test_folder_input_concatenates_files_in_order():
    ds = load_examples(str(FIX / "folder"))
    assert len(ds.examples) == 2 and ds.format == "messages"
    assert [Path(f).name for f in ds.files] == ["part1.jsonl", "part2.jsonl.gz"]


def test_explicit_preference_strings_lists_and_repeated_prompt():
    ds = load_examples(str(FIX / "preference.jsonl"))
    assert (ds.format, ds.kind) == ("preference", "preference")
    e = ds.examples
    assert e[0].prompt == msgs((U, "Tell me a joke.")) and e[0].rejected == msgs((A, "No."))
    assert e[1].chosen == msgs((A, "It makes things wet; whether it is wet itself is debated."))
    assert (e[2].prompt, e[2].chosen, e[2].rejected) == (msgs((U, "2+2?")), msgs((A, "4")), msgs((A, "5")))


def test_implicit_preference_splits_at_the_longest_shared_prefix():
    ds = load_examples(str(FIX / "preference_implicit.jsonl"))
    assert ds.format == "preference_implicit"
    first, second = ds.examples
    assert (first.prompt, first.chosen, first.rejected) == (msgs((U, "Hi")), msgs((A, "Hello! How can I help?")),
                                                            msgs((A, "What.")))
    assert second.prompt == msgs((S, "Be nice."), (U, "Rate my poem."), (A, "Send it over."), (U, "Roses are red."))
    assert (second.chosen, second.rejected) == (msgs((A, "A classic opening!")), msgs((A, "Boring.")))


def test_kto_format():
    ds = load_examples(str(FIX / "kto.jsonl"))
    assert (ds.format, ds.kind) == ("kto", "unpaired")
    assert ds.examples[1] == Unpaired(msgs((U, "Summarise: the dog ran.")), msgs((A, "Cats are great.")), False,
                                      Source(str(FIX / "kto.jsonl"), 2))
    assert [e.label for e in ds.examples] == [True, False, True]


def test_hh_rlhf_text_from_the_real_file(tmp_path):
    with gzip.open(hh_rlhf_file(), "rt", encoding="utf-8") as f:
        lines = [next(f) for _ in range(120)]
    path = tmp_path / "hh.jsonl"
    path.write_text("".join(lines))
    ds = load_examples(str(path), skip_invalid=True)
    assert ds.format == "hh_rlhf"
    # Line 87 of the real file has an empty Assistant turn; it is the only reject in these rows.
    assert [(s.line, r) for s, r in ds.rejected] == [(87, "chosen[3]: Assistant turn is empty or whitespace only")]
    assert len(ds.examples) == 119
    first = ds.examples[0]
    assert [m.role for m in first.prompt] == [U, A, U, A, U]
    assert first.prompt[0].content == "what are some pranks with a pen i can do?"
    assert first.chosen[0].content.startswith("No, sorry!  All of these involve a pen")
    assert first.rejected[0].content.startswith("There are lots of funny things you can do with pens")
    for example, line in zip(ds.examples, [x for i, x in enumerate(lines) if i != 86], strict=True):
        raw = json.loads(line)
        for side, reply in (("chosen", example.chosen), ("rejected", example.rejected)):
            rebuilt = "".join(f"\n\n{'Human' if m.role == U else 'Assistant'}: {m.content}"
                              for m in example.prompt + reply)
            assert " ".join(rebuilt.split()) == " ".join(raw[side].split())  # same turns, modulo whitespace


def test_hh_text_without_leading_newlines_and_bad_text():
    assert hh_messages("Human: hi\n\nAssistant: yo", "chosen") == msgs((U, "hi"), (A, "yo"))
    from tunesmith.data.formats import RowError

    with pytest.raises(RowError, match="no '"):
        hh_messages("just a reply", "chosen")
    with pytest.raises(RowError, match="text before the first"):
        hh_messages("preamble\n\nHuman: hi\n\nAssistant: yo", "chosen")


# --- detection over all rows -----------------------------------------------------------------------------

@pytest.mark.parametrize("name,fmt", [("messages.jsonl", "messages"), ("sharegpt.jsonl", "sharegpt"),
                                      ("alpaca.json", "alpaca"), ("prompt_completion.jsonl", "prompt_completion"),
                                      ("preference.jsonl", "preference"),
                                      ("preference_implicit.jsonl", "preference_implicit"), ("kto.jsonl", "kto")])
def test_auto_detection_and_declared_format_agree(name, fmt):
    auto = load_examples(str(FIX / name))
    declared = load_examples(str(FIX / name), format=fmt)
    assert auto.format == declared.format == fmt
    assert auto.examples == declared.examples


def test_mixed_file_lists_which_rows_look_like_which_format():
    path = str(FIX / "mixed.jsonl")
    with pytest.raises(DataError) as err:
        load_examples(path)
    text = str(err.value)
    assert f"messages: 3 rows ({path}:1, {path}:2, {path}:4)" in text
    assert f"alpaca: 2 rows ({path}:3, {path}:5)" in text
    assert err.value.total == 1


def test_mixed_file_with_skip_invalid_keeps_the_majority_format():
    ds = load_examples(str(FIX / "mixed.jsonl"), skip_invalid=True)
    assert ds.format == "messages" and len(ds.examples) == 3
    assert [(s.line, r) for s, r in ds.rejected] == [(3, "row looks like alpaca but most rows are messages"),
                                                     (5, "row looks like alpaca but most rows are messages")]


def test_detection_looks_past_the_first_row(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "p", "completion": "c"},
                                              {"prompt": "p", "completion": "c", "label": True},
                                              {"prompt": "q", "completion": "d", "label": False}])
    with pytest.raises(DataError, match="kto: 2 rows .*prompt_completion: 1 rows"):
        load_examples(str(path))


def test_rows_of_no_known_format(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as err:
        load_examples(str(path))
    assert err.value.problems[0].where == f"{path}:1"
    assert "cannot tell the data format from the keys (question, answer)" in err.value.problems[0].what
    assert "data.columns" in err.value.problems[0].hint


def test_empty_file_and_all_rows_rejected(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no rows found"):
        load_examples(str(tmp_path / "e.jsonl"))
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": []}])
    with pytest.raises(DataError, match="every row was rejected"):
        load_examples(str(path), skip_invalid=True)


# --- bad rows: each kind names file:line and the field ---------------------------------------------------

def m(role, content, **kw):
    return {"role": role, "content": content, **kw}


GOOD = {"messages": {"messages": [m(U, "q"), m(A, "a")]},
        "sharegpt": {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        "alpaca": {"instruction": "i", "output": "o"},
        "prompt_completion": {"prompt": "p", "completion": "c"},
        "preference": {"prompt": "p", "chosen": "c", "rejected": "r"},
        "preference_implicit": {"chosen": [m(U, "q"), m(A, "c")], "rejected": [m(U, "q"), m(A, "r")]},
        "hh_rlhf": {"chosen": "\n\nHuman: q\n\nAssistant: c", "rejected": "\n\nHuman: q\n\nAssistant: r"},
        "kto": {"prompt": "p", "completion": "c", "label": True}}

BAD_ROWS = [
    ("messages", {"messages": None}, "messages: missing", None),
    ("messages", {"messages": "hello"}, "messages: expected a list of messages, got a string", None),
    ("messages", {"messages": [m(U, "q"), m(A, "  \n")]}, "messages[1].content: is empty or whitespace only", None),
    ("messages", {"messages": [m(U, "q"), m("bot", "a")]}, "messages[1].role: unknown role 'bot'", "did you mean 'assistant'?"),
    ("messages", {"messages": [m(U, "q"), {"content": "a"}]}, "messages[1].role: missing", None),
    ("messages", {"messages": [m(U, "q"), m(A, 3)]}, "messages[1].content: expected a string, got int", None),
    ("messages", {"messages": [m(S, "s"), m(U, "q")]}, "messages: has no assistant turn", None),
    ("messages", {"messages": [m(U, "q"), m(A, "a"), m(U, "q2")]},
     "messages[2].role: last turn is 'user', not assistant", None),
    ("messages", {"messages": [m(U, "q"), m(A, "a", weight=0)]}, "every assistant turn has weight 0", None),
    ("messages", {"messages": [m(U, "q"), m(A, "a", weight=0.5)]}, "messages[1].weight: must be 0 or 1", None),
    ("messages", {"messages": [m(U, "q"), {"role": A, "content": None, "tool_calls": []}]},
     "messages[1].content: missing", None),
    ("messages", {"messages": [m(U, "q"), m(A, [{"type": "image_url"}])]},
     "messages[1].content[0]: only text content parts are supported", None),
    ("sharegpt", {"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]},
     "conversations[1].from: unknown speaker 'robot'", None),
    ("alpaca", {"instruction": "i"}, "output: missing", None),
    ("alpaca", {"instruction": "i", "input": 5, "output": "o"}, "input: expected a string, got int", None),
    ("prompt_completion", {"prompt": "p", "completion": [m(U, "x"), m(A, "y")]},
     "completion[0].role: a reply may only hold assistant turns, found 'user'", None),
    ("preference", {"prompt": "p", "chosen": "same", "rejected": "same"}, "chosen: identical to rejected", None),
    ("preference", {"prompt": "p", "chosen": "c"}, "rejected: missing", None),
    ("preference_implicit", {"chosen": [m(U, "q1"), m(A, "c")], "rejected": [m(U, "q2"), m(A, "r")]},
     "chosen: chosen and rejected share no leading messages", None),
    ("preference_implicit", {"chosen": [m(U, "q"), m(A, "a1"), m(U, "q2"), m(A, "c")],
                             "rejected": [m(U, "q"), m(A, "a2"), m(U, "q2"), m(A, "r")]},
     "chosen[2].role: a reply may only hold assistant turns, found 'user'", None),
    ("preference_implicit", {"chosen": [m(U, "q"), m(A, "c")], "rejected": [m(U, "q"), m(A, "c")]},
     "chosen: identical to rejected", None),
    ("hh_rlhf", {"chosen": "\n\nHuman: q\n\nAssistant: c", "rejected": "\n\nHuman: q\n\nAssistant:  "},
     "rejected[1]: Assistant turn is empty or whitespace only", None),
    ("kto", {"prompt": "p", "completion": "c", "label": "true"}, "label: must be a boolean, got a string 'true'",
     "no quotes"),
    ("kto", {"prompt": "p", "completion": "c", "label": 1}, "label: must be a boolean, got int 1", "not 1 / 0"),
]


@pytest.mark.parametrize("fmt,row,what,hint", BAD_ROWS, ids=[f"{f}-{w[:40]}" for f, _, w, _ in BAD_ROWS])
def test_bad_row_names_file_line_and_field(tmp_path, fmt, row, what, hint):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD[fmt], row])
    with pytest.raises(DataError) as err:
        load_examples(str(path), format=fmt)
    [problem] = err.value.problems
    assert problem.where == f"{path}:2"
    assert what in problem.what
    if hint:
        assert hint in problem.hint
    ds = load_examples(str(path), format=fmt, skip_invalid=True)
    assert len(ds.examples) == 1 and ds.rejected == [(Source(str(path), 2), problem.what)]


def test_kto_label_in_csv_gets_a_csv_specific_hint(tmp_path):
    (tmp_path / "k.csv").write_text("prompt,completion,label\np,c,true\n")
    with pytest.raises(DataError) as err:
        load_examples(str(tmp_path / "k.csv"))
    assert "CSV cells are text" in err.value.problems[0].hint


def test_invalid_json_and_bad_rows_are_reported_together_first_20_shown(tmp_path):
    lines = [json.dumps(GOOD["messages"])] + ["{broken"] * 12 + [json.dumps({"messages": []})] * 13
    path = tmp_path / "many.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        load_examples(str(path))
    assert err.value.total == 25
    assert "... and 5 more" in str(err.value)
    assert [p.where for p in err.value.problems[:2]] == [f"{path}:2", f"{path}:3"]
    ds = load_examples(str(path), skip_invalid=True)
    assert len(ds.examples) == 1 and len(ds.rejected) == 25


def test_write_rejects(tmp_path):
    ds = load_examples(str(FIX / "mixed.jsonl"), skip_invalid=True)
    assert write_rejects(ds, tmp_path / "run" / "rejects.jsonl") == 2
    records = [json.loads(x) for x in (tmp_path / "run" / "rejects.jsonl").read_text().splitlines()]
    assert records[0] == {"file": str(FIX / "mixed.jsonl"), "line": 3,
                          "reason": "row looks like alpaca but most rows are messages"}


# --- load_data: eval sets, splits, caps ------------------------------------------------------------------

def qa_rows(n, repeat_every=None):
    rows = []
    for i in range(n):
        q = f"question {i // repeat_every if repeat_every else i}"
        rows.append({"prompt": q, "completion": f"answer {i}"})
    return rows


def test_eval_split_is_seeded_deterministic_and_disjoint(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", qa_rows(50))
    cfg = DataConfig(train=str(path), eval_split=0.2)
    train, held = load_data(cfg, seed=1)
    again_train, again_held = load_data(cfg, seed=1)
    _, other_held = load_data(cfg, seed=2)
    assert len(held.examples) == 10 and len(train.examples) == 40
    assert held.examples == again_held.examples and train.examples == again_train.examples
    assert [e.source.line for e in other_held.examples] != [e.source.line for e in held.examples]
    assert {e.source.line for e in train.examples} | {e.source.line for e in held.examples} == set(range(1, 51))
    assert [e.source.line for e in held.examples] == sorted(e.source.line for e in held.examples)


def test_eval_split_keeps_rows_sharing_a_prompt_on_one_side(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", qa_rows(60, repeat_every=3))
    train, held = load_data(DataConfig(train=str(path), eval_split=0.25), seed=0)
    assert not {prompt_key(e) for e in train.examples} & {prompt_key(e) for e in held.examples}
    assert len(held.examples) == 15


def test_eval_split_of_one_prompt_is_a_clear_error(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", qa_rows(4, repeat_every=4))
    with pytest.raises(DataError, match="cannot split off an eval set"):
        split_eval(load_examples(str(path)), 0.5, seed=0)


def test_max_examples_is_a_seeded_sample_before_splitting(tmp_path):
    """A file sorted by class (like banking77's train file) must not train on its first few classes only."""
    rows = [{"prompt": f"question {c} {k}", "completion": f"class_{c}"} for c in range(10) for k in range(20)]
    path = write_jsonl(tmp_path / "sorted.jsonl", rows)
    train, held = load_data(DataConfig(train=str(path), max_examples=20), seed=0)
    lines = [e.source.line for e in train.examples]
    assert held is None and len(lines) == 20 and lines == sorted(lines) and len(set(lines)) == 20
    assert len({e.messages[-1].content for e in train.examples}) >= 6  # first-20 would give 1 class
    again, _ = load_data(DataConfig(train=str(path), max_examples=20), seed=0)
    other, _ = load_data(DataConfig(train=str(path), max_examples=20), seed=1)
    assert [e.source.line for e in again.examples] == lines
    assert [e.source.line for e in other.examples] != lines
    everything, _ = load_data(DataConfig(train=str(path), max_examples=500), seed=0)
    assert [e.source.line for e in everything.examples] == list(range(1, 201))
    train, held = load_data(DataConfig(train=str(path), max_examples=20, eval_split=0.2), seed=0)
    assert len(train.examples) + len(held.examples) == 20 and len(held.examples) == 4
    assert {e.source.line for e in train.examples + held.examples} == set(lines)


def test_eval_file_and_kind_mismatch():
    train, held = load_data(DataConfig(train=str(FIX / "messages.jsonl"), eval=str(FIX / "alpaca.json")), seed=0)
    assert (train.format, held.format, len(held.examples)) == ("messages", "alpaca", 2)
    with pytest.raises(TunesmithError, match="eval data is preference"):
        load_data(DataConfig(train=str(FIX / "messages.jsonl"), eval=str(FIX / "preference.jsonl")), seed=0)


def test_load_data_honours_columns_and_skip_invalid(tmp_path):
    train, _ = load_data(DataConfig(train=str(FIX / "qa.csv"), columns={"prompt": "question",
                                                                        "completion": "answer"}), seed=0)
    assert len(train.examples) == 2
    train, _ = load_data(DataConfig(train=str(FIX / "mixed.jsonl"), skip_invalid=True), seed=0)
    assert len(train.examples) == 3 and len(train.rejected) == 2
    assert isinstance(train.examples[0], Conversation) and not isinstance(train.examples[0], Preference)


# --- the system prompt every example shares ----------------------------------------------------------------

def test_common_system_prompt():
    def conv(system=None):
        head = (Message(S, system),) if system else ()
        return Conversation(head + (Message(U, "q"), Message(A, "a")))

    assert common_system_prompt([conv("Be brief."), conv("Be brief.")]) == "Be brief."
    assert common_system_prompt([conv("Be brief."), conv("Be kind.")]) is None
    assert common_system_prompt([conv("Be brief."), conv()]) is None  # one example trained without it
    assert common_system_prompt([conv("Be brief."), conv()], default="Be brief.") == "Be brief."  # data.system_prompt
    assert common_system_prompt([conv(), conv()], default="Be brief.") == "Be brief."
    assert common_system_prompt([conv(), conv()]) is None and common_system_prompt([]) is None
    pair = Preference(msgs((S, "Be brief."), (U, "q")), msgs((A, "a")), msgs((A, "b")))
    assert common_system_prompt([pair, conv("Be brief.")]) == "Be brief."
    assert common_system_prompt([Document("text")]) is None
    banking = load_examples(str(Path(__file__).parent.parent / "examples" / "banking77" / "test.jsonl")).examples
    assert common_system_prompt(banking) == banking[0].messages[0].content


# --- tool calling ---------------------------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}}}


def call(name="get_weather", arguments='{"city": "Paris"}', id="c1"):
    return {"id": id, "type": "function", "function": {"name": name, "arguments": arguments}}


def tool_row(*messages, tools=(WEATHER,)):
    row = {"messages": [m(U, "weather in Paris?"), *messages]}
    if tools is not None:
        row["tools"] = list(tools)
    return row


CALLED = {"role": A, "tool_calls": [call()]}
RESULT = {"role": T, "tool_call_id": "c1", "content": '{"temp": 21}'}
ANSWER = m(A, "It is 21 degrees.")


def test_tool_calls_results_and_definitions_are_parsed():
    from tunesmith.data.types import ToolCall

    conv = load_rows_as_examples([tool_row(CALLED, RESULT, ANSWER)])[0]
    first, called, result, answer = conv.messages
    assert first.tools == (WEATHER,) and conv.tools == (WEATHER,) and called.tools == ()
    assert called.content == "" and called.tool_calls == (ToolCall("get_weather", {"city": "Paris"}, "c1"),)
    assert called.as_dict() == {"role": A, "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    assert result.as_dict() == {"role": T, "content": '{"temp": 21}', "tool_call_id": "c1"}
    assert answer.as_dict() == {"role": A, "content": "It is 21 degrees."}  # no tool keys on plain messages
    # arguments as an object, a bare function as the tool, tools as JSON text, results as JSON values
    bare = {"name": "get_weather", "parameters": WEATHER["function"]["parameters"]}
    row = tool_row({"role": A, "tool_calls": [call(arguments={"city": "Oslo", "days": 2}, id=None)]},
                   {"role": T, "content": {"temp": -3}}, ANSWER, tools=None)
    row["tools"] = json.dumps([bare])
    conv = load_rows_as_examples([row])[0]
    assert conv.tools == (WEATHER,) and conv.messages[1].tool_calls[0].arguments == {"city": "Oslo", "days": 2}
    assert conv.messages[2].content == '{"temp": -3}'
    # older datasets write tool results as plain turns, without structured calls: still accepted
    plain = {"messages": [m(U, "q"), m(A, "calling"), m(T, "result"), m(A, "done")]}
    assert load_rows_as_examples([plain])[0].messages[2].role == T


def load_rows_as_examples(rows):
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return load_examples(str(write_jsonl(Path(tmp) / "rows.jsonl", rows))).examples


TOOL_BAD_ROWS = [
    (tool_row({"role": A, "tool_calls": [call(name="get_wether")]}, RESULT, ANSWER),
     "messages[1].tool_calls[0].function.name: calls 'get_wether', which the row's tools do not define",
     "defined functions: get_weather", "tool_unknown"),
    (tool_row({"role": A, "tool_calls": [call()]}, RESULT, ANSWER, tools=None),
     "messages[1].tool_calls[0].function.name: calls 'get_weather', which the row's tools do not define",
     "none (the row has no tools list)", "tool_unknown"),
    (tool_row({"role": A, "tool_calls": [call(arguments='{"city": "Paris",}')]}, RESULT, ANSWER),
     "messages[1].tool_calls[0].function.arguments: not valid JSON", None, "tool_arguments"),
    (tool_row({"role": A, "tool_calls": [call(arguments='["Paris"]')]}, RESULT, ANSWER),
     "messages[1].tool_calls[0].function.arguments: must be a JSON object, got list", None, "tool_arguments"),
    (tool_row({"role": A, "tool_calls": [call(arguments='{"days": 2}')]}, RESULT, ANSWER),
     "do not match the parameters of 'get_weather' at (arguments): 'city' is a required property", None,
     "tool_schema"),
    (tool_row({"role": A, "tool_calls": [call(arguments='{"city": "Paris", "days": "two"}')]}, RESULT, ANSWER),
     "at days: 'two' is not of type 'integer'", None, "tool_schema"),
    (tool_row(RESULT, ANSWER), "messages[1].tool_call_id: 'c1' answers no earlier unanswered call", None,
     "tool_result"),
    (tool_row({"role": T, "content": "21"}, ANSWER), "messages[1]: a tool result without a call before it", None,
     "tool_result"),
    (tool_row(CALLED, RESULT, dict(RESULT), ANSWER), "messages[3].tool_call_id: 'c1' answers no earlier unanswered "
     "call", None, "tool_result"),
    (tool_row(CALLED, dict(RESULT, name="get_time"), ANSWER), "messages[2].name: 'get_time' but the call it "
     "answers is 'get_weather'", None, "tool_result"),
    (tool_row(CALLED, RESULT, ANSWER, tools=[{"type": "function", "function": {"name": "f", "parameters":
                                                                              {"type": "objekt"}}}]),
     "tools[0].function.parameters: is not a valid JSON Schema", None, "tool_definition"),
    (tool_row(CALLED, RESULT, ANSWER, tools=[WEATHER, WEATHER]), "tools: defines 'get_weather' more than once", None,
     "tool_definition"),
    ({"messages": [{"role": U, "content": "q", "tool_calls": [call()]}, ANSWER], "tools": [WEATHER]},
     "messages[0].tool_calls: only assistant messages make tool calls, this one is 'user'", None, "tool_call"),
]


@pytest.mark.parametrize("row,what,hint,code", TOOL_BAD_ROWS, ids=[w[:50] for _, w, _, _ in TOOL_BAD_ROWS])
def test_bad_tool_rows_name_file_line_and_field_in_training_and_data_check(tmp_path, row, what, hint, code):
    from tunesmith.data.doctor import check_data

    path = write_jsonl(tmp_path / "d.jsonl", [tool_row(CALLED, RESULT, ANSWER), row])
    with pytest.raises(DataError) as err:
        load_examples(str(path))
    [problem] = err.value.problems
    assert problem.where == f"{path}:2" and what in problem.what, problem
    if hint:
        assert hint in problem.hint
    report = check_data(str(path))
    [finding] = report.errors
    assert finding.code == code and finding.rows == [f"{path}:2: {problem.what}"]


def test_tool_calls_in_preference_and_prompt_completion_rows():
    tools = [WEATHER]
    pair = {"prompt": [m(U, "weather in Paris?")], "tools": tools,
            "chosen": [{"role": A, "tool_calls": [call()]}], "rejected": [m(A, "I cannot know that.")]}
    bad = dict(pair, rejected=[{"role": A, "tool_calls": [call(name="nope")]}])
    pc = {"prompt": [m(U, "weather in Paris?")], "completion": [{"role": A, "tool_calls": [call()]}], "tools": tools}
    got = load_rows_as_examples([pair])[0]
    assert got.prompt[0].tools == (WEATHER,) and got.chosen[0].tool_calls[0].name == "get_weather"
    assert load_rows_as_examples([pc])[0].tools == (WEATHER,)
    with pytest.raises(DataError, match=r"rejected\[0\].tool_calls\[0\].function.name: calls 'nope'"):
        load_rows_as_examples([bad])


# --- documents ----------------------------------------------------------------------------------------------

def test_text_rows_and_files_are_documents(tmp_path):
    rows = write_jsonl(tmp_path / "d.jsonl", [{"text": "  First document.\n"}, {"text": "Second", "meta": 3}])
    ds = load_examples(str(rows))
    assert (ds.format, ds.kind) == ("text", "document")
    assert ds.examples == [Document("  First document.\n", Source(str(rows), 1)), Document("Second", Source(str(rows), 2))]
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.md").write_text("# A\n\nalpha")
    (folder / "b.txt").write_text("beta")
    assert [d.text for d in load_examples(str(folder)).examples] == ["# A\n\nalpha", "beta"]
    csv = tmp_path / "d.csv"
    csv.write_text("body,id\nhello there,1\n")
    assert load_examples(str(csv), columns={"text": "body"}).examples[0].text == "hello there"


def test_bad_documents_name_their_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "fine"}, {"text": "  \n "}, {"text": 3}])
    with pytest.raises(DataError) as err:
        load_examples(str(path))
    assert [(p.where, p.what) for p in err.value.problems] == [
        (f"{path}:2", "text: is empty or whitespace only"), (f"{path}:3", "text: expected a string, got int")]
    (tmp_path / "empty.md").write_text("\n\n")
    with pytest.raises(DataError, match=r"empty.md:1: text: is empty"):
        load_examples(str(tmp_path / "empty.md"))


def test_documents_split_off_an_eval_set_by_text():
    docs = [Document(f"document number {i} " * 3, Source("d", i)) for i in range(10)]
    docs.append(Document(docs[0].text.upper(), Source("d", 10)))  # the same text: stays on the same side
    from tunesmith.data.types import Dataset

    train, held = split_eval(Dataset(docs, "text", "document"), 0.3, seed=0)
    assert len(held.examples) >= 3 and len(train.examples) + len(held.examples) == 11
    held_keys = {prompt_key(d) for d in held.examples}
    assert not held_keys & {prompt_key(d) for d in train.examples}
