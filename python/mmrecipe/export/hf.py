"""`--to hf`: a Hugging Face `datasets` folder (what `Dataset.save_to_disk` writes, opened
with `load_from_disk`) whose columns TRL's `SFTTrainer` takes as tokenized and packed:

    input_ids        list<int32>  the packed row's token ids, as built
    assistant_masks  list<int8>   the release's loss mask (1: trained); TRL turns every 0
                                  into label -100, whatever its `completion_only_loss`
    seq_lengths      list<int32>  tokens of each packed sample: with `padding_free=True`
                                  TRL restarts position_ids at every sample and never
                                  trains a sample's first token on the previous one's last
    segment_source   list<string> each sample's source (provenance)
    segment_row      list<int64>  each sample's row in its source
    image_records    list<struct<source, path, position, length>>
                                  each image run: its source, its path relative to that
                                  source's image root (export.json's image_roots), its
                                  first token in the row and its length. Not named
                                  `images`: TRL would take the dataset for raw VLM data

One Arrow file per release shard, written a row group at a time with `datasets`' own
ArrowWriter (so memory stays at one row group); `state.json` and `dataset_info.json` are
written as `save_to_disk` writes them, with a fingerprint derived from the release id
instead of a random one, so that exporting twice gives the same bytes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..hashing import bytes_sha256
from ..release.format import Manifest
from .common import Block, blocks, require

IMAGE_RECORD = pa.struct([("source", pa.string()), ("path", pa.string()),
                          ("position", pa.int32()), ("length", pa.int32())])


def _lists(offsets: np.ndarray, values: pa.Array) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)


def table(block: Block, sources: list[str]) -> pa.Table:
    """One block of release rows as the export's Arrow table."""
    tok, seg, img = block.offsets("input_ids"), block.offsets("segment_lengths"), block.offsets("image_lengths")
    names = pa.array(sources, pa.string())
    seg_source = block.values("segment_source").astype(np.int32)
    # Each image's source: that of the sample it is in (segment_images counts them per sample).
    per_segment = block.values("segment_images").astype(np.int64)
    img_source = np.repeat(seg_source, per_segment) if len(per_segment) else np.zeros(0, np.int32)
    records = pa.StructArray.from_arrays(
        [pa.DictionaryArray.from_arrays(pa.array(img_source, pa.int32()), names).cast(pa.string()),
         pa.array(list(block.values("image_paths")), pa.string()),
         pa.array(block.values("image_positions").astype(np.int32)),
         pa.array(block.values("image_lengths").astype(np.int32))],
        fields=list(IMAGE_RECORD),
    )
    return pa.table({
        "input_ids": _lists(tok, pa.array(block.values("input_ids").astype(np.int32))),
        "assistant_masks": _lists(tok, pa.array(block.values("loss_mask").astype(np.int8))),
        "seq_lengths": _lists(seg, pa.array(block.values("segment_lengths").astype(np.int32))),
        "segment_source": _lists(seg, pa.DictionaryArray.from_arrays(pa.array(seg_source, pa.int32()), names).cast(pa.string())),
        "segment_row": _lists(seg, pa.array(block.values("segment_row").astype(np.int64))),
        "image_records": _lists(img, records),
    })


def write(release: Path, manifest: Manifest, folder: Path, images: int, drop_images: bool) -> tuple[dict[str, int], list[str]]:
    datasets = require("datasets", "datasets", "hf")
    from datasets.arrow_writer import ArrowWriter
    from datasets.utils.py_utils import asdict  # the one save_to_disk uses

    n = max(len(manifest.shards), 1)
    schema = table(_empty(), manifest.sources).schema
    features = datasets.Features.from_arrow_schema(schema)
    counts = {"rows": 0, "segments": 0, "tokens": 0}
    files = []
    for k in range(n):
        name = f"data-{k:05d}-of-{n:05d}.arrow"
        writer = ArrowWriter(features=features, path=str(folder / name), embed_local_files=True)
        try:
            for block in (blocks(release, manifest, k) if manifest.shards else ()):
                if drop_images:
                    block = _without_images(block)
                writer.write_table(table(block, manifest.sources))
                counts["rows"] += block.rows
                counts["segments"] += len(block.values("segment_lengths"))
                counts["tokens"] += len(block.values("input_ids"))
            writer.finalize()
        finally:
            writer.close()
        files.append({"filename": name})
    # As Dataset.save_to_disk writes them (datasets/arrow_dataset.py), the fingerprint
    # aside: the release's, not a random one.
    state = {
        "_data_files": files,
        "_fingerprint": bytes_sha256(f"mmrecipe-export hf {manifest.release_id}".encode())[:16],
        "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
        "_output_all_columns": False, "_split": None,
    }
    (folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True), "utf-8")
    info = asdict(datasets.DatasetInfo(
        description=f"mmrecipe release {manifest.name} {manifest.version} ({manifest.release_id})",
        features=features,
    ))
    (folder / "dataset_info.json").write_text(json.dumps({k: info[k] for k in sorted(info)}, indent=2), "utf-8")
    notes = []
    if images and drop_images:
        notes.append("image_records left empty (--drop-images); the image tokens stay in input_ids, masked as built")
    elif images:
        notes.append("images are carried as references (image_records), not pixels: paths are relative to "
                     "each source's image root in image_roots")
    return counts, notes


def _empty() -> Block:
    z = np.zeros(1, np.int64)
    cols = ("input_ids", "loss_mask", "segment_lengths", "segment_source", "segment_row", "segment_images",
            "image_positions", "image_lengths")
    lists: dict[str, Any] = {c: (z, np.zeros(0, np.int64)) for c in cols}
    lists["image_paths"] = (z, np.zeros(0, object))
    return Block(0, lists)


def _without_images(block: Block) -> Block:
    lists = dict(block.lists)
    none = np.zeros(block.rows + 1, np.int64)
    for name in ("image_positions", "image_lengths"):
        lists[name] = (none, np.zeros(0, np.int64))
    lists["image_paths"] = (none, np.zeros(0, object))
    seg_off, seg = lists["segment_images"]
    lists["segment_images"] = (seg_off, np.zeros_like(seg))
    return Block(block.first, lists)
