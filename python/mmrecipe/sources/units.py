"""Work units: a JSON Lines, JSON array, parquet or WebDataset source cut into runs of the very slices a
local build reads it in (`read_slices`: `rows` records at a time, each file on its own; a
row group at a time for parquet with image bytes), so that each run can be read and
tokenized apart (a Ray task) and the runs, loaded in order, give what reading the whole
source gives: the same slices, row numbers, notes and line numbers in errors.

JSON: the cut is found by reading each file once with the same splitter, noting where every
slice starts (its byte offset, the newlines and records before it); a unit then opens the file at
its first slice and reads on. Parquet: the cut comes from each file's footer alone (its rows
and the uncompressed bytes of its row groups); a unit reads only the row groups its slices
lie in. Consecutive slices of one file join a unit while its bytes stay within the budget (a
slice over it is a unit of its own: a slice is the smallest piece the local build reads, so
it cannot be cut without changing the release). WebDataset: a shard is a slice, and a unit
of its own, its rows counted from its tar headers."""

from __future__ import annotations

from typing import Iterator

import msgspec
import polars as pl

from .. import _core
from ..errors import SourceError
from ..recipe.plan import PARQUET_IMAGES, WEBDATASET, SourcePlan
from .containers import read_row_groups, read_shard, shard_rows
from .read import json_frames, parquet_frames, parquet_row_groups


class Unit(msgspec.Struct, frozen=True):
    """Slices `slices` of file `file` of a source, from byte `offset`."""

    file: int  # index in the source's files
    offset: int  # where its first slice starts in the file: a byte (JSON), a slice (parquet), a row group (parquet with images)
    newlines: int  # newlines before it (errors name the file's line numbers)
    before: int  # records of the file before it (a JSON array's errors name the record)
    slices: int  # -1: the REST of the source from here (where the splitter stopped)
    row: int  # the source's row number of its first record
    records: int
    bytes: int  # of the file it spans (parquet: uncompressed, as the footer gives them)


def cuttable(source: SourcePlan) -> bool:
    """Whether `source` is read in slices a unit can start at: JSON Lines, JSON arrays or
    parquet, with its images in loose files or as bytes in the parquet, or WebDataset
    shards (not read whole: joins, group_by, json_key)."""
    if not source.streamable:
        return False
    if source.container is not None:
        return source.container in (PARQUET_IMAGES, WEBDATASET)
    return all(f in ("jsonl", "json", "parquet") for f in source.formats)


def cut_units(source: SourcePlan, rows: int, budget: int) -> Iterator[Unit]:
    """The units of a `cuttable` source read `rows` records a slice, each at most
    `budget` bytes of its file where a slice allows, as the files are read (a caller
    starts on the first before the last is found). At a slice the splitter refuses, the
    last unit is the REST of the source from there (`slices` -1): its read then gives the
    error, naming the line, as the local build's read does. Nothing for a source without
    records (whose whole read gives that error)."""
    row = 0
    for index, (path, fmt) in enumerate(zip(source.files, source.formats)):
        if source.container == WEBDATASET:  # a shard is a slice: a unit each, its rows from its tar headers
            try:
                records = shard_rows(source, path)
            except SourceError:  # the read names it
                yield Unit(index, 0, 0, 0, -1, row, 0, sum(f.stat().st_size for f in source.files[index:] if f.is_file()))
                return
            if records:
                yield Unit(index, 0, 0, 0, 1, row, records, path.stat().st_size)
                row += records
            continue
        if fmt == "parquet" or source.container == PARQUET_IMAGES:
            try:
                pieces = _parquet_pieces(path, None if source.container == PARQUET_IMAGES else rows)
            except Exception:  # noqa: BLE001 - an unreadable footer: the read names it
                rest = sum(f.stat().st_size for f in source.files[index:] if f.is_file())
                yield Unit(index, 0, 0, 0, -1, row, 0, rest)
                return
            for unit in _runs(index, pieces, row, budget):
                row += unit.records
                yield unit
            continue
        start = (0, 0, 0)
        unit: list[int] = []  # offset, newlines, before, slices, row, records, bytes of the open unit
        try:
            reader = _core.JsonChunks(str(path), fmt == "json")
            while (chunk := reader.next_chunk(rows)) is not None:
                end = reader.position()
                size, records = end[0] - start[0], chunk.count(b"\n")
                if unit and unit[6] + size > budget:
                    yield Unit(index, *unit)
                    unit = []
                if not unit:
                    unit = [*start, 0, row, 0, 0]
                unit[3] += 1
                unit[5] += records
                unit[6] += size
                row += records
                start = end
        except (ValueError, OSError):
            if unit:
                yield Unit(index, *unit)
            rest = sum(f.stat().st_size for f in source.files[index:] if f.is_file()) - start[0]
            yield Unit(index, *start, -1, row, 0, rest)
            return
        if unit:
            yield Unit(index, *unit)


def _parquet_pieces(path, rows: int | None) -> list[tuple[int, int]]:
    """The (records, uncompressed bytes) of each slice of `rows` records of a parquet file,
    from its footer (`rows` None: of each row group)."""
    if path.stat().st_size == 0:  # read as no rows
        return []
    spans = parquet_row_groups(path)
    if rows is None:
        return [(b - a, size) for a, b, size in spans]
    pieces, total = [], spans[-1][1] if spans else 0
    for start in range(0, total, rows):
        end = min(total, start + rows)
        # Each row group's bytes spread evenly over its rows.
        size = sum(s * (min(end, b) - max(start, a)) // max(b - a, 1) for a, b, s in spans if a < end and start < b)
        pieces.append((end - start, size))
    return pieces


def _runs(file: int, pieces: list[tuple[int, int]], row: int, budget: int) -> Iterator[Unit]:
    """Consecutive pieces (records, bytes) of file `file` joined while within `budget`."""
    unit: list[int] = []  # first piece, pieces, records, bytes of the open unit
    for k, (records, size) in enumerate(pieces):
        if unit and unit[2] and unit[3] + size > budget:  # (empty row groups join the next unit)
            yield Unit(file, unit[0], 0, 0, unit[1], row, unit[2], unit[3])
            row += unit[2]
            unit = []
        if not unit:
            unit = [k, 0, 0, 0]
        unit[1] += 1
        unit[2] += records
        unit[3] += size
    if unit and unit[2]:
        yield Unit(file, unit[0], 0, 0, unit[1], row, unit[2], unit[3])


def read_unit(source: SourcePlan, unit: Unit, rows: int) -> Iterator[pl.DataFrame]:
    """The slices of `unit`, as `read_slices` gives them (a REST unit: every slice from
    its start on, through the source's later files)."""
    first = unit.file
    for k, (path, fmt) in enumerate(zip(source.files[first:], source.formats[first:])):
        if k and unit.slices >= 0:
            return
        slices = None if unit.slices < 0 else unit.slices
        if source.container == WEBDATASET:
            frame = read_shard(source, path)
            if frame.height:
                yield frame
        elif source.container == PARQUET_IMAGES:
            start = unit.offset if k == 0 else 0
            groups = read_row_groups(source, path, start, slices)
            yield from (frame for frame in groups if frame.height)
        elif fmt == "parquet":
            yield from parquet_frames(source.name, path, rows, unit.offset if k == 0 else 0, slices)
        else:
            at = (unit.offset, unit.newlines, unit.before) if k == 0 else (0, 0, 0)
            yield from json_frames(source.name, path, fmt, rows, slices, at)
