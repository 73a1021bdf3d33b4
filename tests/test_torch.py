"""The PyTorch side: the batch contract of DESIGN.md through a real DataLoader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmrecipe.torch import IGNORE_INDEX, PackedDataset, collate, dataloader


def test_dataloader_batch_contract(demo_release):
    ds = PackedDataset(demo_release)
    loader = dataloader(demo_release, batch_size=4, num_workers=2)
    batch = next(iter(loader))
    b = min(4, len(ds))
    for key in ("input_ids", "labels", "position_ids", "segment_ids", "attention_mask"):
        assert batch[key].dtype == torch.int64, key
        assert batch[key].shape == batch["input_ids"].shape, key
    assert batch["input_ids"].shape[0] == b and batch["input_ids"].shape[1] <= ds.seq_len
    assert batch["cu_seqlens"].dtype == torch.int32
    assert isinstance(batch["max_seqlen"], int)
    assert len(batch["images"]) == b
    # cu_seqlens covers exactly the non-padding tokens, segment by segment.
    assert int(batch["cu_seqlens"][-1]) == int(batch["attention_mask"].sum())
    lengths = batch["cu_seqlens"].diff()
    assert int(lengths.max()) == batch["max_seqlen"]
    for r in range(b):
        pos = batch["position_ids"][r]
        seg = batch["segment_ids"][r]
        n = int(batch["attention_mask"][r].sum())
        starts = torch.nonzero(pos[:n] == 0).flatten()
        assert starts.tolist() == torch.nonzero(torch.diff(seg[:n], prepend=torch.tensor([0])) != 0).flatten().tolist()
        # The first token of every segment and all padding are unlabelled.
        assert (batch["labels"][r][starts] == IGNORE_INDEX).all()
        assert (batch["labels"][r][n:] == IGNORE_INDEX).all()
        lab = batch["labels"][r][:n]
        trained = lab != IGNORE_INDEX
        assert (lab[trained] == batch["input_ids"][r][:n][trained]).all()
        for img in batch["images"][r]:
            assert (batch["labels"][r][img["position"] : img["position"] + img["length"]] == IGNORE_INDEX).all()


def test_flattened_form_matches_padded(demo_release):
    ds = PackedDataset(demo_release)
    items = [ds[i] for i in range(min(3, len(ds)))]
    padded = collate(items, pad_token_id=ds.pad_token_id)
    flat = collate(items, pad_token_id=ds.pad_token_id, flatten=True)
    keep = padded["attention_mask"].bool()
    assert flat["input_ids"].shape == (1, int(keep.sum()))
    assert torch.equal(flat["input_ids"][0], padded["input_ids"][keep])
    assert torch.equal(flat["labels"][0], padded["labels"][keep])
    assert torch.equal(flat["position_ids"][0], padded["position_ids"][keep])
    assert torch.equal(flat["cu_seqlens"], padded["cu_seqlens"])
    assert len(flat["images"]) == sum(len(r) for r in padded["images"])


def test_dataset_indexing(demo_release):
    ds = PackedDataset(demo_release)
    assert len(ds) > 0
    assert np.array_equal(ds[-1]["input_ids"], ds[len(ds) - 1]["input_ids"])
    with pytest.raises(IndexError):
        ds[len(ds)]
