"""Packing must not change what a model learns: the summed token loss of a packed batch
equals the summed losses of its samples run one by one. This holds only if the batch
contract is right (segment_ids, position_ids restarting per segment, the first token of
each segment unlabelled) and the model uses it; the model is examples/train_tiny.py's."""

from __future__ import annotations

import importlib.util
import re
import sys

import pytest
import torch
from conftest import ROOT

from mmrecipe.torch import IGNORE_INDEX, PackedDataset, collate


def load_example():
    spec = importlib.util.spec_from_file_location("train_tiny", ROOT / "examples" / "train_tiny.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("train_tiny", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup(demo_release):
    tiny = load_example()
    ds = PackedDataset(demo_release)
    # The longest and the shortest row: the shorter one is padded, so padding is covered.
    by_length = sorted(range(len(ds)), key=lambda i: len(ds[i]["input_ids"]))
    batch = collate([ds[by_length[-1]], ds[by_length[0]]], pad_token_id=ds.pad_token_id)
    # A compact vocabulary of the ids present keeps the head small; the property under
    # test is about attention and positions, not about which ids there are.
    vocab, compact = torch.unique(batch["input_ids"], return_inverse=True)
    labels = batch["labels"].clone()
    labelled = labels != IGNORE_INDEX
    labels[labelled] = torch.searchsorted(vocab, labels[labelled])
    batch["input_ids"], batch["labels"] = compact, labels
    torch.manual_seed(0)
    model = tiny.TinyLM(len(vocab), ds.seq_len, dim=32, heads=2, layers=2).double().eval()
    return tiny, model, batch


def packed_loss(tiny, model, batch, position_ids=None, segment_ids=None) -> float:
    with torch.no_grad():
        hidden = model(batch["input_ids"], batch["position_ids"] if position_ids is None else position_ids,
                       batch["segment_ids"] if segment_ids is None else segment_ids)
        return tiny.summed_loss(model, hidden, batch["labels"])[0].item()


def one_by_one_loss(tiny, model, batch) -> tuple[float, int]:
    total, samples = 0.0, 0
    with torch.no_grad():
        for r in range(batch["input_ids"].shape[0]):
            seg = batch["segment_ids"][r]
            for s in seg.unique():
                if s == 0:  # padding
                    continue
                where = seg == s
                ids, labels = batch["input_ids"][r][where][None], batch["labels"][r][where][None]
                n = ids.shape[1]
                hidden = model(ids, torch.arange(n)[None], torch.ones(1, n, dtype=torch.int64))
                total += tiny.summed_loss(model, hidden, labels)[0].item()
                samples += 1
    return total, samples


def test_packed_loss_equals_samples_run_one_by_one(setup):
    tiny, model, batch = setup
    packed = packed_loss(tiny, model, batch)
    alone, samples = one_by_one_loss(tiny, model, batch)
    assert samples == int((batch["cu_seqlens"].diff() > 0).sum()) > 2
    assert batch.padding_mask.min() == 0  # padding is part of the batch
    assert packed > 0
    assert abs(packed - alone) < 1e-5, (packed, alone)


def test_packing_without_the_contract_changes_the_loss(setup):
    # The controls: attention across segments, or positions running on through the row,
    # each change the loss, so the equality above is not a coincidence.
    tiny, model, batch = setup
    alone, _ = one_by_one_loss(tiny, model, batch)
    row_segments = (batch["segment_ids"] > 0).long()
    running_positions = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
    assert abs(packed_loss(tiny, model, batch, segment_ids=row_segments) - alone) > 1e-3
    assert abs(packed_loss(tiny, model, batch, position_ids=running_positions) - alone) > 1e-3


def test_example_script_trains(demo_release, capsys):
    tiny = load_example()
    assert tiny.main([str(demo_release), "--steps", "2", "--flash"]) == 0
    out = capsys.readouterr().out
    if tiny.flash_available() is not None:
        assert "--flash skipped" in out
    losses = [float(m) for m in re.findall(r"step +\d+  loss (\S+)", out)]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses)  # near ln(vocab) ≈ 10.8 at the start
