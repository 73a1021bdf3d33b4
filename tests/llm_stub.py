"""A small OpenAI-compatible chat server on loopback for the LLM-stage tests. Each
request goes to `behave(prompt, attempt)`, which returns what to do: a reply text, or a
fault ("500", "404", "malformed", "timeout", "length", "empty"). Every request is
recorded, so tests can count what was asked and how often."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

Behaviour = Callable[[str, int], str | tuple[str, str]]


def echo(prompt: str, attempt: int) -> str:
    """The default reply: the prompt on one line, marked."""
    return "LONG " + prompt.replace("\n", " | ")


@dataclass
class Stub:
    behave: Behaviour = echo
    #: Seconds a "timeout" fault holds the request.
    hang: float = 2.0
    #: Seconds every reply waits before it is sent.
    delay: float = 0.0
    #: When set, the first `barrier.parties` requests wait for each other (shows concurrency).
    barrier: threading.Barrier | None = None
    requests: list[dict[str, Any]] = field(default_factory=list)
    #: The Authorization header of each request ("" when there was none).
    auth: list[str] = field(default_factory=list)
    attempts: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def prompts(self) -> list[str]:
        return [r["messages"][-1]["content"] for r in self.requests]

    def start(self) -> Stub:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                prompt = body["messages"][-1]["content"]
                with stub.lock:
                    stub.requests.append(body)
                    stub.auth.append(self.headers.get("authorization", ""))
                    stub.attempts[prompt] += 1
                    attempt = stub.attempts[prompt]
                if stub.barrier is not None:
                    try:
                        stub.barrier.wait()
                    except threading.BrokenBarrierError:
                        pass
                if stub.delay:
                    time.sleep(stub.delay)
                action = stub.behave(prompt, attempt)
                finish = "stop"
                if isinstance(action, tuple):
                    action, finish = action
                if action == "500":
                    return self._send(500, b'{"error": "internal"}')
                if action == "404":
                    return self._send(404, b'{"error": "model not found"}')
                if action == "malformed":
                    return self._send(200, b'{"choices": [{"message": ')
                if action == "timeout":
                    time.sleep(stub.hang)
                    action = "too late"
                if action == "length":
                    action, finish = "cut off mid", "length"
                if action == "empty":
                    action = "   "
                reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": action}, "finish_reason": finish}]}
                self._send(200, json.dumps(reply).encode())

            def _send(self, status: int, data: bytes) -> None:
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
