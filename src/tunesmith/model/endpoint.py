"""A model served behind an OpenAI-compatible chat completions endpoint (vLLM, llama.cpp server, Ollama,
hosted APIs): the eval's LLM judge and the `judge:` reward of online training both ask one through this.

Requests are greedy (temperature 0). HTTP 429 and 5xx, timeouts and refused connections are retried with
exponential backoff up to `retries` times; any other HTTP error, and a reply that is not a chat completion,
stops at once. Every error names the URL. `chat_many` spreads requests over `concurrency` threads.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..errors import TunesmithError


@dataclass(frozen=True)
class Reply:
    text: str
    seconds: float  # wall time of the request that succeeded


def chat_completions_url(url: str) -> str:
    """`http://host:8000` or `.../v1` → `.../v1/chat/completions`; a URL already ending in
    /chat/completions is used as given."""
    base = url.rstrip("/")
    if base.endswith("/chat/completions"):
        return base
    return base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")


def split_endpoint(spec: str, what: str = "endpoint") -> tuple[str, str]:
    """`http://host/v1#MODEL` → (url, model); the model name is what the server serves."""
    url, sep, model = spec.partition("#")
    if not sep or not model:
        raise TunesmithError(f"{what} URL {spec!r} names no model",
                             f"append the served model name after '#', e.g. http://localhost:8000/v1#my-{what}")
    return url, model


class _Retryable(Exception):
    pass


class ChatEndpoint:
    def __init__(self, url: str, model: str, api_key: str | None = None, timeout: float = 60.0,
                 retries: int = 2, retry_wait: float = 1.0, concurrency: int = 4, what: str = "endpoint"):
        if not url.startswith(("http://", "https://")):
            raise TunesmithError(f"{what} URL must start with http:// or https://: {url!r}")
        self.url = chat_completions_url(url)
        self.model, self.api_key, self.timeout = model, api_key, timeout
        self.retries, self.retry_wait, self.concurrency, self.what = retries, retry_wait, concurrency, what

    def chat(self, messages: Sequence[dict], max_tokens: int) -> Reply:
        body = {"model": self.model, "messages": list(messages), "temperature": 0, "max_tokens": max_tokens}
        for attempt in range(self.retries + 1):
            started = time.perf_counter()
            try:
                return Reply(self._post(body), time.perf_counter() - started)
            except _Retryable as exc:
                if attempt == self.retries:
                    raise TunesmithError(f"{self.what} at {self.url} failed: {exc}",
                                         "check that the server is up and the model name is right") from None
                time.sleep(self.retry_wait * 2 ** attempt)
        raise AssertionError("unreachable")

    def chat_many(self, conversations: Sequence[Sequence[dict]], max_tokens: int) -> list[Reply]:
        """One reply per conversation, in order, `concurrency` requests at a time."""
        with ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
            return list(pool.map(lambda c: self.chat(c, max_tokens), conversations))

    def _post(self, body: dict) -> str:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:300].decode("utf-8", "replace")
            if exc.code == 429 or exc.code >= 500:
                raise _Retryable(f"HTTP {exc.code}: {detail}") from None
            raise TunesmithError(f"{self.what} at {self.url} answered HTTP {exc.code}: {detail}",
                                 "check the URL, the model name and the API key") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            raise _Retryable(f"cannot reach it ({getattr(exc, 'reason', exc)})") from None
        try:
            return str(json.loads(payload)["choices"][0]["message"]["content"] or "")
        except (ValueError, KeyError, IndexError, TypeError):
            raise TunesmithError(f"{self.what} at {self.url} sent a reply that is not a chat completion: "
                                 f"{payload[:200]!r}", "the URL must point to an OpenAI-compatible server") from None
