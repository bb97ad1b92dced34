"""A client for OpenAI-compatible chat completions servers (vLLM, llama.cpp server, Ollama, hosted APIs): the
endpoint candidates of an eval, the LLM judge and the `judge:` reward of online training all use it (it sits
below training so that rewards can; `tunesmith.eval.endpoint` exports the same names).

Requests are greedy (temperature 0). 429 (honouring Retry-After), 5xx, timeouts, refused connections and
replies that are not a chat completion are retried with exponential backoff up to `retries` times; any other
HTTP error stops at once. Every error names the URL. Requests are spread over `concurrency` threads and, with
`rate_limit`, started at most that many per minute. `chat_many` hands each answer to a callback as it arrives,
so that a caller can keep the answers of an eval that stops half way.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from ..errors import TunesmithError

MAX_RETRY_AFTER = 120.0  # seconds: a longer Retry-After is cut to this


@dataclass(frozen=True)
class Reply:
    text: str
    prompt_tokens: int | None  # as the server counted them (`usage`), None when it does not say
    cached_tokens: int | None  # prompt tokens the server's prompt cache served (`prompt_tokens_details`)
    completion_tokens: int | None
    hit_limit: bool  # finish_reason "length": the answer stopped at max_tokens
    seconds: float  # wall time of the request that succeeded


class EndpointError(TunesmithError):
    """The endpoint failed for good (after retries where a retry could help)."""


class _Retryable(Exception):
    def __init__(self, message: str, wait: float | None = None):
        super().__init__(message)
        self.wait = wait


def chat_completions_url(url: str) -> str:
    """`http://host:8000` or `.../v1` → `.../v1/chat/completions`; a URL already ending in
    /chat/completions is used as given."""
    base = url.rstrip("/")
    if base.endswith("/chat/completions"):
        return base
    return base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")


def split_endpoint(spec: str) -> tuple[str, str]:
    """`http://host/v1#MODEL` → (url, model); the model name is what the server serves."""
    url, sep, model = spec.partition("#")
    if not url.startswith(("http://", "https://")):
        raise TunesmithError(f"endpoint URL must start with http:// or https://: {url!r}",
                             "e.g. http://localhost:8000/v1#my-model")
    if not sep or not model:
        raise TunesmithError(f"endpoint {spec!r} names no model",
                             "append the served model name after '#', e.g. http://localhost:8000/v1#my-model")
    return url, model


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), capped; None if absent."""
    if not value:
        return None
    try:
        return min(MAX_RETRY_AFTER, max(0.0, float(value)))
    except ValueError:
        pass
    try:
        return min(MAX_RETRY_AFTER, max(0.0, parsedate_to_datetime(value).timestamp() - time.time()))
    except (TypeError, ValueError):
        return None


class _Pacer:
    """Starts at most `per_minute` requests a minute across threads (None: no limit)."""

    def __init__(self, per_minute: float | None):
        self.interval = 60.0 / per_minute if per_minute else 0.0
        self.next = 0.0
        self.lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next)
            self.next = start + self.interval
        time.sleep(max(0.0, start - now))


class ChatEndpoint:
    def __init__(self, url: str, model: str, api_key: str | None = None, timeout: float = 60.0,
                 retries: int = 4, retry_wait: float = 1.0, concurrency: int = 4, rate_limit: float | None = None,
                 what: str = "endpoint"):
        if not url.startswith(("http://", "https://")):
            raise TunesmithError(f"{what} URL must start with http:// or https://: {url!r}")
        self.url = chat_completions_url(url)
        self.model, self.api_key, self.timeout = model, api_key, timeout
        self.retries, self.retry_wait, self.concurrency = retries, retry_wait, concurrency
        self.what = what
        self._pacer = _Pacer(rate_limit)

    def chat(self, messages: Sequence[dict], max_tokens: int) -> Reply:
        body = {"model": self.model, "messages": list(messages), "temperature": 0, "max_tokens": max_tokens}
        for attempt in range(self.retries + 1):
            self._pacer.wait()
            started = time.perf_counter()
            try:
                return _reply(self._post(body), time.perf_counter() - started, self._malformed)
            except _Retryable as exc:
                if attempt == self.retries:
                    tries = f" (after {attempt + 1} attempts)" if attempt else ""
                    raise EndpointError(f"{self.what} at {self.url} failed: {exc}{tries}",
                                        "check that the server is up and the model name is right") from None
                time.sleep(exc.wait if exc.wait is not None else self.retry_wait * 2 ** attempt)
        raise AssertionError("unreachable")

    def chat_many(self, conversations: Sequence[Sequence[dict]], max_tokens: int,
                  on_answer: Callable[[int, Reply], None] | None = None) -> list[Reply]:
        """One reply per conversation, in order. On a failure no new request starts; the requests in flight
        finish (and reach `on_answer`), then the first error is raised."""
        stop = threading.Event()
        errors: list[EndpointError] = []

        def one(i: int) -> Reply | None:
            if stop.is_set():
                return None
            try:
                reply = self.chat(conversations[i], max_tokens)
            except EndpointError as exc:
                errors.append(exc)
                stop.set()
                return None
            if on_answer is not None:
                on_answer(i, reply)
            return reply

        with ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
            replies = list(pool.map(one, range(len(conversations))))
        if errors:
            raise errors[0]
        return replies  # type: ignore[return-value]

    def _post(self, body: dict) -> bytes:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:300].decode("utf-8", "replace")
            if exc.code == 429:
                wait = retry_after(exc.headers.get("Retry-After"))
                raise _Retryable(f"HTTP 429 (rate limited): {detail}", wait) from None
            if exc.code >= 500:
                raise _Retryable(f"HTTP {exc.code}: {detail}") from None
            raise EndpointError(f"{self.what} at {self.url} answered HTTP {exc.code}: {detail}",
                                "check the URL, the model name and the API key") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
            raise _Retryable(f"cannot reach it ({getattr(exc, 'reason', exc)})") from None

    def _malformed(self, payload: bytes) -> _Retryable:
        return _Retryable(f"its reply is not a chat completion: {payload[:200]!r}")


def _reply(payload: bytes, seconds: float, malformed: Callable[[bytes], Exception]) -> Reply:
    try:
        data = json.loads(payload)
        choice = data["choices"][0]
        text = str(choice["message"]["content"] or "")
    except (ValueError, KeyError, IndexError, TypeError):
        raise malformed(payload) from None
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    details = usage.get("prompt_tokens_details") if isinstance(usage.get("prompt_tokens_details"), dict) else {}
    return Reply(text, _int(usage.get("prompt_tokens")), _int(details.get("cached_tokens")),
                 _int(usage.get("completion_tokens")), choice.get("finish_reason") == "length", seconds)


def _int(value) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def api_key(*names: str) -> str | None:
    """The first of these environment variables that is set."""
    import os

    return next((os.environ[n] for n in names if os.environ.get(n)), None)
