"""`--to mds`: MosaicML streaming shards (`streaming.MDSWriter`), one sample per packed
row, every column of the release under its own name (format.COLUMNS) as a 1-D
`ndarray` of the release's dtype, `image_paths` as a JSON list of strings, and `row`,
the release row. `segment_source` indexes export.json's `sources`; image paths are
relative to each source's image root (export.json's `image_roots`). Uncompressed, no
shard hashes (export.json holds the sha256 of every file), shards of at most 64 MiB."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..release.format import COLUMNS, Manifest
from .common import blocks, require

SIZE_LIMIT = 1 << 26


def columns() -> dict[str, str]:
    out = {"row": "int"}
    for col in COLUMNS:
        out[col.name] = "json" if col.name == "image_paths" else f"ndarray:{col.type.to_pandas_dtype().__name__}"
    return out


def write(release: Path, manifest: Manifest, folder: Path, images: int, drop_images: bool) -> tuple[dict[str, int], list[str]]:
    streaming = require("streaming", "mosaicml-streaming", "mds")
    encodings = columns()
    dtypes = {name: np.dtype(enc.split(":")[1]) for name, enc in encodings.items() if enc.startswith("ndarray:")}
    counts = {"rows": 0, "segments": 0, "tokens": 0}
    with streaming.MDSWriter(out=str(folder), columns=encodings, compression=None, hashes=[],
                             size_limit=SIZE_LIMIT, progress_bar=False) as writer:
        for k in range(len(manifest.shards)):
            for block in blocks(release, manifest, k):
                for i in range(block.rows):
                    sample: dict[str, object] = {"row": block.first + i}
                    for name, dtype in dtypes.items():
                        off = block.offsets(name)
                        values = block.values(name)[off[i] : off[i + 1]]
                        if drop_images and name in ("image_positions", "image_lengths"):
                            values = values[:0]
                        elif drop_images and name == "segment_images":
                            values = np.zeros_like(values)
                        sample[name] = np.ascontiguousarray(values, dtype)
                    off = block.offsets("image_paths")
                    sample["image_paths"] = [] if drop_images else [str(p) for p in block.values("image_paths")[off[i] : off[i + 1]]]
                    writer.write(sample)
                counts["rows"] += block.rows
                counts["segments"] += len(block.values("segment_lengths"))
                counts["tokens"] += len(block.values("input_ids"))
    notes = []
    if images and drop_images:
        notes.append("image columns left empty (--drop-images); the image tokens stay in input_ids, masked as built")
    elif images:
        notes.append("images are carried as references (image_paths, positions, lengths), not pixels")
    return counts, notes
