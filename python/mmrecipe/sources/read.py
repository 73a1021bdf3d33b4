"""Source files to polars frames: jsonl / json / parquet / csv / tsv, whole or (JSON Lines,
JSON arrays and parquet) a slice of records at a time, which keeps memory flat in a source's size."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterator

import msgspec
import polars as pl

from .. import _core
from ..errors import SourceError
from ..recipe.plan import WEBDATASET, SourcePlan
from .containers import read_row_groups, read_shard


def read_file(name: str, path: Path, fmt: str, json_key: str | None = None) -> pl.DataFrame:
    """All rows of one file of source `name` (for messages)."""
    if path.stat().st_size == 0:
        return pl.DataFrame()
    try:
        if fmt == "jsonl":
            try:
                return pl.read_ndjson(path, infer_schema_length=None)
            except Exception:
                raise_bad_json_line(name, path)
                raise
        if fmt == "json":
            frame = pl.read_json(path, infer_schema_length=None)
            if json_key:
                if json_key not in frame.columns:
                    raise SourceError(f"source '{name}': {path.name} has no top-level key '{json_key}' (json_key)")
                if not isinstance(frame.schema[json_key], pl.List):
                    kind = "an object" if isinstance(frame.schema[json_key], pl.Struct) else f"{frame.schema[json_key]}"
                    raise SourceError(f"source '{name}': {path.name}: '{json_key}' (json_key) is {kind}, not a list of records")
                frame = frame.select(pl.col(json_key).explode()).unnest(json_key)
            return frame
        if fmt == "parquet":
            return pl.read_parquet(path)
        if fmt == "tsv":  # Common Voice: tab-separated, quotes are text (sentences hold them)
            return pl.read_csv(path, separator="\t", quote_char=None, infer_schema_length=None)
        return pl.read_csv(path, infer_schema_length=None)
    except SourceError:
        raise
    except Exception as e:  # polars raises several exception types for unreadable input
        raise SourceError(f"source '{name}': cannot read {path} as {fmt}: {e}") from None


def raise_bad_json_line(name: str, path: Path) -> None:
    """On the error path only: finds the first line that is not a JSON object."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                line.decode("utf-8")  # checked first: msgspec versions report bad UTF-8 differently
            except UnicodeDecodeError:
                raise SourceError(f"source '{name}': {path}, line {number}: not UTF-8 text") from None
            try:
                value = msgspec.json.decode(line)
            except msgspec.DecodeError as e:
                raise SourceError(f"source '{name}': {path}, line {number}: malformed JSON ({e})") from None
            if not isinstance(value, dict):
                raise SourceError(f"source '{name}': {path}, line {number}: expected a JSON object, got {type(value).__name__}")


def read_all(source: SourcePlan) -> pl.DataFrame:
    """Every row of the source's files (one frame; columns a file lacks are null)."""
    spec = source.spec
    if source.container is not None:
        parts = [f for f in read_slices(source, 0) if f.height]
        return parts[0] if len(parts) == 1 else pl.concat(parts, how="diagonal_relaxed")
    frames = [read_file(spec.name, f, fmt, spec.json_key) for f, fmt in zip(source.files, source.formats)]
    frame = frames[0] if len(frames) == 1 else pl.concat(frames, how="diagonal_relaxed")
    if frame.height == 0:
        raise no_rows(source)
    return frame


def read_slices(source: SourcePlan, rows: int) -> Iterator[pl.DataFrame]:
    """A streamable source, `rows` records at a time, in file order (a container source:
    a WebDataset shard or a parquet row group at a time)."""
    name = source.name
    total = 0
    if source.container is not None:
        for path in source.files:
            parts = [read_shard(source, path)] if source.container == WEBDATASET else read_row_groups(source, path)
            for frame in parts:
                if frame.height:
                    total += frame.height
                    yield frame
        if total == 0:
            raise no_rows(source)
        return
    for path, fmt in zip(source.files, source.formats):
        for frame in (parquet_frames(name, path, rows) if fmt == "parquet" else json_frames(name, path, fmt, rows)):
            total += frame.height
            yield frame
    if total == 0:
        raise no_rows(source)


def parquet_frames(name: str, path: Path, rows: int, first: int = 0, slices: int | None = None) -> Iterator[pl.DataFrame]:
    """A parquet file of source `name`, `rows` records at a time: all of it, or `slices`
    slices from slice `first`. Read a row group at a time (each decoded once, only those
    the slices lie in) through polars' own reader, so the columns have a whole read's types;
    memory is bounded by the largest row group."""
    if path.stat().st_size == 0:  # as a whole read takes it: no rows
        return
    try:
        scan = pl.scan_parquet(path)
        groups = parquet_row_groups(path)
        start, total = first * rows, groups[-1][1] if groups else 0
        end = total if slices is None else min(total, start + slices * rows)
        held: pl.DataFrame | None = None  # the rows read and not yet given
        for a, b, _ in groups:
            if b <= start or a >= end:
                continue
            part = scan.slice(max(a, start), min(b, end) - max(a, start)).collect()
            held = part if held is None else pl.concat([held, part])
            while held.height >= rows:
                yield held.slice(0, rows)
                held = held.slice(rows)
        if held is not None and held.height:
            yield held
    except Exception as e:  # polars and pyarrow raise several exception types for unreadable input
        raise SourceError(f"source '{name}': cannot read {path} as parquet: {e}") from None


def parquet_row_groups(path: Path) -> list[tuple[int, int, int]]:
    """The rows [start, end) and uncompressed bytes of each row group of a parquet file,
    from its footer."""
    import pyarrow.parquet as pq

    meta = pq.read_metadata(path)
    spans, at = [], 0
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        spans.append((at, at + group.num_rows, group.total_byte_size))
        at += group.num_rows
    return spans


def json_frames(name: str, path: Path, fmt: str, rows: int, slices: int | None = None,
                at: tuple[int, int, int] = (0, 0, 0)) -> Iterator[pl.DataFrame]:
    """A JSON Lines or JSON array file of source `name`, `rows` records at a time: all of
    it, or `slices` slices from `at` (a position of the splitter's: byte offset, newlines
    and records before it)."""
    try:
        reader = _core.JsonChunks(str(path), fmt == "json", *at)
        read = 0
        while (slices is None or read < slices) and (chunk := reader.next_chunk(rows)) is not None:
            read += 1
            try:
                frame = pl.read_ndjson(io.BytesIO(chunk), infer_schema_length=None)
            except Exception:
                if fmt == "jsonl":
                    raise_bad_json_line(name, path)
                raise
            yield frame
    except (ValueError, OSError, pl.exceptions.PolarsError) as e:
        raise SourceError(f"source '{name}': cannot read {path}: {e}") from None


def no_rows(source: SourcePlan) -> SourceError:
    return SourceError(f"source '{source.name}': no rows in {', '.join(str(f) for f in source.files)}")
