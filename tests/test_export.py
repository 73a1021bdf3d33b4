"""`recipe export` to HF datasets (read by TRL's own SFTTrainer preparation and collator),
Megatron-LM indexed datasets (read back by a reader written here from the format's
description) and MosaicML streaming (read back by its StreamingDataset). Every check
compares with the release's shards read directly with pyarrow, not through the
exporter's reader."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import MODEL, RECIPES, small_recipe

from mmrecipe import ReleaseError, build
from mmrecipe.cli import main
from mmrecipe.export import export
from mmrecipe.release.format import read_manifest

IGNORE = -100


def recipe(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def release_rows(release: Path) -> list[dict]:
    """Every packed row of the release, straight from its Parquet shards."""
    rows = []
    for shard in read_manifest(release).shards:
        rows += pq.read_table(release / shard.path).to_pylist()
    assert rows
    return rows


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def text_release(tmp_path_factory) -> Path:
    """A release without images (the demo's text-only chats), packed several per row."""
    folder = tmp_path_factory.mktemp("text")
    (folder / "r.toml").write_text(small_recipe(
        f'name = "chat"\npath = "{RECIPES}/demo/data/chat.jsonl"\nlayout = "conversation"',
        output="seq_len = 1024"), "utf-8")
    out = folder / "release"
    build(folder / "r.toml", out, progress=False)
    return out


# ------------------------------------------------------------------------------- hf

def test_hf_rows_are_the_release_rows(demo_release, tmp_path):
    datasets = pytest.importorskip("datasets")
    export(demo_release, "hf", tmp_path / "hf")
    ds = datasets.load_from_disk(str(tmp_path / "hf"))
    rows = release_rows(demo_release)
    sources = read_manifest(demo_release).sources
    assert len(ds) == len(rows)
    images = 0
    for got, want in zip(ds, rows):
        assert got["input_ids"] == want["input_ids"]
        assert got["assistant_masks"] == want["loss_mask"]
        assert got["seq_lengths"] == want["segment_lengths"]
        assert got["segment_source"] == [sources[s] for s in want["segment_source"]]
        assert got["segment_row"] == want["segment_row"]
        image_sources = [sources[s] for s, n in zip(want["segment_source"], want["segment_images"]) for _ in range(n)]
        assert got["image_records"] == [
            {"source": s, "path": p, "position": q, "length": n}
            for s, p, q, n in zip(image_sources, want["image_paths"], want["image_positions"], want["image_lengths"])
        ]
        images += len(got["image_records"])
    assert images > 0  # the demo has images: the records above were compared, not skipped


def _tiny_trainer(dataset, tmp_path, **config):
    pytest.importorskip("trl")
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(str(MODEL))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=4096))
    args = SFTConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=2, max_steps=2, report_to=[],
                     use_cpu=True, logging_steps=1, save_strategy="no", **config)
    return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)


def test_trl_takes_the_export_as_tokenized_and_packed(demo_release, tmp_path):
    """TRL's own preparation (SFTTrainer) and collator keep the ids, the mask as labels and
    the sample boundaries as position_ids; two training steps run on the batches."""
    datasets = pytest.importorskip("datasets")
    export(demo_release, "hf", tmp_path / "hf")
    ds = datasets.load_from_disk(str(tmp_path / "hf"))
    trainer = _tiny_trainer(ds, tmp_path, padding_free=True, max_length=None)
    prepared = trainer.train_dataset
    rows = release_rows(demo_release)
    assert len(prepared) == len(rows)

    def expected(row):
        ids = np.array(row["input_ids"], np.int64)
        labels = np.where(np.array(row["loss_mask"], bool), ids, IGNORE)
        starts = np.concatenate([[0], np.cumsum(row["segment_lengths"])[:-1]])
        labels[starts] = IGNORE  # a sample's first token is not trained on the previous sample's last
        positions = np.concatenate([np.arange(n) for n in row["segment_lengths"]])
        return ids, labels, positions

    for got, row in zip(prepared, rows):  # preparation: not re-tokenized, not re-packed, not truncated
        assert got["input_ids"] == row["input_ids"]
        if "labels" in got:  # TRL >= 1.x builds labels while preparing; older ones in the collator
            assert got["labels"] == np.where(np.array(row["loss_mask"], bool), row["input_ids"], IGNORE).tolist()
    trained = 0
    for lo in range(0, len(rows), 2):
        pair = [prepared[i] for i in range(lo, min(lo + 2, len(rows)))]
        batch = trainer.data_collator(pair)
        want = [expected(r) for r in rows[lo : lo + 2]]
        assert batch["input_ids"].tolist() == [np.concatenate([w[0] for w in want]).tolist()]
        assert batch["labels"].tolist() == [np.concatenate([w[1] for w in want]).tolist()]
        assert batch["position_ids"].tolist() == [np.concatenate([w[2] for w in want]).tolist()]
        assert "attention_mask" not in batch  # padding-free: the boundaries come from position_ids
        trained += int((batch["labels"] != IGNORE).sum())
    assert trained == sum(sum(r["loss_mask"]) for r in rows)  # segment starts are never trained in the demo
    result = trainer.train()
    assert result.global_step == 2 and np.isfinite(result.training_loss)


def test_hf_loads_without_trl_in_a_plain_torch_loop(text_release, tmp_path):
    datasets = pytest.importorskip("datasets")
    export(text_release, "hf", tmp_path / "hf")
    ds = datasets.load_from_disk(str(tmp_path / "hf")).with_format("numpy")
    rows = release_rows(text_release)
    assert [r["seq_lengths"].tolist() for r in ds] == [r["segment_lengths"] for r in rows]
    assert all(len(r["image_records"]) == 0 for r in ds)


# ------------------------------------------------------------------------- megatron

DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}


def read_indexed(prefix: Path) -> tuple[list[np.ndarray], np.ndarray]:
    """A Megatron MMIDIDX dataset, from the published layout of the .idx: magic, version,
    dtype code, sequence and document counts, int32 sizes, int64 byte pointers into the
    .bin, int64 document indices. Returns the sequences and the document indices."""
    idx = (prefix.parent / (prefix.name + ".idx")).read_bytes()
    assert idx[:9] == b"MMIDIDX\x00\x00"
    version, = struct.unpack("<Q", idx[9:17])
    assert version == 1
    dtype = np.dtype(DTYPES[idx[17]])
    sequences, documents = struct.unpack("<QQ", idx[18:34])
    at = 34
    sizes = np.frombuffer(idx, np.int32, sequences, at)
    at += 4 * sequences
    pointers = np.frombuffer(idx, np.int64, sequences, at)
    at += 8 * sequences
    docs = np.frombuffer(idx, np.int64, documents, at)
    assert at + 8 * documents == len(idx)  # nothing after the document indices (no modes)
    data = (prefix.parent / (prefix.name + ".bin")).read_bytes()
    assert len(data) == int(sizes.sum()) * dtype.itemsize
    return [np.frombuffer(data, dtype, n, p) for n, p in zip(sizes, pointers)], docs


def test_megatron_sequences_are_samples_and_documents_are_rows(text_release, tmp_path):
    export(text_release, "megatron", tmp_path / "meg")
    rows = release_rows(text_release)
    tokens, docs = read_indexed(tmp_path / "meg" / "tokens")
    masks, mask_docs = read_indexed(tmp_path / "meg" / "loss_mask")
    assert docs.tolist() == mask_docs.tolist()
    assert len(docs) == len(rows) + 1 and docs[0] == 0
    assert any(len(r["segment_lengths"]) > 1 for r in rows)  # rows hold several samples: boundaries are tested
    for r, row in enumerate(rows):
        seqs = range(docs[r], docs[r + 1])
        assert [len(tokens[s]) for s in seqs] == row["segment_lengths"]
        assert np.concatenate([tokens[s] for s in seqs]).tolist() == row["input_ids"]
        assert np.concatenate([masks[s] for s in seqs]).tolist() == row["loss_mask"]


def test_megatron_core_reads_it(text_release, tmp_path):
    indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    export(text_release, "megatron", tmp_path / "meg")
    ours, docs = read_indexed(tmp_path / "meg" / "tokens")
    theirs = indexed.IndexedDataset(str(tmp_path / "meg" / "tokens"))
    assert len(theirs) == len(ours) and theirs.document_indices.tolist() == docs.tolist()
    assert all(theirs[i].tolist() == ours[i].tolist() for i in range(len(ours)))


def test_megatron_refuses_images_unless_dropped(demo_release, tmp_path, capsys):
    code, _, err = recipe(capsys, "export", demo_release, "--to", "megatron", "-o", tmp_path / "meg")
    assert code == 1 and "cannot carry" in err and "--drop-images" in err
    assert not (tmp_path / "meg").exists()
    code, out, _ = recipe(capsys, "export", demo_release, "--to", "megatron", "-o", tmp_path / "meg", "--drop-images")
    assert code == 0 and "dropped" in out
    tokens, docs = read_indexed(tmp_path / "meg" / "tokens")
    rows = release_rows(demo_release)
    assert np.concatenate(tokens).tolist() == [t for r in rows for t in r["input_ids"]]  # image tokens stay


# ------------------------------------------------------------------------------ mds

def test_mds_streams_back_every_release_column(demo_release, tmp_path):
    streaming = pytest.importorskip("streaming")
    from streaming.base.util import clean_stale_shared_memory

    from mmrecipe.release.format import COLUMN_NAMES

    export(demo_release, "mds", tmp_path / "mds")
    clean_stale_shared_memory()
    ds = streaming.StreamingDataset(local=str(tmp_path / "mds"), shuffle=False, batch_size=1)
    rows = release_rows(demo_release)
    assert ds.num_samples == len(rows)
    for i, want in enumerate(rows):
        got = ds[i]
        assert got["row"] == i
        for name in COLUMN_NAMES:
            value = got[name]
            assert (list(value) if name == "image_paths" else value.tolist()) == want[name], name
    assert any(rows[i]["image_paths"] for i in range(len(rows)))


# ------------------------------------------------------------ provenance, determinism

@pytest.mark.parametrize("to", ["hf", "megatron", "mds"])
def test_exporting_twice_gives_identical_files_that_verify(text_release, tmp_path, capsys, to):
    pytest.importorskip({"hf": "datasets", "megatron": "numpy", "mds": "streaming"}[to])
    a = export(text_release, to, tmp_path / "a")
    export(text_release, to, tmp_path / "b")
    first, second = files_of(tmp_path / "a"), files_of(tmp_path / "b")
    assert len(first) > 2 and first == second
    assert a.manifest.release_id == read_manifest(text_release).release_id
    assert {f.path for f in a.manifest.files} | {"export.json"} == set(first)
    code, out, _ = recipe(capsys, "verify", tmp_path / "a")
    assert code == 0 and f"export ({to})" in out and "ok" in out
    # one byte changed, one file added, one removed: each named
    victim = max(a.manifest.files, key=lambda f: f.bytes).path
    data = bytearray((tmp_path / "a" / victim).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "a" / victim).write_bytes(bytes(data))
    (tmp_path / "a" / "notes.txt").write_text("mine")
    gone = min(a.manifest.files, key=lambda f: f.bytes).path
    (tmp_path / "a" / gone).unlink()
    code, out, _ = recipe(capsys, "verify", tmp_path / "a")
    assert code == 1
    assert f"changed      {victim}" in out and "extra        notes.txt" in out and f"missing      {gone}" in out


# ----------------------------------------------------------------------- bad input

def test_a_release_that_fails_verify_is_not_exported(demo_release, tmp_path, capsys):
    release = Path(shutil.copytree(demo_release, tmp_path / "demo"))
    shard = release / read_manifest(release).shards[0].path
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, _, err = recipe(capsys, "export", release, "--to", "hf", "-o", tmp_path / "hf")
    assert code == 1 and "does not verify" in err and read_manifest(release).shards[0].path in err
    assert not (tmp_path / "hf").exists()


def test_unknown_format(demo_release, tmp_path, capsys):
    with pytest.raises(ReleaseError, match="unknown export format 'parquet': choose one of hf, megatron, mds"):
        export(demo_release, "parquet", tmp_path / "x")
    with pytest.raises(SystemExit) as e:
        main(["export", str(demo_release), "--to", "parquet", "-o", str(tmp_path / "x")])
    assert e.value.code == 2 and "invalid choice: 'parquet'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_existing_target_needs_overwrite_and_must_be_an_export(text_release, tmp_path):
    out = tmp_path / "meg"
    export(text_release, "megatron", out)
    with pytest.raises(ReleaseError, match="already exists; pass --overwrite"):
        export(text_release, "megatron", out)
    export(text_release, "megatron", out, overwrite=True)  # an earlier export may be replaced
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    with pytest.raises(ReleaseError, match="is not an export"):
        export(text_release, "megatron", mine, overwrite=True)
    assert (mine / "thesis.tex").read_text() == "precious" and len(list(mine.iterdir())) == 1
    with pytest.raises(ReleaseError, match="is not an export"):  # nor is a release an export to replace
        export(text_release, "megatron", Path(shutil.copytree(text_release, tmp_path / "copy")), overwrite=True)


def test_target_inside_or_equal_to_the_release(text_release, tmp_path):
    with pytest.raises(ReleaseError, match="is inside the release"):
        export(text_release, "megatron", text_release / "meg")
    with pytest.raises(ReleaseError, match="an input"):
        export(text_release, "megatron", text_release, overwrite=True)
    assert not (text_release / "meg").exists()


def test_a_missing_library_names_the_extra(text_release, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    monkeypatch.setitem(sys.modules, "streaming", None)
    for to, package in (("hf", "datasets"), ("mds", "mosaicml-streaming")):
        with pytest.raises(ReleaseError, match=rf'needs the `{package}` package.*pip install "mmrecipe\[export\]"'):
            export(text_release, to, tmp_path / to)
        assert not (tmp_path / to).exists()
