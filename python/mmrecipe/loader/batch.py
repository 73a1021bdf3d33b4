"""`Batch`: a dict of exactly the keyword arguments a transformers model's forward takes,
so that `model(**batch)` is right with default arguments; the loader's own fields
(segment ids, padding, image records, ...) are attributes, never passed to the model.

The int64 tensors of a batch are views of one buffer, and a batch pickles as that buffer
plus the layout of its views: from a DataLoader worker it reaches the main process as one
block of bytes (one shared-memory block when large; pixels go as shared memory), not as
one shared-memory block per tensor, whose setup costs more than copying a small buffer."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

# Token buffers up to this size travel as bytes through the worker's pipe; larger ones, like
# pixels, as shared memory.
INLINE_BYTES = 4 << 20

# The loader's own fields, readable as attributes (and, for code written against the
# batch contract before `model(**batch)`, as `batch[name]`).
FIELDS = ("segment_ids", "padding_mask", "cu_seqlens", "max_seqlen", "images", "rows", "skipped", "audio", "videos")

NO_2D_MASK = ("packed rows carry no 2-D attention_mask: given to a transformers model it switches off "
              "packed-sequence detection and attention crosses segments. Padding is batch.padding_mask; "
              "dataloader(..., attention='4d') gives a block-diagonal 4-D mask")


class Batch(dict):
    """Model inputs as items; `segment_ids` (1, 2, ... per segment, 0 on padding),
    `padding_mask` (1 on tokens), `cu_seqlens`/`max_seqlen`, `images` (records per row),
    `rows` (release rows), `skipped` (release rows left out), `audio` (clip records
    per row) and `videos` (video records per row) as attributes."""

    segment_ids: Any
    padding_mask: Any
    cu_seqlens: Any
    max_seqlen: Any
    images: Any
    rows: Any
    skipped: Any
    audio: Any
    videos: Any

    def __init__(self, items: dict[str, Any] | None = None, **fields: Any):
        super().__init__(items or {})
        for name in FIELDS:
            setattr(self, name, fields.get(name))
        self._layout: dict[str, tuple[bool, int, tuple[int, ...], str]] = {}
        self._buffer: torch.Tensor | None = None

    def __missing__(self, key: str) -> Any:
        if key in FIELDS and getattr(self, key, None) is not None:
            return getattr(self, key)
        if key == "attention_mask":
            raise KeyError(NO_2D_MASK)
        raise KeyError(key)

    def to(self, device: Any, non_blocking: bool = False) -> "Batch":
        """A copy with every tensor (items and fields) on `device`."""
        def move(v: Any) -> Any:
            return v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v

        return Batch({k: move(v) for k, v in self.items()}, **{n: move(getattr(self, n)) for n in FIELDS})

    def __reduce__(self) -> Any:
        if self._buffer is None:
            return (_rebuild, (dict(self), {n: getattr(self, n) for n in FIELDS}, None, {}))
        items = {k: v for k, v in self.items() if k not in self._layout}
        fields = {n: getattr(self, n) for n in FIELDS if n not in self._layout}
        buffer = self._buffer
        inline = buffer.numpy() if buffer.nbytes <= INLINE_BYTES else buffer
        return (_rebuild, (items, fields, inline, self._layout))


def _rebuild(items: dict[str, Any], fields: dict[str, Any], buffer: Any, layout: dict[str, Any]) -> Batch:
    batch = Batch(items, **fields)
    if buffer is not None:
        _attach(batch, torch.from_numpy(buffer) if isinstance(buffer, np.ndarray) else buffer, layout)
    return batch


def _attach(batch: Batch, buffer: torch.Tensor, layout: dict[str, tuple[bool, int, tuple[int, ...], str]]) -> None:
    for name, (is_item, offset, shape, dtype) in layout.items():
        size = int(np.prod(shape)) if shape else 1
        view = buffer[offset : offset + size].view(shape)
        if dtype != "int64":
            view = view.to(getattr(torch, dtype))
        if is_item:
            dict.__setitem__(batch, name, view)
        else:
            setattr(batch, name, view)
    batch._buffer, batch._layout = buffer, layout


def packed(arrays: dict[str, tuple[bool, np.ndarray, str]], items: dict[str, Any], fields: dict[str, Any]) -> Batch:
    """A batch whose int arrays (name -> (is model input, array, torch dtype)) are views of
    one int64 buffer."""
    layout: dict[str, tuple[bool, int, tuple[int, ...], str]] = {}
    offset = 0
    for name, (is_item, arr, dtype) in arrays.items():
        layout[name] = (is_item, offset, tuple(arr.shape), dtype)
        offset += arr.size
    flat = np.empty(offset, dtype=np.int64)
    for name, (_, arr, _) in arrays.items():
        _, at, _, _ = layout[name]
        flat[at : at + arr.size] = arr.reshape(-1)
    batch = Batch(items, **fields)
    _attach(batch, torch.from_numpy(flat), layout)
    return batch
