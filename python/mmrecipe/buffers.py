"""Whole columns as the flat buffers the Rust core reads: Arrow layouts viewed as NumPy
arrays without copying the data."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import polars as pl
import pyarrow as pa

from .sources import CONTENTS, IMAGES, ROLES, ROW, Normalized

if TYPE_CHECKING:
    from ._core import _BatchColumns


def string_buffers(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets int64, utf-8 bytes) of a string array, honoring its slice offset."""
    arr = arr.cast(pa.large_string())
    if arr.null_count:
        raise ValueError("null in a string column passed to the core")
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int64)[arr.offset : arr.offset + len(arr) + 1] if bufs[1] else np.zeros(1, np.int64)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    return offsets, data


def arrow(series: pl.Series) -> pa.Array:
    """A polars column as one contiguous Arrow array."""
    out = series.to_arrow(compat_level=pl.CompatLevel.oldest())
    return out.combine_chunks() if isinstance(out, pa.ChunkedArray) else out


def strings(offsets: np.ndarray, data: np.ndarray) -> pa.Array:
    """A large string array over (offsets, utf-8 bytes) as the core returns them."""
    return pa.LargeStringArray.from_buffers(len(offsets) - 1, pa.py_buffer(offsets), pa.py_buffer(data))


def _list_parts(series: pl.Series) -> tuple[np.ndarray, pa.Array]:
    """(offsets starting at 0, flattened values) of a list column."""
    lengths = series.list.len().fill_null(0).to_numpy().astype(np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets, arrow(series).flatten()


def batch_arguments(norm: Normalized, start: int, length: int) -> _BatchColumns:
    """The columns argument of `Compiler.add_batch` (and `preview_batch`) for rows
    start..start+length of a normalized source: NumPy arrays by name, and `fields` as
    (offsets, bytes) per template field in the plan's order."""
    part = norm.frame.slice(start, length)
    turn_offsets, contents = _list_parts(part[CONTENTS])
    _, roles = _list_parts(part[ROLES])
    content_offsets, content_data = string_buffers(contents)
    image_offsets, images = _list_parts(part[IMAGES])
    image_path_offsets, image_path_data = string_buffers(images)
    return {
        "rows": part[ROW].to_numpy().astype(np.uint64, copy=False),
        "turn_offsets": turn_offsets,
        "roles": np.asarray(roles.to_numpy(zero_copy_only=False), dtype=np.uint8),
        "content_offsets": content_offsets,
        "content_data": content_data,
        "image_offsets": image_offsets,
        "image_path_offsets": image_path_offsets,
        "image_path_data": image_path_data,
        "fields": [string_buffers(arrow(part[f"__t_{name}"])) for name in norm.field_names],
    }
