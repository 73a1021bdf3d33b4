"""`--to megatron`: Megatron-LM indexed datasets (the `MMIDIDX` .bin/.idx pair of
megatron/core/datasets/indexed_dataset.py), two of them in parallel:

    tokens.bin / tokens.idx        token ids, int32
    loss_mask.bin / loss_mask.idx  the release's loss mask (1: trained), uint8, same sizes

One *sequence* per packed sample and one *document* per packed row: `document_indices`
(the .idx's last array) holds, for row r, the first sample of row r + 1, so row r is the
concatenation of sequences document_indices[r] .. document_indices[r + 1] - 1, and every
sample boundary of the packing survives (as Megatron's own preprocessing writes one
sequence per sentence and one document per text). The mask is aligned with the tokens:
mask[t] = 1 means token t is a trained target (Megatron's GPT dataset shifts labels by
one; shift the mask with them).

The .idx, byte for byte as Megatron writes it:
    b"MMIDIDX\\x00\\x00"  version <Q 1  dtype code <B  sequence count <Q  document count <Q
    sizes int32[sequences]  pointers int64[sequences] (byte offsets into .bin)
    document_indices int64[documents + 1] (starting with 0)

Image pixels cannot be carried: a release with images is refused unless `drop_images`,
which keeps the image tokens in the sequences, masked as built, and leaves the images.
Ids are written as int32 whatever the vocabulary (Megatron reads the dtype from the .idx).
The index is assembled from spill files at the end, so memory stays at one row group."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..errors import ReleaseError
from ..release.format import Manifest
from .common import blocks

HEADER = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES = {np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3, np.dtype(np.int32): 4,
               np.dtype(np.int64): 5, np.dtype(np.float64): 6, np.dtype(np.float32): 7, np.dtype(np.uint16): 8}
DATASETS = {"tokens": ("input_ids", np.dtype(np.int32)), "loss_mask": ("loss_mask", np.dtype(np.uint8))}
CHUNK = 1 << 20  # index entries copied at a time


class IndexedWriter:
    """One .bin/.idx pair, written as sequences arrive: values go straight to the .bin,
    sizes and document ends to spill files beside it until `close` writes the .idx."""

    def __init__(self, prefix: Path, dtype: np.dtype):
        self.prefix, self.dtype = prefix, dtype
        self.bin = open(prefix.with_suffix(".bin"), "wb")
        self.sizes = open(prefix.with_suffix(".sizes.tmp"), "w+b")
        self.docs = open(prefix.with_suffix(".docs.tmp"), "w+b")
        self.sequences = 0
        self.docs.write(np.zeros(1, np.int64).tobytes())
        self.documents = 1

    def add(self, values: np.ndarray, sizes: np.ndarray, doc_ends: np.ndarray) -> None:
        """`values` of consecutive sequences of `sizes`; `doc_ends` the sequence counts
        (relative to these sequences) after which a document ends."""
        self.bin.write(np.ascontiguousarray(values, self.dtype).tobytes())
        self.sizes.write(sizes.astype(np.int32).tobytes())
        self.docs.write((doc_ends.astype(np.int64) + self.sequences).tobytes())
        self.sequences += len(sizes)
        self.documents += len(doc_ends)

    def close(self) -> None:
        self.bin.close()
        itemsize = self.dtype.itemsize
        with open(self.prefix.with_suffix(".idx"), "wb") as idx:
            idx.write(HEADER + struct.pack("<Q", VERSION) + struct.pack("<B", DTYPE_CODES[self.dtype]))
            idx.write(struct.pack("<Q", self.sequences) + struct.pack("<Q", self.documents))
            _copy(self.sizes, idx)
            self.sizes.seek(0)
            at = 0
            while chunk := self.sizes.read(CHUNK * 4):
                sizes = np.frombuffer(chunk, np.int32).astype(np.int64) * itemsize
                idx.write((at + np.concatenate([[0], np.cumsum(sizes)[:-1]])).astype(np.int64).tobytes())
                at += int(sizes.sum())
            _copy(self.docs, idx)
        for spill in (self.sizes, self.docs):
            spill.close()
            Path(spill.name).unlink()


def _copy(spill: BinaryIO, out: BinaryIO) -> None:
    spill.seek(0)
    while chunk := spill.read(CHUNK * 8):
        out.write(chunk)


def write(release: Path, manifest: Manifest, folder: Path, images: int, drop_images: bool) -> tuple[dict[str, int], list[str]]:
    if images and not drop_images:
        raise ReleaseError(f"{release} has {images:,} image(s), which the Megatron indexed format cannot carry; "
                           "pass --drop-images to export the token sequences without them (the image tokens stay, "
                           "masked as built), or export --to hf or --to mds, which keep image references")
    writers = {name: IndexedWriter(folder / name, dtype) for name, (_, dtype) in DATASETS.items()}
    counts = {"rows": 0, "segments": 0, "tokens": 0}
    try:
        for k in range(len(manifest.shards)):
            for block in blocks(release, manifest, k):
                sizes = block.values("segment_lengths")
                doc_ends = block.offsets("segment_lengths")[1:]
                for name, (column, _) in DATASETS.items():
                    writers[name].add(block.values(column), sizes, doc_ends)
                counts["rows"] += block.rows
                counts["segments"] += len(sizes)
                counts["tokens"] += len(block.values("input_ids"))
    finally:
        for w in writers.values():
            w.close()
    notes = ["one sequence per packed sample, one document per packed row; provenance (source, row) and "
             "image references are not carried"]
    if images:
        notes.append(f"{images:,} image(s) dropped (--drop-images): their tokens stay in the sequences, masked as built")
    return counts, notes
