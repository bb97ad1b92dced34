"""GRPO's reward functions by hand, the judge reward over loopback HTTP, the errors a bad reward gives, and
prompt data (every format with a prompt, references, columns)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tunesmith.config import RewardConfig, parse_config
from tunesmith.data.load import read_dataset
from tunesmith.data.render import TokenizedPrompt
from tunesmith.data.types import Message, Prompt, Source
from tunesmith.errors import ConfigError, DataError, TunesmithError
from tunesmith.methods.rewards import Answer, build_rewards, missing_references, parse_score, score_answers

SCHEMA = {"type": "object", "properties": {"intent": {"type": "string"}}, "required": ["intent"],
          "additionalProperties": False}


def answer(text, reference=None, tokens=5, stopped=True, **fields):
    ex = Prompt((Message("user", "q"),), reference, fields, Source("train.jsonl", 7))
    return Answer(text, TokenizedPrompt((1, 2), ex), tokens, stopped)


def scores(specs, answers, max_new_tokens=10):
    rewards = build_rewards([RewardConfig(reward=s) if isinstance(s, str) else s for s in specs], max_new_tokens)
    return score_answers(rewards, answers)


def test_builtin_rewards_by_hand(tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(["card_arrival", "exchange_rate"]))
    a = [answer('{"intent": "card_arrival"}', "card_arrival"), answer("```json\n{\"intent\": 3}\n```", "x"),
         answer("Card_Arrival.", "card_arrival"), answer("not json", "exchange rate")]
    got = scores([f"json_schema:{schema}", "exact", f"choice:{labels}", "f1"], a)
    assert got[0] == [1.0, 0.0, 0.0, 0.0]  # only the first validates (the second parses, wrong type)
    assert got[1] == [0.0, 0.0, 1.0, 0.0]  # normalised: case, trailing dot
    assert got[2] == [0.0, 0.0, 1.0, 0.0]  # a listed label and the reference
    assert got[3][3] == pytest.approx(0.0) and got[3][2] == 1.0
    assert scores(["f1"], [answer("the exchange rate today", "exchange rate")])[0][0] == pytest.approx(0.8)


def test_regex_length_and_think_rewards():
    pattern = r'\{"intent": "(?P<answer>[a-z_]+)"\}'
    a = [answer('{"intent": "card_arrival"}', "card_arrival"), answer('{"intent": "top_up"}', "card_arrival")]
    assert scores([f"regex:{pattern}"], a)[0] == [1.0, 0.0]  # the group must equal the reference
    assert scores([r"regex:\{.*\}"], a)[0] == [1.0, 1.0]  # format only without an `answer` group
    lengths = [answer("x", tokens=4), answer("x", tokens=7), answer("x", tokens=10), answer("x", stopped=False)]
    assert scores(["length:4"], lengths)[0] == [0.0, -0.5, -1.0, -1.0]  # 0 to N, then linear to the limit
    think = [answer("<think>so: 4</think> 4", "4"), answer("4", "4"), answer("<think>hmm</think>", "4")]
    got = scores(["think", "exact"], think)
    assert got[0] == [1.0, 0.0, 0.0]  # a think block and then an answer
    assert got[1] == [1.0, 1.0, 0.0]  # exact looks at the answer after </think>


def test_python_reward_sees_prediction_reference_and_example(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def score(prediction, reference, example):\n"
        "    return float(prediction == example['answer_column']) + 0.5 * (reference is None)\n"
        "def bad(prediction, reference, example):\n    return 'yes'\n"
        "def boom(prediction, reference, example):\n    raise ValueError('no ' + prediction)\n")
    a = [answer("42", None, answer_column="42"), answer("41", "x", answer_column="42")]
    assert scores([f"python:{tmp_path / 'my_rewards.py'}:score"], a)[0] == [1.5, 0.0]
    monkeypatch.syspath_prepend(str(tmp_path))
    assert scores(["python:my_rewards:score"], a)[0] == [1.5, 0.0]  # a module name works as well
    with pytest.raises(TunesmithError, match=r"python:my_rewards:bad\) returned 'yes'.*train\.jsonl:7"):
        scores(["python:my_rewards:bad"], a)
    with pytest.raises(TunesmithError, match=r"raised ValueError: no 42 on the answer '42'.*train\.jsonl:7"):
        scores(["python:my_rewards:boom"], a)
    with pytest.raises(TunesmithError, match="cannot import nowhere_module"):
        scores(["python:nowhere_module:score"], a)
    with pytest.raises(TunesmithError, match="has no function 'missing'"):
        scores(["python:my_rewards:missing"], a)


def test_reference_column_and_missing_references():
    rewards = build_rewards([RewardConfig(reward="exact", reference="label")], 10)
    a = [answer("b", "a", label="b")]
    assert score_answers(rewards, a) == [[1.0]]  # the named column, not the example's answer
    prompts = [answer("", "a").prompt, answer("", None).prompt]
    assert "no reference answer" in missing_references(build_rewards([RewardConfig(reward="exact")], 10), prompts)
    assert missing_references(build_rewards([RewardConfig(reward="f1", reference="label")], 10),
                              [answer("", None, label="x").prompt]) is None


class _Grader(BaseHTTPRequestHandler):
    asked: list = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        question = body["messages"][0]["content"]
        type(self).asked.append(question)
        reply = "Score: 7" if "[Response]\ngood" in question else "no idea"
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_judge_reward_over_http():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Grader)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1#grader"
        rewards = build_rewards([RewardConfig(reward=f"judge:{url}")], 10)
        got = score_answers(rewards, [answer("good", "the reference"), answer("bad")])
    finally:
        server.shutdown()
        server.server_close()
    assert got == [[0.7, 0.0]] and rewards[0].unreadable == 1  # unreadable replies score 0 and are counted
    asked = {q.rsplit("[Response]\n", 1)[1].split("\n")[0]: q for q in _Grader.asked}  # requests run concurrently
    assert "[Reference answer]\nthe reference" in asked["good"] and "Reference" not in asked["bad"]
    assert parse_score("I'd give it 10/10") == 1.0 and parse_score("8.5") == 0.85 and parse_score("eleven") is None


class _Flaky(_Grader):
    asked: list = []
    failures = 1  # the first request gets HTTP 503, as an overloaded server answers

    def do_POST(self):
        if type(self).failures:
            type(self).failures -= 1
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_POST()


def test_judge_reward_retries_like_the_eval_judge():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1#grader"
        rewards = build_rewards([RewardConfig(reward=f"judge:{url}")], 10)
        rewards[0].endpoint.retry_wait = 0.01
        assert score_answers(rewards, [answer("good")]) == [[0.7]] and _Flaky.failures == 0
    finally:
        server.shutdown()
        server.server_close()


def grpo_raw(**method_args):
    return {"method": "grpo", "data": {"train": "x.jsonl"}, "method_args": method_args}


def test_config_problems_are_listed_with_their_paths():
    with pytest.raises(ConfigError) as e:
        parse_config(grpo_raw(rewards=["exakt", "length:ten", "python:nofunction", {"reward": "json_schema"}],
                              group_size=1))
    text = str(e.value)
    for where in ("method_args.rewards[0]: unknown reward 'exakt'", "method_args.rewards[1]",
                  "method_args.rewards[2]: python:nofunction names no function",
                  "method_args.rewards[3]: 'json_schema' needs FILE", "method_args.group_size"):
        assert where in text
    with pytest.raises(ConfigError, match="grpo needs at least one reward"):
        parse_config(grpo_raw())
    with pytest.raises(ConfigError, match="beta 0 removes dpo's objective"):
        parse_config({"method": "dpo", "data": {"train": "x.jsonl"}, "method_args": {"beta": 0}})
    with pytest.raises(ConfigError, match="group_size does not apply to sft"):
        parse_config({"data": {"train": "x.jsonl"}, "method_args": {"group_size": 4}})
    cfg = parse_config(grpo_raw(rewards=["exact", {"reward": "f1", "weight": 0.5}], beta=0))
    assert [(r.reward, r.weight) for r in cfg.method_args.rewards] == [("exact", 1.0), ("f1", 0.5)]


def test_reward_files_are_relative_to_the_config(tmp_path):
    from tunesmith.config import load_config

    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    (tmp_path / "rw.py").write_text("def f(p, r, e):\n    return 1.0\n")
    (tmp_path / "c.yaml").write_text("method: grpo\ndata: {train: x.jsonl}\nmethod_args:\n  rewards: "
                                     "[json_schema:schema.json, {reward: 'python:rw.py:f', weight: 2}]\n")
    got = [r.reward for r in load_config(tmp_path / "c.yaml").method_args.rewards]
    assert got == [f"json_schema:{tmp_path / 'schema.json'}", f"python:{tmp_path / 'rw.py'}:f"]


def test_prompt_data_from_every_format(tmp_path):
    def rows(name, *items):
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in items))
        return str(path)

    only = rows("p.jsonl", {"prompt": "2+2?", "reference": "4", "level": 1},
                {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "3+3?"}],
                 "reference": {"answer": 6}})
    ds = read_dataset(only)
    assert ds.kind == "prompt" and ds.format == "prompt"
    assert [e.reference for e in ds.examples] == ["4", '{"answer": 6}']  # JSON references as their JSON text
    assert ds.examples[0].fields == {"reference": "4", "level": 1} and len(ds.examples[1].prompt) == 2
    conv = rows("m.jsonl", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}]},
                {"messages": [{"role": "user", "content": "open"}], "reference": "r"})
    got = read_dataset(conv, kind="prompt").examples
    assert [(e.prompt[-1].content, e.reference) for e in got] == [("hi", "a"), ("open", "r")]
    pairs = rows("pairs.jsonl", {"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert read_dataset(pairs, kind="prompt").examples[0].reference == "good"
    kto = rows("kto.jsonl", {"prompt": "q", "completion": "meh", "label": False})
    assert read_dataset(kto, kind="prompt").examples[0].reference is None  # an undesirable answer is no reference
    with pytest.raises(DataError, match=r"a\.jsonl:1.*starts with the assistant"):
        read_dataset(rows("a.jsonl", {"messages": [{"role": "assistant", "content": "x"}]}), kind="prompt")
    with pytest.raises(DataError, match=r"b\.jsonl:1.*last turn is 'assistant'"):
        read_dataset(rows("b.jsonl", {"prompt": [{"role": "user", "content": "q"},
                                                 {"role": "assistant", "content": "a"}]}), kind="prompt")
