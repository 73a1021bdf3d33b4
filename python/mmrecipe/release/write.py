"""Writing a release: packed shards from the core's emitted columns, one row group at a
time, into a hidden folder beside the destination that is renamed into place only once
complete (a reader never sees a half-written release)."""

from __future__ import annotations

import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import _core
from ..errors import ReleaseError
from ..hashing import file_sha256
from .format import AUDIO_COLUMNS, COLUMNS, DATA, OFFSETS, ROW_GROUP, VIDEO_COLUMNS, Shard


def _list(offsets: np.ndarray, values: np.ndarray, lo: int, hi: int, value_type: pa.DataType) -> pa.Array:
    off = offsets[lo : hi + 1]
    vals = values[off[0] : off[-1]]
    return pa.ListArray.from_arrays(pa.array((off - off[0]).astype(np.int32)), pa.array(vals, type=value_type))


def _string_list(offsets: np.ndarray, str_offsets: np.ndarray, data: np.ndarray, lo: int, hi: int) -> pa.Array:
    off = offsets[lo : hi + 1]
    s_off = str_offsets[off[0] : off[-1] + 1]
    strings = pa.LargeStringArray.from_buffers(
        len(s_off) - 1, pa.py_buffer((s_off - s_off[0]).astype(np.int64)), pa.py_buffer(data[s_off[0] : s_off[-1]].tobytes())
    )
    return pa.ListArray.from_arrays(pa.array((off - off[0]).astype(np.int32)), strings.cast(pa.string()))


def shard_table(p: dict[str, Any], lo: int, hi: int, audio: bool = False, video: bool = False) -> pa.Table:
    """Packed rows lo..hi of the core's emitted columns as an Arrow table (one row per
    packed sequence, the columns of `format.COLUMNS`, with `audio` the AUDIO_COLUMNS and
    with `video` the VIDEO_COLUMNS)."""
    table = {}
    for col in COLUMNS + (AUDIO_COLUMNS if audio else ()) + (VIDEO_COLUMNS if video else ()):
        offsets = p[OFFSETS[col.per]]
        if col.type == pa.string():
            table[col.name] = _string_list(offsets, p[f"{col.name[:-1]}_offsets"], p[f"{col.name[:-1]}_data"], lo, hi)
        else:
            table[col.name] = _list(offsets, p[col.name], lo, hi, col.type)
    return pa.table(table)


@contextmanager
def staging(out: Path, overwrite: bool) -> Iterator[Path]:
    """A hidden folder beside `out` to write into; renamed to `out` when the block ends
    without error, removed otherwise. A reader never sees a half-written release."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ReleaseError(f"{out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def spill_prefix(out: Path) -> str:
    """The prefix of the build's spill folder beside `out` (with the pid, so that a later
    build can tell it is stale)."""
    return f".{out.name}.spill-{os.getpid()}-"


def remove_stale(out: Path) -> None:
    """Removes what a killed build of `out` left beside it: its partial release, spill
    folder or replaced release, when the process that made them is gone."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(partial|old|spill)-(\d+)(-.*)?$")
    for entry in out.parent.iterdir():
        m = pattern.match(entry.name)
        if m and not _alive(int(m.group(2))):
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def shard_ranges(rows: int, per_shard: int) -> list[tuple[str, int, int]]:
    """(name, first row, end row) of each shard of rows 0..rows (one empty shard for none)."""
    starts = range(0, max(rows, 1), per_shard)
    return [(f"{DATA}/part-{k:05d}.parquet", lo, min(rows, lo + per_shard)) for k, lo in enumerate(starts)]


def row_groups(emit: Callable[[int, int], dict[str, Any]], lo: int, hi: int, audio: bool = False,
               video: bool = False) -> Iterator[tuple[pa.Table, int]]:
    """Rows lo..hi, a row group at a time from `emit(lo, hi)`: each as a table, with its tokens."""
    for g in range(lo, max(hi, lo + 1), ROW_GROUP):
        packed = emit(g, min(hi, g + ROW_GROUP))
        yield shard_table(packed, 0, len(packed["row_offsets"]) - 1, audio, video), int(packed["row_offsets"][-1])


def _writer(path: Path, schema: pa.Schema, audio: bool, video: bool) -> pq.ParquetWriter:
    return pq.ParquetWriter(
        path, schema, compression="zstd", write_statistics=False,
        # token ids gain nothing from a dictionary
        use_dictionary=["image_paths", *(["audio_paths"] if audio else []), *(["video_paths"] if video else [])],
    )


def write_shards(folder: Path, emit: Callable[[int, int], dict[str, Any]], rows: int, per_shard: int, progress: Any = None,
                 audio: bool = False, video: bool = False) -> list[Shard]:
    """Writes rows 0..rows into shards of `per_shard` rows, one row group at a time from
    `emit(lo, hi)`, so memory stays at one row group whatever the shard size; `audio`: with
    the audio columns; `video`: with the video columns."""
    (folder / DATA).mkdir()
    shards = []
    for name, lo, hi in shard_ranges(rows, per_shard):
        tokens = 0
        writer = None
        for table, n in row_groups(emit, lo, hi, audio, video):
            if writer is None:
                writer = _writer(folder / name, table.schema, audio, video)
            writer.write_table(table, row_group_size=ROW_GROUP)
            tokens += n
            if progress is not None:
                progress.update(table.num_rows)
        assert writer is not None
        writer.close()
        shards.append(Shard(path=name, sha256=file_sha256(folder / name), sequences=hi - lo, tokens=tokens))
    return shards


def write_shard_file(path: str, tables: Iterable[pa.Table], audio: bool = False, video: bool = False) -> str:
    """One shard from its row groups' tables, the very bytes `write_shards` writes (where a
    cluster task writes it): written beside its name and renamed into place, so that running
    it again gives the same file. Returns its sha256."""
    target = Path(path)
    part = target.with_name(f".{target.name}.{os.getpid()}.part")
    writer = None
    try:
        for table in tables:
            if writer is None:
                writer = _writer(part, table.schema, audio, video)
            writer.write_table(table, row_group_size=ROW_GROUP)
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        raise ReleaseError(f"shard {target.name}: no row group to write")
    os.replace(part, target)
    return file_sha256(target)


def write_planned_shard(path: str, plan: bytes, audio: bool = False, video: bool = False) -> tuple[str, int]:
    """The shard `plan` (`Compiler.shard_plan`) describes, its rows emitted here from the
    token files the plan names (what a cluster task runs): the bytes `write_shards` writes
    for those rows, written as `write_shard_file` writes them. Returns (sha256, tokens)."""
    emitter = _core.ShardEmitter(plan)
    tokens = [0]

    def tables() -> Iterator[pa.Table]:
        for table, n in row_groups(emitter.emit, 0, emitter.rows(), audio, video):
            tokens[0] += n
            yield table

    return write_shard_file(path, tables(), audio, video), tokens[0]


def write_json(path: Path, value: Any) -> None:
    path.write_bytes(msgspec.json.format(msgspec.json.encode(value), indent=2) + b"\n")
