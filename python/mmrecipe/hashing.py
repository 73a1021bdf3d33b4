"""Content hashes: releases are keyed on what the inputs contain, not on their names."""

from __future__ import annotations

import hashlib
from pathlib import Path

_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Hashes:
    """Content hashes of files, each computed once while its size and modification time
    stay the same (a build hashes a source for its token store key and its manifest)."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, int, int], str] = {}

    def file(self, path: Path) -> str:
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key not in self._seen:
            self._seen[key] = file_sha256(path)
        return self._seen[key]
