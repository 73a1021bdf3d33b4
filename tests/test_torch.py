"""The PyTorch side: the batch contract of DESIGN.md through a real DataLoader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmrecipe.torch import IGNORE_INDEX, PackedDataset, ReleaseSampler, collate, dataloader


def test_dataloader_batch_contract(demo_release):
    ds = PackedDataset(demo_release)
    loader = dataloader(demo_release, batch_size=4, num_workers=2)
    batch = next(iter(loader))
    b = min(4, len(ds))
    # Only model inputs are items: model(**batch) gets nothing else.
    assert set(batch) == {"input_ids", "labels", "position_ids", "use_cache"} and batch["use_cache"] is False
    for key in ("input_ids", "labels", "position_ids"):
        assert batch[key].dtype == torch.int64, key
        assert batch[key].shape == batch["input_ids"].shape, key
    for t in (batch.segment_ids, batch.padding_mask):
        assert t.dtype == torch.int64 and t.shape == batch["input_ids"].shape
    assert batch["input_ids"].shape[0] == b and batch["input_ids"].shape[1] <= ds.seq_len
    assert batch.cu_seqlens.dtype == torch.int32
    assert isinstance(batch.max_seqlen, int)
    assert len(batch.images) == b and batch.rows == list(range(b))
    # cu_seqlens covers exactly the non-padding tokens, segment by segment.
    assert int(batch.cu_seqlens[-1]) == int(batch.padding_mask.sum())
    lengths = batch.cu_seqlens.diff()
    assert int(lengths.max()) == batch.max_seqlen
    for r in range(b):
        pos = batch["position_ids"][r]
        seg = batch.segment_ids[r]
        n = int(batch.padding_mask[r].sum())
        starts = torch.nonzero(pos[:n] == 0).flatten()
        assert starts.tolist() == torch.nonzero(torch.diff(seg[:n], prepend=torch.tensor([0])) != 0).flatten().tolist()
        # The first token of every segment and all padding are unlabelled.
        assert (batch["labels"][r][starts] == IGNORE_INDEX).all()
        assert (batch["labels"][r][n:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][r][n:] == ds.pad_token_id).all()
        lab = batch["labels"][r][:n]
        trained = lab != IGNORE_INDEX
        assert trained.any() and (lab[trained] == batch["input_ids"][r][:n][trained]).all()
        for img in batch.images[r]:
            run = batch["labels"][r][img["position"] : img["position"] + img["length"]]
            assert len(run) == img["length"] > 0 and (run == IGNORE_INDEX).all()


def test_flattened_form_matches_padded(demo_release):
    ds = PackedDataset(demo_release)
    items = [ds[i] for i in range(min(3, len(ds)))]
    padded = collate(items, pad_token_id=ds.pad_token_id)
    flat = collate(items, pad_token_id=ds.pad_token_id, flatten=True)
    keep = padded.padding_mask.bool()
    assert flat["input_ids"].shape == (1, int(keep.sum()))
    assert torch.equal(flat["input_ids"][0], padded["input_ids"][keep])
    assert torch.equal(flat["labels"][0], padded["labels"][keep])
    assert torch.equal(flat["position_ids"][0], padded["position_ids"][keep])
    assert torch.equal(flat["cu_seq_lens_q"], padded.cu_seqlens) and torch.equal(flat["cu_seq_lens_k"], padded.cu_seqlens)
    assert flat["max_length_q"] == flat["max_length_k"] == padded.max_seqlen
    assert len(flat.images) == sum(len(r) for r in padded.images)
    offsets = [0] + torch.cumsum(keep.sum(1), 0).tolist()
    shifted = [{**rec, "position": rec["position"] + offsets[r], "row": r} for r, row in enumerate(padded.images) for rec in row]
    assert flat.images == shifted


def test_dataset_indexing(demo_release):
    ds = PackedDataset(demo_release)
    assert len(ds) > 0
    assert np.array_equal(ds[-1]["input_ids"], ds[len(ds) - 1]["input_ids"])
    with pytest.raises(IndexError):
        ds[len(ds)]


@pytest.mark.parametrize("size,world_size", [(31, 4), (100, 3), (8, 8), (5, 1)])
def test_sampler_ranks_are_disjoint_and_equal(size, world_size):
    for epoch in (0, 1):
        parts = []
        for rank in range(world_size):
            sampler = ReleaseSampler(size, rank=rank, world_size=world_size, seed=3)
            sampler.set_epoch(epoch)
            parts.append(list(sampler))
            assert len(parts[-1]) == len(sampler) == size // world_size
        flat = [i for p in parts for i in p]
        assert len(set(flat)) == len(flat)  # disjoint
        assert set(flat) <= set(range(size))


def test_sampler_is_deterministic_per_epoch_and_differs_across_epochs():
    def epoch_of(epoch: int, seed: int = 7, rank: int = 1) -> list[int]:
        s = ReleaseSampler(100, rank=rank, world_size=4, seed=seed)
        s.set_epoch(epoch)
        return list(s)

    assert epoch_of(0) == epoch_of(0) and epoch_of(5) == epoch_of(5)
    assert epoch_of(0) != epoch_of(1)
    assert epoch_of(0, seed=7) != epoch_of(0, seed=8)
    # Unshuffled, a rank reads every world_size-th index in order.
    assert list(ReleaseSampler(10, rank=1, world_size=3, shuffle=False)) == [1, 4, 7]
    # Without drop_last the last round wraps around: every index is read, all ranks equal.
    parts = [list(ReleaseSampler(10, rank=r, world_size=3, seed=1, drop_last=False)) for r in range(3)]
    assert [len(p) for p in parts] == [4, 4, 4] and set(sum(parts, [])) == set(range(10))
    with pytest.raises(ValueError):
        ReleaseSampler(10, rank=3, world_size=3)


def test_sampler_resumes_mid_epoch():
    full = ReleaseSampler(50, rank=1, world_size=2, seed=11)
    full.set_epoch(2)
    expected = list(full)
    first = ReleaseSampler(50, rank=1, world_size=2, seed=11)
    first.set_epoch(2)
    it = iter(first)
    head = [next(it) for _ in range(9)]
    state = first.state_dict()
    assert state["epoch"] == 2 and state["yielded"] == 9

    resumed = ReleaseSampler(50, rank=1, world_size=2, seed=11)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # a training loop calls this at the top of the resumed epoch
    assert head + list(resumed) == expected
    assert list(resumed) == expected  # the next pass over the same epoch starts over
    resumed.set_epoch(3)
    assert resumed.state_dict()["yielded"] == 0
    with pytest.raises(ValueError, match="world_size"):
        ReleaseSampler(50, rank=0, world_size=4, seed=11).load_state_dict(state)


def test_distributed_dataloader_with_workers(demo_release):
    ds = PackedDataset(demo_release)
    seen = []
    for rank in range(2):
        loader = dataloader(demo_release, batch_size=2, rank=rank, world_size=2, seed=5, num_workers=2)
        assert isinstance(loader.sampler, ReleaseSampler)
        loader.sampler.set_epoch(1)
        order = loader.sampler.indices()
        rows = [row for batch in loader for row in batch["input_ids"]]
        assert len(rows) == len(ds) // 2
        # The batches hold exactly the rows the sampler named, in its order.
        for row, index in zip(rows, order):
            n = len(ds[index]["input_ids"])
            assert torch.equal(row[:n], torch.from_numpy(ds[index]["input_ids"]))
        seen += order
    assert len(set(seen)) == len(seen) == 2 * (len(ds) // 2)
