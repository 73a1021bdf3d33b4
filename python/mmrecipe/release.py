"""Release directories: packed shards, `manifest.json` and `stats.json`, written into a
hidden folder beside the destination and renamed into place only once complete."""

from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import ReleaseError
from .hashing import file_sha256

FORMAT = "mmrecipe-release/1"
MANIFEST = "manifest.json"
STATS = "stats.json"
DATA = "data"
ROW_GROUP = 256


class InputFile(msgspec.Struct):
    role: str
    path: str
    sha256: str
    bytes: int


class Shard(msgspec.Struct):
    path: str
    sha256: str
    sequences: int
    tokens: int


class Manifest(msgspec.Struct):
    format: str
    mmrecipe_version: str
    name: str
    version: str
    seed: int
    recipe: dict[str, Any]
    inputs: list[InputFile]
    sources: list[str]
    chat_template: str
    seq_len: int
    pad_token_id: int
    shards: list[Shard]
    totals: dict[str, Any]
    release_id: str = ""


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


def shard_table(p: dict[str, Any], lo: int, hi: int) -> pa.Table:
    """Packed rows lo..hi as an Arrow table (one row per packed sequence)."""
    ro, so, io = p["row_offsets"], p["segment_offsets"], p["image_offsets"]
    return pa.table(
        {
            "input_ids": _list(ro, p["input_ids"], lo, hi, pa.uint32()),
            "loss_mask": _list(ro, p["loss_mask"], lo, hi, pa.uint8()),
            "segment_lengths": _list(so, p["segment_lengths"], lo, hi, pa.uint32()),
            "segment_source": _list(so, p["segment_source"], lo, hi, pa.uint16()),
            "segment_row": _list(so, p["segment_row"], lo, hi, pa.uint64()),
            "segment_part": _list(so, p["segment_part"], lo, hi, pa.uint16()),
            "segment_template": _list(so, p["segment_template"], lo, hi, pa.int32()),
            "segment_repeat": _list(so, p["segment_repeat"], lo, hi, pa.uint32()),
            "segment_images": _list(so, p["segment_images"], lo, hi, pa.uint32()),
            "image_positions": _list(io, p["image_positions"], lo, hi, pa.uint32()),
            "image_lengths": _list(io, p["image_lengths"], lo, hi, pa.uint32()),
            "image_paths": _string_list(io, p["image_path_offsets"], p["image_path_data"], lo, hi),
        }
    )


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


def write_shards(folder: Path, emit: Callable[[int, int], dict[str, Any]], rows: int, per_shard: int, progress: Any = None) -> list[Shard]:
    """Writes rows 0..rows into shards of `per_shard` rows, one row group at a time from
    `emit(lo, hi)`, so memory stays at one row group whatever the shard size."""
    data = folder / DATA
    data.mkdir()
    shards = []
    for k, lo in enumerate(range(0, max(rows, 1), per_shard)):
        hi = min(rows, lo + per_shard)
        name = f"{DATA}/part-{k:05d}.parquet"
        tokens = 0
        writer = None
        for g in range(lo, max(hi, lo + 1), ROW_GROUP):
            packed = emit(g, min(hi, g + ROW_GROUP))
            table = shard_table(packed, 0, len(packed["row_offsets"]) - 1)
            if writer is None:
                writer = pq.ParquetWriter(
                    folder / name, table.schema, compression="zstd", write_statistics=False,
                    use_dictionary=["image_paths"],  # token ids gain nothing from a dictionary
                )
            writer.write_table(table, row_group_size=ROW_GROUP)
            tokens += int(packed["row_offsets"][-1])
            if progress is not None:
                progress.update(table.num_rows)
        assert writer is not None
        writer.close()
        shards.append(Shard(path=name, sha256=file_sha256(folder / name), sequences=hi - lo, tokens=tokens))
    return shards


def write_json(path: Path, value: Any) -> None:
    path.write_bytes(msgspec.json.format(msgspec.json.encode(value), indent=2) + b"\n")


def read_manifest(release: str | Path) -> Manifest:
    path = Path(release) / MANIFEST
    if not path.is_file():
        raise ReleaseError(f"{release} is not a release: no {MANIFEST}")
    try:
        return msgspec.json.decode(path.read_bytes(), type=Manifest)
    except msgspec.DecodeError as e:
        raise ReleaseError(f"{path}: not a valid manifest: {e}") from None


def read_stats(release: str | Path) -> dict[str, Any]:
    return json.loads((Path(release) / STATS).read_text("utf-8"))
