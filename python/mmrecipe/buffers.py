"""Whole columns as the flat buffers the Rust core reads: Arrow layouts viewed as NumPy
arrays without copying the data."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa


def string_buffers(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets int64, utf-8 bytes) of a string array, honoring its slice offset."""
    arr = arr.cast(pa.large_string())
    if arr.null_count:
        raise ValueError("null in a string column passed to the core")
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int64)[arr.offset : arr.offset + len(arr) + 1] if bufs[1] else np.zeros(1, np.int64)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    return offsets, data


def binary_buffers(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets int64, bytes) of a binary array (nulls as empty entries)."""
    arr = arr.cast(pa.large_binary())
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
