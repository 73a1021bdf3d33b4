"""Work units: a JSON Lines or JSON array source cut into runs of the very slices a local
build reads it in (`read_slices`: `rows` records at a time, each file on its own), so that each run can be
read and tokenized apart (a Ray task) and the runs, loaded in order, give what reading the
whole source gives: the same slices, row numbers, notes and line numbers in errors.

The cut is found by reading each file once with the same splitter, noting where every
slice starts (its byte offset, the newlines and records before it); a unit then opens the file at
its first slice and reads on. Consecutive slices of one file join a unit while its bytes
stay within the budget (a slice over it is a unit of its own: a slice is the smallest
piece the local build reads, so it cannot be cut without changing the release)."""

from __future__ import annotations

from typing import Iterator

import msgspec
import polars as pl

from .. import _core
from ..recipe.plan import SourcePlan
from .read import json_frames


class Unit(msgspec.Struct, frozen=True):
    """Slices `slices` of file `file` of a source, from byte `offset`."""

    file: int  # index in the source's files
    offset: int  # where its first slice starts in the file
    newlines: int  # newlines before it (errors name the file's line numbers)
    before: int  # records of the file before it (a JSON array's errors name the record)
    slices: int  # -1: the REST of the source from here (where the splitter stopped)
    row: int  # the source's row number of its first record
    records: int
    bytes: int  # of the file it spans


def cuttable(source: SourcePlan) -> bool:
    """Whether `source` is read in slices a unit can start at: JSON Lines or JSON arrays
    (not read whole: joins, group_by, json_key)."""
    return source.streamable and source.container is None and all(f in ("jsonl", "json") for f in source.formats)


def cut_units(source: SourcePlan, rows: int, budget: int) -> Iterator[Unit]:
    """The units of a `cuttable` source read `rows` records a slice, each at most
    `budget` bytes of its file where a slice allows, as the files are read (a caller
    starts on the first before the last is found). At a slice the splitter refuses, the
    last unit is the REST of the source from there (`slices` -1): its read then gives the
    error, naming the line, as the local build's read does. Nothing for a source without
    records (whose whole read gives that error)."""
    row = 0
    for index, (path, fmt) in enumerate(zip(source.files, source.formats)):
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


def read_unit(source: SourcePlan, unit: Unit, rows: int) -> Iterator[pl.DataFrame]:
    """The slices of `unit`, as `read_slices` gives them (a REST unit: every slice from
    its start on, through the source's later files)."""
    path, fmt = source.files[unit.file], source.formats[unit.file]
    at = (unit.offset, unit.newlines, unit.before)
    yield from json_frames(source.name, path, fmt, rows, None if unit.slices < 0 else unit.slices, at)
    if unit.slices < 0:
        for path, fmt in zip(source.files[unit.file + 1:], source.formats[unit.file + 1:]):
            yield from json_frames(source.name, path, fmt, rows)
