"""Image references: how a release names an image that lives inside a container file
(a WebDataset tar shard, a parquet file with image bytes) without copying its bytes.
The one place that defines the grammar; the Rust core (rust/media.rs, `ImageRef`) parses
the same text.

    reference := container "#" member
    member    := "offset=" N ",size=" N             bytes [N, N + size) of the container:
                                                     a tar member's data
               | "rg=" N ",row=" N ",col=" NAME      a parquet cell: row group, row within
                                                     the row group (for a list column: the
                                                     position in the row group's flattened
                                                     lists), column (its `bytes` field when
                                                     the cells are structs)
    N         := "0" | [1-9][0-9]*                   canonical decimal
    NAME      := the column name, percent-encoded (RFC 3986 unreserved characters as is)

`container` is a path relative to the source's image root, as a loose image path is, and
the member part follows the last "#". Examples:

    shards/train-000.tar#offset=1536,size=20480
    data/train-0001.parquet#rg=0,row=12,col=image

A loose image path whose text has this form would be ambiguous: the source readers refuse
it (`looks_like_reference`). Everything here is the standard library; pyarrow is imported
only to read a parquet cell."""

from __future__ import annotations

import contextlib
import functools
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import quote, unquote

_N = r"(0|[1-9][0-9]*)"
RANGE = re.compile(rf"#offset={_N},size={_N}$")
CELL = re.compile(rf"#rg={_N},row={_N},col=([A-Za-z0-9._~%-]+)$")


#: Members smaller than this are read whole even for a header: one read beats the
#: window's many small ones.
WINDOW_FROM = 256 << 10


@dataclass(frozen=True)
class Range:
    """Bytes [offset, offset + size) of `container` (a tar member's data)."""

    container: str
    offset: int
    size: int


@dataclass(frozen=True)
class Cell:
    """Row `row` of row group `rg`, column `col`, of the parquet file `container`."""

    container: str
    rg: int
    row: int
    col: str


def range_ref(container: str, offset: int, size: int) -> str:
    return f"{container}#offset={offset},size={size}"


def cell_ref(container: str, rg: int, row: int, col: str) -> str:
    return f"{container}#rg={rg},row={row},col={quote(col, safe='')}"


def parse(text: str) -> Range | Cell | None:
    """The reference `text` names, or None for a plain file path."""
    if m := RANGE.search(text):
        return Range(text[: m.start()], int(m[1]), int(m[2]))
    if m := CELL.search(text):
        return Cell(text[: m.start()], int(m[1]), int(m[2]), unquote(m[3]))
    return None


def looks_like_reference(text: str) -> bool:
    return bool(RANGE.search(text) or CELL.search(text))


def read_bytes(text: str) -> bytes:
    """The bytes of the image `text` names: a reference's member, or a plain file."""
    ref = parse(text)
    if ref is None:
        return Path(text).read_bytes()
    if isinstance(ref, Range):
        with open(ref.container, "rb") as f:
            f.seek(ref.offset)
            data = f.read(ref.size)
        if len(data) != ref.size:
            raise OSError(f"{ref.container} is truncated: the member at byte {ref.offset} needs {ref.size} bytes, {len(data)} remain")
        return data
    return _cell(ref)


def open_source(text: str, header_only: bool = False) -> object:
    """What PIL's `Image.open` takes for `text`: the file path, or the member's bytes
    (`header_only`: a tar member above WINDOW_FROM bytes as a window on the shard, so
    that a header read reads a block or two, not the member)."""
    ref = parse(text)
    if ref is None:
        return text
    if header_only and isinstance(ref, Range) and ref.size > WINDOW_FROM:
        f = open(ref.container, "rb")
        f.seek(0, io.SEEK_END)
        if f.tell() < ref.offset + ref.size:
            f.close()
            read_bytes(text)  # raises, naming the truncation
        return io.BufferedReader(_Window(f, ref.offset, ref.size))
    return io.BytesIO(read_bytes(text))


@contextlib.contextmanager
def opened(text: str, header_only: bool = False) -> Iterator[object]:
    """`open_source(text, header_only)`, closed afterwards (PIL leaves a file object it
    is given open)."""
    src = open_source(text, header_only)
    try:
        yield src
    finally:
        if isinstance(src, io.IOBase):
            src.close()


class _Window(io.RawIOBase):
    """Bytes [start, start + size) of an open file, as a file of their own."""

    def __init__(self, f, start: int, size: int):  # type: ignore[no-untyped-def]
        self.f, self.start, self.size, self.pos = f, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[no-untyped-def]
        n = max(0, min(len(b), self.size - self.pos))
        self.f.seek(self.start + self.pos)
        data = self.f.read(n)
        b[: len(data)] = data
        self.pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.size}[whence]
        if base + offset < 0:
            raise OSError("seek before the start of the member")
        self.pos = base + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def close(self) -> None:
        self.f.close()
        super().close()


def _cell(ref: Cell) -> bytes:
    cells = _row_group(ref.container, ref.rg, ref.col)
    if ref.row >= len(cells):
        raise OSError(f"{ref.container}: row group {ref.rg} of column '{ref.col}' has {len(cells)} images, not image {ref.row}")
    value = cells[ref.row].as_py()
    if isinstance(value, dict):
        value = value.get("bytes")
    if value is None:
        raise OSError(f"{ref.container}: row group {ref.rg}, row {ref.row}, column '{ref.col}' holds no image bytes")
    return bytes(value)


@functools.lru_cache(maxsize=4)  # a loader reads neighbouring rows of one row group
def _row_group(path: str, rg: int, col: str):  # type: ignore[no-untyped-def]
    """The cells of column `col` in row group `rg` (a list column's lists flattened)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    f = pq.ParquetFile(path)
    if rg >= f.num_row_groups:
        raise OSError(f"{path} has {f.num_row_groups} row groups, not row group {rg}")
    cells = f.read_row_group(rg, columns=[col]).column(0).combine_chunks()
    if pa.types.is_list(cells.type) or pa.types.is_large_list(cells.type):
        cells = pc.list_flatten(cells)
    return cells
