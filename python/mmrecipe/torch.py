"""PyTorch access to a release: a map-style `PackedDataset` that reads shards lazily
(memory-mapped Parquet, one row group decoded at a time) and `collate`, which returns the
batch contract: `input_ids`, `labels` (-100 off the responses and on each segment's first
token), `position_ids` restarting per segment, `segment_ids`, `attention_mask`,
`cu_seqlens`/`max_seqlen` for FlashAttention varlen, and per-row image records.
`collate(..., flatten=True)` gives the padding-free form of transformers'
`DataCollatorWithFlattening` instead."""

from __future__ import annotations

import bisect
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from .release import read_manifest

IGNORE_INDEX = -100


class PackedDataset(Dataset):
    """One item per packed sequence of a release."""

    def __init__(self, release: str | Path):
        self.root = Path(release)
        self.manifest = read_manifest(self.root)
        self.pad_token_id = self.manifest.pad_token_id
        self.seq_len = self.manifest.seq_len
        self._groups: list[tuple[int, int]] = []  # (shard, row group)
        starts = [0]
        for s, shard in enumerate(self.manifest.shards):
            meta = pq.ParquetFile(self.root / shard.path).metadata
            for g in range(meta.num_row_groups):
                self._groups.append((s, g))
                starts.append(starts[-1] + meta.row_group(g).num_rows)
        self._starts = starts
        self._files: dict[int, pq.ParquetFile] = {}
        self._cached: tuple[int, dict[str, Any]] | None = None

    def __len__(self) -> int:
        return self._starts[-1]

    def _group(self, g: int) -> dict[str, Any]:
        if self._cached is not None and self._cached[0] == g:
            return self._cached[1]
        shard, group = self._groups[g]
        if shard not in self._files:
            self._files[shard] = pq.ParquetFile(self.root / self.manifest.shards[shard].path, memory_map=True)
        table = self._files[shard].read_row_group(group)
        cols: dict[str, Any] = {}
        for name in table.column_names:
            arr = table.column(name).combine_chunks()
            offsets = arr.offsets.to_numpy()
            values = arr.values.to_numpy(zero_copy_only=False)
            cols[name] = (offsets, values)
        self._cached = (g, cols)
        return cols

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        g = bisect.bisect_right(self._starts, index) - 1
        cols = self._group(g)
        i = index - self._starts[g]

        def get(name: str) -> Any:
            offsets, values = cols[name]
            return values[offsets[i] : offsets[i + 1]]

        return {
            "input_ids": get("input_ids").astype(np.int64),
            "loss_mask": get("loss_mask").astype(bool),
            "segment_lengths": get("segment_lengths").astype(np.int64),
            "image_positions": get("image_positions").astype(np.int64),
            "image_lengths": get("image_lengths").astype(np.int64),
            "image_paths": list(get("image_paths")),
            "segment_source": get("segment_source").astype(np.int64),
            "segment_row": get("segment_row").astype(np.int64),
        }


def _row_arrays(item: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """labels, position_ids and segment_ids (from 1) of one packed row."""
    ids = item["input_ids"]
    lengths = item["segment_lengths"]
    labels = np.where(item["loss_mask"], ids, IGNORE_INDEX)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    labels[starts] = IGNORE_INDEX
    seg = np.repeat(np.arange(1, len(lengths) + 1), lengths)
    pos = np.arange(len(ids)) - np.repeat(starts, lengths)
    return labels, pos, seg


def _images(item: dict[str, Any], shift: int = 0) -> list[dict[str, Any]]:
    return [
        {"path": p, "position": int(pos) + shift, "length": int(n)}
        for p, pos, n in zip(item["image_paths"], item["image_positions"], item["image_lengths"])
    ]


def collate(
    batch: Sequence[dict[str, Any]], pad_token_id: int = 0, flatten: bool = False, pad_to: int | None = None
) -> dict[str, Any]:
    """Turns dataset items into the batch contract (see the module docstring)."""
    lengths_all = np.concatenate([b["segment_lengths"] for b in batch]) if batch else np.zeros(0, np.int64)
    cu = np.zeros(len(lengths_all) + 1, dtype=np.int32)
    np.cumsum(lengths_all, out=cu[1:])
    max_seqlen = int(lengths_all.max()) if len(lengths_all) else 0
    per_row = [_row_arrays(b) for b in batch]
    if flatten:
        shifts = np.concatenate([[0], np.cumsum([len(b["input_ids"]) for b in batch])[:-1]]) if batch else []
        seg_offset = np.concatenate([[0], np.cumsum([len(b["segment_lengths"]) for b in batch])[:-1]]) if batch else []
        return {
            "input_ids": torch.from_numpy(np.concatenate([b["input_ids"] for b in batch]))[None],
            "labels": torch.from_numpy(np.concatenate([r[0] for r in per_row]))[None],
            "position_ids": torch.from_numpy(np.concatenate([r[1] for r in per_row]))[None],
            "segment_ids": torch.from_numpy(np.concatenate([r[2] + o for r, o in zip(per_row, seg_offset)]))[None],
            "cu_seqlens": torch.from_numpy(cu),
            "max_seqlen": max_seqlen,
            "images": [img for b, s in zip(batch, shifts) for img in _images(b, int(s))],
        }
    width = pad_to or max((len(b["input_ids"]) for b in batch), default=0)
    n = len(batch)
    input_ids = np.full((n, width), pad_token_id, dtype=np.int64)
    labels = np.full((n, width), IGNORE_INDEX, dtype=np.int64)
    position_ids = np.zeros((n, width), dtype=np.int64)
    segment_ids = np.zeros((n, width), dtype=np.int64)
    attention_mask = np.zeros((n, width), dtype=np.int64)
    for r, (b, (lab, pos, seg)) in enumerate(zip(batch, per_row)):
        k = len(b["input_ids"])
        if k > width:
            raise ValueError(f"row of {k} tokens does not fit pad_to={width}")
        input_ids[r, :k] = b["input_ids"]
        labels[r, :k] = lab
        position_ids[r, :k] = pos
        segment_ids[r, :k] = seg
        attention_mask[r, :k] = 1
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(position_ids),
        "segment_ids": torch.from_numpy(segment_ids),
        "attention_mask": torch.from_numpy(attention_mask),
        "cu_seqlens": torch.from_numpy(cu),
        "max_seqlen": max_seqlen,
        "images": [_images(b) for b in batch],
    }


class Collator:
    """A picklable collate function bound to a release's pad token."""

    def __init__(self, pad_token_id: int, flatten: bool = False, pad_to: int | None = None):
        self.pad_token_id, self.flatten, self.pad_to = pad_token_id, flatten, pad_to

    def __call__(self, batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return collate(batch, self.pad_token_id, self.flatten, self.pad_to)


def dataloader(release: str | Path, batch_size: int = 8, flatten: bool = False, **kwargs: Any) -> torch.utils.data.DataLoader:
    """A DataLoader over a release with the right collate function."""
    ds = PackedDataset(release)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=Collator(ds.pad_token_id, flatten), **kwargs)
