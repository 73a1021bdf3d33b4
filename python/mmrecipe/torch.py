"""PyTorch access to a release: a map-style `PackedDataset` that reads shards lazily
(memory-mapped Parquet, one row group decoded at a time) and `collate`, which returns the
batch contract: `input_ids`, `labels` (-100 off the responses and on each segment's first
token), `position_ids` restarting per segment, `segment_ids`, `attention_mask`,
`cu_seqlens`/`max_seqlen` for FlashAttention varlen, and per-row image records.
`collate(..., flatten=True)` gives the padding-free form of transformers'
`DataCollatorWithFlattening` instead. `ReleaseSampler` splits a release across the ranks
of a distributed job and resumes mid-epoch."""

from __future__ import annotations

import bisect
from pathlib import Path
from typing import Any, Iterator, Sequence, Sized

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset, Sampler

from .release.format import read_manifest

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
        shifts: Any = np.concatenate([[0], np.cumsum([len(b["input_ids"]) for b in batch])[:-1]]) if batch else []
        seg_offset: Any = np.concatenate([[0], np.cumsum([len(b["segment_lengths"]) for b in batch])[:-1]]) if batch else []
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


class ReleaseSampler(Sampler[int]):
    """The indices of one rank of a distributed job. Every epoch is a permutation of the
    release drawn from (seed, epoch) alone, so all ranks agree on it without talking; rank
    r takes positions r, r + world_size, ... of it. With `drop_last` the tail that does not
    divide evenly is left out, so the ranks' slices are disjoint and equally long; without
    it the permutation wraps around to fill the last round (a few samples twice), as
    `DistributedSampler` does.

    Call `set_epoch(epoch)` before each epoch. `state_dict()` records the epoch and how many
    indices this sampler has yielded in it; `load_state_dict()` makes the next iteration
    yield exactly the rest. A DataLoader fetches indices ahead of the batches it has handed
    out (prefetching, worker queues), so to resume at a training step, save
    `{**sampler.state_dict(), "yielded": batches_done_this_epoch * batch_size}` rather than the sampler's
    own count."""

    def __init__(
        self,
        dataset: Sized | int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ):
        size = dataset if isinstance(dataset, int) else len(dataset)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1} (world_size {world_size})")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, not {seed}")
        self.size, self.rank, self.world_size = size, rank, world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.num_samples = size // world_size if drop_last else -(-size // world_size)
        self.epoch = 0
        self.yielded = 0

    def set_epoch(self, epoch: int) -> None:
        # Setting the epoch already in progress keeps the position, so a resumed run can
        # call set_epoch at the top of its loop like any other.
        if epoch != self.epoch:
            self.epoch, self.yielded = epoch, 0

    def indices(self) -> list[int]:
        """All of this rank's indices for the current epoch."""
        if self.shuffle:
            # One independent stream per (seed, epoch): no two pairs collide.
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.size).tolist()
        else:
            order = list(range(self.size))
        total = self.num_samples * self.world_size
        if total > len(order) and order:
            order += (order * (total // len(order) + 1))[: total - len(order)]
        return order[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[int]:
        if self.yielded >= self.num_samples:  # a finished epoch iterated again starts over
            self.yielded = 0
        for index in self.indices()[self.yielded :]:
            self.yielded += 1
            yield index

    def __len__(self) -> int:
        return self.num_samples

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "yielded": self.yielded, "seed": self.seed, "world_size": self.world_size, "size": self.size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # A different seed, world size or release would put other samples at each position.
        for key in ("seed", "world_size", "size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"cannot resume: the saved {key} is {state[key]}, this sampler's is {getattr(self, key)}")
        self.epoch, self.yielded = int(state["epoch"]), int(state["yielded"])


def dataloader(
    release: str | Path,
    batch_size: int = 8,
    flatten: bool = False,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> torch.utils.data.DataLoader:
    """A DataLoader over a release with the right collate function. Given `rank` and
    `world_size`, it reads through a `ReleaseSampler` (shuffled unless `shuffle=False`,
    drop_last) reachable as `loader.sampler`: call `loader.sampler.set_epoch(epoch)`."""
    ds = PackedDataset(release)
    if (rank is None) != (world_size is None):
        raise ValueError("give both rank and world_size, or neither")
    if world_size is not None:
        shuffle = kwargs.pop("shuffle", True)
        kwargs["sampler"] = ReleaseSampler(ds, rank=int(rank or 0), world_size=world_size, seed=seed, shuffle=shuffle)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=Collator(ds.pad_token_id, flatten), **kwargs)
