"""The client for OpenAI-compatible chat endpoints (`POST {endpoint}/chat/completions`):
one call at a time per thread, retried with exponential backoff on timeouts, dropped
connections, HTTP 408/429/5xx and replies that are not the expected JSON."""

from __future__ import annotations

import os
import random
import threading
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec

from ..errors import LLMError
from ..recipe.schema import LLMSpec

# Statuses that say the request itself is wrong for this endpoint: no retry, no point
# in asking again for other rows either.
FATAL_STATUS = {401: "unauthorized", 403: "forbidden", 404: "not found"}
RETRY_STATUS = {408, 409, 425, 429}
MAX_BACKOFF = 60.0


class CallFailed(Exception):
    """One call failed after its retries; `reason` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class EndpointUnreachable(CallFailed):
    """No connection could be made at all."""


class Stopped(Exception):
    """The build is stopping (interrupted, or another call failed for good): no new
    attempt is made."""


@dataclass(frozen=True)
class Reply:
    text: str
    #: "stop", or "length" when the reply was cut at max_tokens.
    finish: str


class _Message(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    message: _Message
    finish_reason: str | None = None


class _Completion(msgspec.Struct):
    choices: list[_Choice]


def completions_url(endpoint: str) -> str:
    url = endpoint.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


def call_params(spec: LLMSpec, seed: int) -> dict[str, Any]:
    """The sampling parameters sent with each call (and hashed into its cache key)."""
    params: dict[str, Any] = {"temperature": spec.temperature, "max_tokens": spec.max_tokens, "seed": seed}
    if spec.top_p is not None:
        params["top_p"] = spec.top_p
    return params


class ChatClient:
    """Thread-safe: one client serves all of a table's worker threads."""

    def __init__(self, spec: LLMSpec, where: str):
        self.spec = spec
        self.where = where
        self.url = completions_url(spec.endpoint)
        headers = {}
        if spec.api_key_env:
            key = os.environ.get(spec.api_key_env)
            if not key:
                raise LLMError(f"{where}.api_key_env: the environment variable {spec.api_key_env} is not set")
            headers["Authorization"] = f"Bearer {key}"
        self.http = httpx.Client(
            timeout=httpx.Timeout(spec.timeout),
            headers=headers,
            limits=httpx.Limits(max_connections=spec.concurrency, max_keepalive_connections=spec.concurrency),
        )

    def close(self) -> None:
        self.http.close()

    def complete(self, messages: list[dict[str, str]], params: dict[str, Any], stop: threading.Event | None = None) -> Reply:
        """The reply to one call; raises CallFailed after the retries, LLMError when the
        endpoint refuses the request itself, Stopped once `stop` is set."""
        body = {"model": self.spec.model, "messages": messages, **params}
        reason = ""
        retry_after: float | None = None
        stop = stop or threading.Event()
        for attempt in range(self.spec.retries + 1):
            if attempt and stop.wait(self._backoff(attempt, retry_after)):
                raise Stopped()
            if stop.is_set():
                raise Stopped()
            retry_after = None
            try:
                response = self.http.post(self.url, json=body)
            except httpx.ConnectError as e:
                reason = f"cannot connect to {self.url}: {e}"
                if attempt == self.spec.retries:
                    raise EndpointUnreachable(reason) from None
                continue
            except httpx.TimeoutException:
                reason = f"no reply within timeout = {self.spec.timeout:g} s"
                continue
            except httpx.HTTPError as e:
                reason = f"{type(e).__name__}: {e}"
                continue
            status = response.status_code
            if status in FATAL_STATUS:
                raise LLMError(
                    f"{self.where}: {self.url} answered HTTP {status} ({FATAL_STATUS[status]}): {_snippet(response)}; "
                    f"check endpoint, model and api_key_env"
                )
            if status in RETRY_STATUS or status >= 500:
                reason = f"HTTP {status}: {_snippet(response)}"
                retry_after = _retry_after(response)
                continue
            if status != 200:
                raise CallFailed(f"HTTP {status}: {_snippet(response)}")
            try:
                completion = msgspec.json.decode(response.content, type=_Completion)
                choice = completion.choices[0]
            except (msgspec.DecodeError, IndexError) as e:
                reason = f"malformed reply ({e}): {_snippet(response)}"
                continue
            if choice.message.content is None:
                reason = "the reply has no message content"
                continue
            return Reply(text=choice.message.content, finish=choice.finish_reason or "stop")
        raise CallFailed(f"{reason} (after {self.spec.retries + 1} attempts)")

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Exponential with jitter, so that concurrent retries spread out; at least what
        the server's Retry-After asks for."""
        wait = self.spec.backoff * 2 ** (attempt - 1) * (0.5 + random.random() / 2)
        if retry_after is not None:
            wait = max(wait, retry_after)
        return min(wait, MAX_BACKOFF)


def _snippet(response: httpx.Response, limit: int = 200) -> str:
    text = response.text.strip().replace("\n", " ")
    return text[:limit] + ("…" if len(text) > limit else "") if text else "(empty body)"


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers.get("retry-after", ""))
    except ValueError:
        return None
