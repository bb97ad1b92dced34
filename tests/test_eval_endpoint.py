"""The OpenAI-compatible endpoint client against a real HTTP server on loopback that can be made slow,
rate-limited (429 + Retry-After), down, or malformed; and an endpoint as an eval candidate, whose answers
survive a failure and are not asked again with --resume."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tunesmith.errors import TunesmithError
from tunesmith.eval.endpoint import ChatEndpoint, EndpointError, retry_after, split_endpoint

TIMEOUT = 5.0


class _Handler(BaseHTTPRequestHandler):
    """Behaviour per model name; `state` counts requests and holds the knobs of the test."""

    state: dict = {}

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        st = type(self).state
        with st["lock"]:
            st["requests"].append({"t": time.monotonic(), "body": body, "auth": self.headers.get("Authorization")})
            n = len(st["requests"])
        model = body["model"]
        question = body["messages"][-1]["content"]
        if model == "limited" and st.setdefault("limited_left", 2) > 0:
            st["limited_left"] -= 1
            return self._send(429, {"error": {"message": "slow down"}}, {"Retry-After": "1"})
        if model == "slow":
            time.sleep(1.0)
        if model == "malformed":
            return self._raw(200, b"{not json")
        if model == "dies" and n > st.get("die_after", 3):
            return self._send(503, {"error": {"message": "gone"}})
        if model == "denied":
            return self._send(401, {"error": {"message": "bad key"}})
        answer = st.get("answers", {}).get(question, f"echo: {question}")
        system = [m["content"] for m in body["messages"] if m["role"] == "system"]
        self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                                      "finish_reason": "length" if question == "long" else "stop"}],
                         "usage": {"prompt_tokens": 10 + len(question.split()), "completion_tokens": 3,
                                   "prompt_tokens_details": {"cached_tokens": 4 if system else 0}}})

    def _send(self, status, payload, headers=None):
        self._raw(status, json.dumps(payload).encode(), headers)

    def _raw(self, status, data, headers=None):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # clients that time out hang up on the slow model: that is the point


@pytest.fixture
def server():
    _Handler.state = {"lock": threading.Lock(), "requests": []}
    httpd = _Server(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=TIMEOUT)


def _client(url, model, **kw):
    kw.setdefault("timeout", TIMEOUT)
    kw.setdefault("retry_wait", 0.01)
    return ChatEndpoint(url, model, **kw)


def test_answers_with_usage_and_the_api_key(server):
    reply = _client(server, "m", api_key="sk-test").chat([{"role": "system", "content": "s"},
                                                          {"role": "user", "content": "hi there"}], 8)
    assert reply.text == "echo: hi there" and reply.hit_limit is False
    assert (reply.prompt_tokens, reply.completion_tokens, reply.cached_tokens) == (12, 3, 4)
    (request,) = _Handler.state["requests"]
    assert request["auth"] == "Bearer sk-test"
    assert request["body"]["temperature"] == 0 and request["body"]["max_tokens"] == 8
    assert _client(server, "m").chat([{"role": "user", "content": "long"}], 8).hit_limit is True


def test_429_waits_for_retry_after_then_succeeds(server):
    started = time.monotonic()
    reply = _client(server, "limited", retries=3).chat([{"role": "user", "content": "q"}], 4)
    assert reply.text == "echo: q"
    times = [r["t"] for r in _Handler.state["requests"]]
    assert len(times) == 3  # two 429s, then the answer
    assert times[1] - times[0] >= 0.95 and times[2] - times[1] >= 0.95  # Retry-After: 1 honoured
    assert time.monotonic() - started < 4


def test_rate_limit_spaces_requests(server):
    client = _client(server, "m", rate_limit=600, concurrency=4)  # one request per 0.1 s
    replies = client.chat_many([[{"role": "user", "content": str(i)}] for i in range(5)], 4)
    assert [r.text for r in replies] == [f"echo: {i}" for i in range(5)]
    times = sorted(r["t"] for r in _Handler.state["requests"])
    assert times[-1] - times[0] >= 0.38  # 5 starts spread over at least 4 intervals


@pytest.mark.parametrize("model, message", [
    ("slow", r"failed: cannot reach it .*timed out.*\(after 3 attempts\)"),
    ("malformed", r"failed: its reply is not a chat completion.*\(after 3 attempts\)"),
    ("denied", r"answered HTTP 401: .*bad key"),
])
def test_failures_are_retried_then_name_the_url(server, model, message):
    client = _client(server, model, retries=2, timeout=0.3)
    with pytest.raises(EndpointError, match=r"127\.0\.0\.1:\d+/v1/chat/completions " + message):
        client.chat([{"role": "user", "content": "q"}], 4)
    assert len(_Handler.state["requests"]) == (1 if model == "denied" else 3)  # 401 is not worth retrying


def test_down_server_names_the_url():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(EndpointError, match=rf"127\.0\.0\.1:{port}/v1/chat/completions failed: cannot reach"):
        _client(f"http://127.0.0.1:{port}", "m", retries=1).chat([{"role": "user", "content": "q"}], 4)


def test_chat_many_keeps_the_answers_it_got_before_failing(server):
    _Handler.state["die_after"] = 3
    kept = {}
    client = _client(server, "dies", retries=1, concurrency=1)
    with pytest.raises(EndpointError, match="HTTP 503"):
        client.chat_many([[{"role": "user", "content": str(i)}] for i in range(6)], 4,
                         on_answer=lambda i, r: kept.__setitem__(i, r.text))
    assert kept == {0: "echo: 0", 1: "echo: 1", 2: "echo: 2"}
    assert len(_Handler.state["requests"]) == 5  # 3 answers, then one request and its retry; nothing after


def test_retry_after_and_spec_parsing():
    assert retry_after("3") == 3.0 and retry_after(None) is None and retry_after("1000") == 120.0
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: no wait
    assert split_endpoint("http://h:8000/v1#gpt-4o") == ("http://h:8000/v1", "gpt-4o")
    with pytest.raises(TunesmithError, match="names no model"):
        split_endpoint("http://h:8000/v1")
    with pytest.raises(TunesmithError, match="http"):
        ChatEndpoint("h:8000", "m")
