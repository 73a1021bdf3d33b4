"""The call cache: an append-only JSON Lines file with one record per finished LLM call,
keyed by the SHA-256 of what shaped the reply (model, messages, sampling parameters).
Every record is written and fsync'd as its call finishes, so a build killed mid-way
loses no finished call; a torn last line (the kill came mid-write) is ignored on read
and cut off before the next append. The last record of a key wins (a failed call
asked again with --retry-failed appends its new outcome)."""

from __future__ import annotations

import io
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import msgspec
import polars as pl

from ..errors import LLMError
from ..hashing import bytes_sha256


class Record(msgspec.Struct, omit_defaults=True):
    key: str
    table: str
    model: str
    #: The row's own part of the request (the filled prompt or context), for auditing.
    prompt: str
    response: str | None = None
    #: "stop", or "length" when the reply was cut at max_tokens.
    finish: str | None = None
    #: Why the call failed (a failed call under on_error = "keep" or "drop").
    error: str | None = None


SCHEMA = {"key": pl.String, "response": pl.String, "finish": pl.String, "error": pl.String}


@contextmanager
def _locked(file: io.BufferedWriter) -> Iterator[None]:
    """An exclusive advisory lock on the file, where the platform has one."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    fcntl.flock(file.fileno(), fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(file.fileno(), fcntl.LOCK_UN)


class CallCache:
    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._file: io.BufferedWriter | None = None
        self._pending: list[Record] = []
        self.frame = self._load()

    def _load(self) -> pl.DataFrame:
        if not self.path.is_file():
            return pl.DataFrame(schema=SCHEMA)
        data = self.path.read_bytes()
        body = data[: data.rfind(b"\n") + 1]  # a torn last line is not a record
        if not body.strip():
            return pl.DataFrame(schema=SCHEMA)
        try:
            frame = pl.read_ndjson(io.BytesIO(body), schema={**SCHEMA, "table": pl.String})
        except Exception:
            self._raise_bad_line(body)
            raise
        if frame["key"].null_count():
            self._raise_bad_line(body)
        return frame.select(list(SCHEMA)).unique("key", keep="last", maintain_order=True)

    def _raise_bad_line(self, body: bytes) -> None:
        decoder = msgspec.json.Decoder(Record)
        for number, line in enumerate(body.split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                decoder.decode(line)
            except msgspec.DecodeError as e:
                raise LLMError(f"{self.path}, line {number}: not a call record ({e}); the cache file is damaged") from None

    def append(self, record: Record) -> None:
        """Writes one record and makes it durable before returning. The file is locked
        for the write, so builds that share a cache append whole lines."""
        line = msgspec.json.encode(record) + b"\n"
        with self._lock:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "ab")
            with _locked(self._file):
                if self._last_byte() != b"\n":
                    self._cut_torn_line()
                self._file.write(line)
                self._file.flush()
                os.fsync(self._file.fileno())
            self._pending.append(record)

    def _last_byte(self) -> bytes:
        size = os.fstat(self._file.fileno()).st_size  # type: ignore[union-attr]
        if size == 0:
            return b"\n"
        with open(self.path, "rb") as f:
            f.seek(size - 1)
            return f.read(1)

    def _cut_torn_line(self) -> None:
        """Cuts a last line left without its newline by a build killed mid-write (whole
        lines that other builds appended since this one read the file stay)."""
        with open(self.path, "rb") as f:
            data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            self._file.truncate(end)  # type: ignore[union-attr]
        self._file.seek(0, os.SEEK_END)  # type: ignore[union-attr]

    def refresh(self) -> None:
        """Adds the records appended since the last refresh to `frame`."""
        with self._lock:
            pending, self._pending = self._pending, []
        if pending:
            new = pl.DataFrame(
                {k: [getattr(r, k) for r in pending] for k in SCHEMA}, schema=SCHEMA
            )
            self.frame = pl.concat([self.frame, new]).unique("key", keep="last", maintain_order=True)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def cache_digest(path: Path) -> tuple[str, int]:
    """sha256 and size of the cache's content in a canonical form: each key's last record
    (key, response, finish, error), sorted by key, every field length-prefixed. Two
    caches that hold the same calls hash the same whatever order the calls finished in;
    the release id follows what the calls answered, not how they were scheduled."""

    def field(name: str) -> pl.Expr:
        value = pl.col(name)
        return pl.when(value.is_null()).then(pl.lit("-")).otherwise(pl.concat_str(pl.lit("+"), value.str.len_bytes().cast(pl.String), pl.lit(":"), value))

    frame = CallCache(path).frame.sort("key")
    line = pl.concat_str([pl.col("key"), field("response"), field("finish"), field("error")], separator="\t")
    data = (frame.select(line.str.join("\n")).item() or "").encode() if frame.height else b""
    return bytes_sha256(data), len(data)
