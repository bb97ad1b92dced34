"""The data doctor: planted problems are found with their rows, a clean dataset has no findings."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pytest

from tunesmith.data import dedup
from tunesmith.data.doctor import check_data, length_stats

FIX = Path(__file__).parent / "fixtures" / "data"
TRAIN, EVAL = str(FIX / "doctor_train.jsonl"), str(FIX / "doctor_eval.jsonl")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tiny import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def by_code(report):
    return {f.code: f for f in report.findings}


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_planted_problems_are_found_with_their_rows():
    report = check_data(TRAIN, eval_spec=EVAL)
    found = by_code(report)
    assert set(found) == {"exact_duplicates", "near_duplicates", "conflicts", "leakage", "near_leakage"}
    assert found["exact_duplicates"].rows == [f"{TRAIN}:1 = {TRAIN}:2"]
    assert found["near_duplicates"].rows == [f"{TRAIN}:3 ~ {TRAIN}:4"]
    assert found["conflicts"].rows == [f"{TRAIN}:3 vs {TRAIN}:4", f"{TRAIN}:5 vs {TRAIN}:6"]
    assert found["leakage"].rows == [f"{EVAL}:1 = {TRAIN}:7"]
    assert found["near_leakage"].rows == [f"{EVAL}:2 ~ {TRAIN}:8"]
    assert [f.code for f in report.errors] == ["leakage"]
    assert {f.code for f in report.warnings} == {"exact_duplicates", "near_duplicates", "conflicts", "near_leakage"}
    assert (report.format, report.kind, report.rows, report.examples, report.eval_examples) == \
        ("prompt_completion", "sft", 10, 10, 3)


def test_clean_data_has_no_findings(tokenizer):
    report = check_data(str(FIX / "doctor_clean.jsonl"), tokenizer=tokenizer,
                        eval_spec=str(FIX / "doctor_clean_eval.jsonl"))
    assert report.findings == []
    assert report.lengths is not None and report.lengths.count == 10


def test_token_lengths_match_the_chat_template_and_flag_long_rows(tokenizer):
    path = str(FIX / "doctor_clean.jsonl")
    rows = [json.loads(x) for x in Path(path).read_text().splitlines()]
    expected = [len(tokenizer(tokenizer.apply_chat_template(
        [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}],
        tokenize=False), add_special_tokens=False)["input_ids"]) for r in rows]
    limit = sorted(expected)[6]  # three rows are longer than this
    report = check_data(path, tokenizer=tokenizer, max_length=limit)
    s = report.lengths
    values = np.array(expected)
    assert (s.max, s.mean) == (values.max(), pytest.approx(values.mean()))
    for q, got in ((50, s.p50), (90, s.p90), (99, s.p99)):
        assert got == int(np.percentile(values, q, method="inverted_cdf"))
    assert sum(n for _, _, n in s.histogram) == 10
    too_long = by_code(report)["too_long"]
    assert too_long.level == "warning" and s.over_max_length == 3
    assert too_long.rows == [f"{path}:{i + 1}: {n} tokens" for i, n in enumerate(expected) if n > limit]


def test_rows_whose_targets_are_cut_off_entirely(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "word " * 200, "completion": "yes"},
                                              {"prompt": "short", "completion": "fine"}])
    found = by_code(check_data(path, tokenizer=tokenizer, max_length=64))
    assert found["nothing_trained"].rows == [f"{path}:1: no trained token within the right-truncated 64"]
    left = by_code(check_data(path, tokenizer=tokenizer, max_length=64, truncation="left"))
    assert "nothing_trained" not in left and left["too_long"].count == 1


def test_length_stats_by_hand():
    s = length_stats([1, 2, 3, 4, 100], max_length=50, bins=4)
    assert (s.p50, s.p90, s.p99, s.max, s.over_max_length) == (3, 100, 100, 100, 1)
    assert s.histogram == [(0, 25, 4), (26, 51, 0), (52, 77, 0), (78, 103, 1)]


def test_invalid_rows_are_reported_not_raised(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "   "}]},
        {"messages": [{"role": "user", "content": "q"}]},
    ])
    with open(path, "a") as f:
        f.write("{not json\n")
    report = check_data(path)
    found = by_code(report)
    assert report.invalid == 3 and report.examples == 1
    assert found["empty"].rows == [f"{path}:2: messages[1].content: is empty or whitespace only"]
    assert found["no_assistant"].rows == [f"{path}:3: messages: has no assistant turn"]
    assert found["unreadable"].rows[0].startswith(f"{path}:4: invalid JSON")
    assert all(f.level == "error" for f in (found["empty"], found["no_assistant"], found["unreadable"]))


def test_mixed_formats_are_an_error():
    report = check_data(str(FIX / "mixed.jsonl"))
    found = by_code(report)
    assert found["mixed_format"].level == "error" and "alpaca: 2 rows" in found["mixed_format"].message
    assert found["mixed_format"].rows == [f"{FIX / 'mixed.jsonl'}:{n}: row looks like alpaca but most rows are "
                                          "messages" for n in (3, 5)]
    assert report.examples == 3 and [f.code for f in report.findings] == ["mixed_format"]


def test_role_order_problems(tmp_path):
    u, a, s = ({"role": r, "content": f"{r} says {i}"} for i, r in enumerate(("user", "assistant", "system")))
    path = write_jsonl(tmp_path / "t.jsonl", [
        {"messages": [a, u, dict(a, content="x")]},
        {"messages": [u, s, dict(a, content="y")]},
        {"messages": [u, dict(u, content="again"), dict(a, content="z")]},
        {"messages": [s, u, dict(a, content="w")]},
    ])
    found = {f.message: f.rows for f in check_data(path).findings if f.code == "role_order"}
    assert found == {"1 example(s): assistant first": [f"{path}:1"],
                     "1 example(s): system not first": [f"{path}:2"],
                     "1 example(s): two user turns in a row": [f"{path}:3"]}


def test_class_balance_warns_on_rare_labels(tmp_path):
    rows = [{"prompt": f"card query {i}", "completion": "card_arrival"} for i in range(40)]
    rows += [{"prompt": f"top up query {i}", "completion": "top_up_failed"} for i in range(40)]
    rows += [{"prompt": "refund query 0", "completion": "refund_not_showing_up"}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    report = check_data(path)
    assert report.labels == {"card_arrival": 40, "top_up_failed": 40, "refund_not_showing_up": 1}
    [finding] = [f for f in report.findings if f.code == "class_balance"]
    assert finding.rows == [f"'refund_not_showing_up': 1 ({path}:81)"]
    assert "27.0" in finding.message  # mean examples per class = 81 / 3


def test_kto_label_balance(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}", "label": i < 10} for i in range(60)]
    report = check_data(write_jsonl(tmp_path / "t.jsonl", rows))
    assert report.labels == {"desirable": 10, "undesirable": 50}
    [finding] = [f for f in report.findings if f.code == "label_balance"]
    assert finding.count == 10 and "kto_desirable_weight: 5.0" in finding.hint
    balanced = [{"prompt": f"p{i}", "completion": f"c{i}", "label": i % 2 == 0} for i in range(20)]
    assert check_data(write_jsonl(tmp_path / "b.jsonl", balanced)).findings == []


def test_report_json_and_rendering(tokenizer):
    from rich.console import Console

    report = check_data(TRAIN, tokenizer=tokenizer, eval_spec=EVAL)
    data = json.loads(report.to_json())
    assert data["format"] == "prompt_completion" and data["lengths"]["count"] == 10
    assert {f["code"] for f in data["findings"]} == {f.code for f in report.findings}
    out = io.StringIO()
    report.render(Console(file=out, width=200, color_system=None))
    text = out.getvalue()
    assert "1 error(s), 4 warning(s)" in text and f"{EVAL}:1 = {TRAIN}:7" in text and "p50" in text


# --- near-duplicate machinery ----------------------------------------------------------------------------

def test_jaccard_and_shingles_by_hand():
    a = dedup.shingles("the cat sat on the mat")
    b = dedup.shingles("the cat sat on a mat")
    assert len(a) == 4 and len(b) == 4  # "the cat sat", "cat sat on", "sat on the|a", "on the|a mat"
    assert dedup.jaccard(a, b) == pytest.approx(2 / 6)
    assert dedup.shingles("Hi there") == dedup.shingles("hi   THERE") and len(dedup.shingles("hi there")) == 1


def test_minhash_agreement_estimates_jaccard():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(300)]
    base = [rng.choice(vocab) for _ in range(200)]
    texts, truth = [], []
    for k in (0, 10, 30, 60, 100):
        changed = list(base)
        for pos in rng.sample(range(200), k):
            changed[pos] = f"new{pos}"
        texts.append(" ".join(changed))
    sets = [dedup.shingles(t) for t in texts]
    sig = dedup.minhash_signatures([sets[0]] + sets)
    for i in range(len(sets)):
        truth = dedup.jaccard(sets[0], sets[i])
        estimate = float(np.mean(sig[0] == sig[i + 1]))
        assert abs(estimate - truth) < 0.15, (i, truth, estimate)


def test_near_duplicates_in_thousands_of_rows():
    rng = random.Random(1)
    vocab = [f"w{i}" for i in range(5000)]
    texts = [" ".join(rng.choice(vocab) for _ in range(40)) for _ in range(3000)]
    planted = []
    for i in range(0, 3000, 100):  # change one word of a 40-word text: Jaccard 35/41 ≈ 0.85
        words = texts[i].split()
        words[20] = "changed"
        texts.append(" ".join(words))
        planted.append((i, len(texts) - 1))
    pairs = dedup.near_duplicate_pairs(texts)
    assert [(i, j) for i, j, _ in pairs] == planted
    assert all(sim == pytest.approx(35 / 41) for _, _, sim in pairs)


# --- what differs between rows, and reports of large groups ----------------------------------------------

BOOKING_SYSTEM = ("You are the booking assistant of Trattoria Roma, an Italian restaurant in the old town. "
                  "The restaurant is open Tuesday to Sunday from noon to three and from six to eleven in the "
                  "evening. Tables seat two, four or six guests; larger groups need the private room, which must "
                  "be booked a week ahead. Always confirm the date, the time, the number of guests and the name "
                  "the booking is under, mention that a card is needed to hold groups of six or more, and answer "
                  "in one short, friendly paragraph without lists or headings.")
NAMES = ["Alice", "Bruno", "Chiara", "Dmitri", "Esther", "Farid", "Greta", "Hiro", "Ines", "Jonas"]
DAYS = ["Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def booking_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        name, day, guests, hour = NAMES[i % 10], DAYS[i % 6], 2 + i % 5, 6 + i % 5
        user = f"Hi, could {name} get a table for {guests} on {day} at {hour} pm? Reference {i * 7919 % 100003}."
        answer = f"Booked: {day}, {hour} pm, {guests} guests under {name}; your code is R{i * 104729 % 99991}."
        rows.append({"messages": [{"role": "system", "content": BOOKING_SYSTEM}, {"role": "user", "content": user},
                                  {"role": "assistant", "content": answer}]})
    return rows


def test_a_long_shared_system_prompt_does_not_make_rows_near_duplicates(tmp_path):
    rows = booking_rows(300)
    copy = json.loads(json.dumps(rows[10]))  # one real near duplicate: the same request, one word changed
    copy["messages"][1]["content"] = copy["messages"][1]["content"].replace("Hi,", "Hello,")
    path = write_jsonl(tmp_path / "t.jsonl", rows + [copy])
    found = by_code(check_data(path))
    assert found["near_duplicates"].rows == [f"{path}:11 ~ {path}:301"]
    assert "exact_duplicates" not in found


def test_large_groups_are_capped_on_the_console_and_complete_in_the_report(tmp_path):
    from rich.console import Console

    rows = [{"prompt": f"Write a limerick about a ginger cat called Tom who sat on a mat in the hall, number {i}",
             "completion": "There once was a ginger cat called Tom who sat on the mat in the hall all day long"}
            for i in range(12)]
    rows += [{"prompt": f"unrelated question {i} about {w}", "completion": f"answer {w} {i}"}
             for i, w in enumerate(["maps", "tides", "bread", "ferns", "clocks", "stars", "rivers", "salt"] * 2)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    report = check_data(path)
    near = by_code(report)["near_duplicates"]
    members = [f"{path}:{i}" for i in range(1, 13)]
    assert near.groups == [members]
    assert near.rows == [" ~ ".join(members[:5]) + " ~ ... and 7 more"]
    out = io.StringIO()
    report.render(Console(file=out, width=300, color_system=None))
    assert " ~ ... and 7 more" in out.getvalue() and f"{path}:12" not in out.getvalue()
    report.write(tmp_path / "report.json")
    full = json.loads((tmp_path / "report.json").read_text())
    [entry] = [f for f in full["findings"] if f["code"] == "near_duplicates"]
    assert entry["groups"] == [members] and full["warning_count"] == len(report.warnings)
    assert "groups" not in json.loads(report.to_json())["findings"][0]  # --json stays compact


def test_an_empty_file_is_an_error_as_it_is_for_training(tmp_path):
    from tunesmith.data.load import load_examples
    from tunesmith.errors import DataError

    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    report = check_data(str(path))
    [finding] = report.errors
    assert finding.code == "no_rows" and finding.message == f"{path}: no rows found"
    with pytest.raises(DataError) as err:
        load_examples(str(path))
    [problem] = err.value.problems
    assert (problem.where, problem.what, problem.hint) == (str(path), "no rows found", finding.hint)
    held = check_data(TRAIN, eval_spec=str(path))
    assert any(f.code == "no_rows" and f.message.startswith("eval data: ") for f in held.errors)
