import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tunesmith.errors import TunesmithError
from tunesmith.eval.judge import (
    LocalJudge,
    OpenAIJudge,
    build_judge_prompt,
    chat_completions_url,
    judge_from_url,
    judge_pairs,
    parse_verdict,
)

TIMEOUT = 5.0  # every HTTP call in this file is bounded by this (or less)


@pytest.mark.parametrize("text, expected", [
    ("A", "A"), ("b", "B"), ("**B**", "B"), ("Tie.", "tie"), ("[[A]]", "A"), ("Response B", "B"),
    ("Final verdict: B", "B"), ("The better response is A.", "A"), ("I prefer B because it is right.", "B"),
    ("A. It answers the question.", "A"), ("B is better", "B"), ("So A is better than B.", "A"),
    ("Response A is better than Response B.", "A"), ("It is a tie.", "tie"), ("A tie", "tie"),
    ("Both are equally good", "tie"), ("Answer: a tie", "tie"),
    ("hmm", None), ("", None), ("A and B both", None), ("The verdict is a close call, but B", None),
])
def test_parse_verdict(text, expected):
    assert parse_verdict(text) == expected


def _responses(judge_prompt):
    first = judge_prompt.split("[Response A]\n", 1)[1].split("\n\n[Response B]\n", 1)[0]
    second = judge_prompt.split("\n\n[Response B]\n", 1)[1].split("\n\nReply with", 1)[0]
    return first, second


def prefers_longer(judge_prompt):
    first, second = _responses(judge_prompt)
    return "A" if len(first) > len(second) else "B" if len(second) > len(first) else "tie"


def test_build_judge_prompt_roundtrip():
    assert _responses(build_judge_prompt("q", "one\n\ntwo", "three")) == ("one\n\ntwo", "three")


def test_judge_pairs_both_orders_with_local_judge():
    prompts = ["p1", "p2", "p3", "p4"]
    a = ["long answer", "x", "same", "eq"]
    b = ["short", "much longer", "same", "qe"]
    seen = []

    def generate(batch):
        seen.extend(batch)
        return [prefers_longer(q) for q in batch]

    result = judge_pairs(LocalJudge(generate), prompts, a, b)
    assert result.outcomes == ["win", "loss", "tie", "tie"]
    assert (result.wins, result.ties, result.losses, result.n) == (1, 2, 1, 4)
    assert (result.unparseable, result.inconsistent) == (0, 0)
    assert len(seen) == 6  # identical outputs ("same") are not sent to the judge
    assert _responses(seen[0]) == ("long answer", "short") and _responses(seen[1]) == ("short", "long answer")
    assert result.win_rate == result.loss_rate == 0.25 and result.tie_rate == 0.5


def test_always_a_judge_is_all_ties_after_order_swap():
    result = judge_pairs(LocalJudge(lambda qs: ["A"] * len(qs)), ["p"] * 5, ["x", "y", "z", "w", "v"],
                         ["1", "2", "3", "4", "5"])
    assert result.outcomes == ["tie"] * 5
    assert result.inconsistent == 5 and result.p_value == 1.0


def test_unparseable_answers_count_as_ties():
    answers = iter(["A", "garbled", "B", "B", "???", "???"])
    result = judge_pairs(LocalJudge(lambda qs: [next(answers) for _ in qs]), ["p"] * 3, ["a", "b", "c"],
                         ["d", "e", "f"])
    # example 0: a-first says A (prefers a), b-first unreadable -> tie; example 1: B then B -> b, a -> tie
    assert result.outcomes == ["tie", "tie", "tie"]
    assert result.unparseable == 3 and result.inconsistent == 1
    assert "3 unreadable answers" in result.summary("tuned", "base")


def test_sign_test_p_value_and_summary():
    result = judge_pairs(LocalJudge(lambda qs: [prefers_longer(q) for q in qs]), ["p"] * 10,
                         ["longer one"] * 9 + ["s"], ["short"] * 10)
    assert (result.wins, result.losses) == (9, 1)
    assert result.p_value == pytest.approx(22 / 1024)  # two-sided binomial: 2 * (1 + 10) / 2**10
    assert result.summary("runs/x", "base").startswith("runs/x vs base (judge, both orders): 90% win / 0% tie")


def test_local_judge_and_judge_pairs_validate_lengths():
    with pytest.raises(TunesmithError, match="returned 1 answers for 2"):
        LocalJudge(lambda qs: ["A"]).ask(["q1", "q2"])
    with pytest.raises(TunesmithError, match="every candidate must answer every prompt"):
        judge_pairs(LocalJudge(lambda qs: qs), ["p"], ["a", "b"], ["c"])


@pytest.mark.parametrize("url, expected", [
    ("http://h:1", "http://h:1/v1/chat/completions"),
    ("http://h:1/", "http://h:1/v1/chat/completions"),
    ("http://h:1/v1", "http://h:1/v1/chat/completions"),
    ("https://x.org/openai/deployments/chat/completions", "https://x.org/openai/deployments/chat/completions"),
])
def test_chat_completions_url(url, expected):
    assert chat_completions_url(url) == expected


def test_judge_from_url():
    judge = judge_from_url("http://127.0.0.1:9/v1#my-judge", api_key="k")
    assert (judge.url, judge.model, judge.api_key) == ("http://127.0.0.1:9/v1/chat/completions", "my-judge", "k")
    with pytest.raises(TunesmithError, match="names no model"):
        judge_from_url("http://127.0.0.1:9/v1")
    with pytest.raises(TunesmithError, match="http"):
        OpenAIJudge("localhost:8000", "m")


class _FakeOpenAI(BaseHTTPRequestHandler):
    """A tiny OpenAI chat-completions server; behaviour is chosen by the model name."""

    requests: list = []
    failures_left = {"flaky": 1}

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        model = body["model"]
        if model == "missing":
            return self._send(404, {"error": {"message": "model 'missing' not found"}})
        if model == "flaky" and self.failures_left["flaky"] > 0:
            self.failures_left["flaky"] -= 1
            return self._send(503, {"error": {"message": "overloaded"}})
        if model == "slow":
            time.sleep(1.0)
        if model == "broken":
            return self._send(200, {"unexpected": True})
        prompt = body["messages"][-1]["content"]
        answer = "A" if model == "always-a" else f"Final verdict: {prefers_longer(prompt)}"
        self._send(200, {"id": "x", "object": "chat.completion", "model": model,
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                                      "finish_reason": "stop"}]})

    def _send(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # the "slow" model's client hangs up before the reply; that is the point of the test


@pytest.fixture
def server():
    _FakeOpenAI.requests = []
    _FakeOpenAI.failures_left = {"flaky": 1}
    httpd = _QuietServer(("127.0.0.1", 0), _FakeOpenAI)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=TIMEOUT)


def test_openai_judge_over_http(server):
    judge = OpenAIJudge(server, "longer", api_key="secret", timeout=TIMEOUT)
    result = judge_pairs(judge, ["q1", "q2", "q3"], ["a much longer answer", "b", "c"], ["short", "bb", "c"])
    assert result.outcomes == ["win", "loss", "tie"]
    assert len(_FakeOpenAI.requests) == 4
    request = _FakeOpenAI.requests[0]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer secret"
    assert request["body"]["model"] == "longer" and request["body"]["temperature"] == 0
    assert request["body"]["messages"][0]["role"] == "user"


def test_openai_judge_always_a_exposes_position_bias(server):
    judge = OpenAIJudge(server + "/v1/chat/completions", "always-a", timeout=TIMEOUT)
    result = judge_pairs(judge, ["q"] * 4, ["w", "xx", "yyy", "zzzz"], ["1", "2", "3", "4"])
    assert result.outcomes == ["tie"] * 4 and result.inconsistent == 4
    assert {r["auth"] for r in _FakeOpenAI.requests} == {None}


def test_openai_judge_retries_server_errors(server):
    judge = OpenAIJudge(server, "flaky", timeout=TIMEOUT, concurrency=1, retry_wait=0.01)
    assert judge.ask_one(build_judge_prompt("q", "long one", "s")) == "Final verdict: A"
    assert len(_FakeOpenAI.requests) == 2


def test_openai_judge_errors_name_the_url(server):
    with pytest.raises(TunesmithError, match=r"127\.0\.0\.1.*HTTP 404.*not found"):
        OpenAIJudge(server, "missing", timeout=TIMEOUT).ask(["q"])
    with pytest.raises(TunesmithError, match=r"127\.0\.0\.1.*not a chat completion"):
        OpenAIJudge(server, "broken", timeout=TIMEOUT, retry_wait=0.01).ask(["q"])  # retried, then an error
    with pytest.raises(TunesmithError, match=r"127\.0\.0\.1.*cannot reach"):
        OpenAIJudge(server, "slow", timeout=0.2, retries=0).ask(["q"])


def test_openai_judge_connection_refused():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    judge = OpenAIJudge(f"http://127.0.0.1:{port}", "m", timeout=TIMEOUT, retries=1, retry_wait=0.01)
    with pytest.raises(TunesmithError, match=rf"127\.0\.0\.1:{port}/v1/chat/completions failed: cannot reach"):
        judge.ask(["q"])
