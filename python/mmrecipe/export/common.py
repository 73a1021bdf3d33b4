"""What every export shares: the checks before anything is written (the release verifies,
the target folder is safe to write), the release read one row group at a time, and the
export's own manifest, `export.json`, which names the source release and the sha256 of
every file the export wrote.

    DIR/export.json     ExportManifest: format, source release id, totals, files
    DIR/...             the files of the chosen format (see hf.py, megatron.py, mds.py)

An export is written into a hidden folder beside DIR and renamed into place when complete
(the release writer's `staging`), so a reader never sees half of one."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import ReleaseError
from ..hashing import file_sha256
from ..release.format import Manifest, read_manifest, read_stats
from ..release.guard import names_format

FORMAT = "mmrecipe-export/1"
MANIFEST = "export.json"
EXTRA = "export"  # pip install "mmrecipe[export]"


class ExportFile(msgspec.Struct):
    path: str
    sha256: str
    bytes: int


class ExportManifest(msgspec.Struct):
    format: str
    to: str  # hf | megatron | mds
    mmrecipe_version: str
    release_id: str  # the source release (its manifest's release_id)
    release_name: str
    release_version: str
    sources: list[str]
    seq_len: int
    pad_token_id: int
    rows: int  # packed sequences
    segments: int  # packed samples
    tokens: int
    images: int  # image runs in the release
    drop_images: bool  # images left behind (their tokens stay, masked as built)
    image_roots: dict[str, str]  # as the release records them: relative to its recipe's folder
    image: dict[str, Any] | None
    files: list[ExportFile]
    notes: list[str] = []  # what this format does not carry, in words
    # The epoch exported, of a multi-epoch release (absent for a one-epoch release).
    epoch: int | msgspec.UnsetType = msgspec.UNSET


def is_export(folder: Path) -> bool:
    """A folder an export wrote: its export.json names the export format."""
    return names_format(folder, MANIFEST, FORMAT)


def read_export_manifest(folder: str | Path) -> ExportManifest:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ReleaseError(f"{folder} is not an export: no {MANIFEST}")
    try:
        return msgspec.json.decode(path.read_bytes(), type=ExportManifest)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ReleaseError(f"{path}: not a valid export manifest: {e}") from None


def require(module: str, package: str, to: str) -> ModuleType:
    """Imports an optional dependency of one format, or says which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ReleaseError(f"--to {to} needs the `{package}` package ({e}); "
                           f'install it with: pip install "mmrecipe[{EXTRA}]"') from None


def release_images(release: Path, epoch: int = 0) -> int:
    """Image runs in the release (in epoch `epoch`), from its (verified) stats.json."""
    return sum(int(s.get("images", 0)) for s in read_stats(release, epoch).get("sources", []))


@dataclass
class Block:
    """Consecutive packed rows of one shard (one Parquet row group): per column the
    offsets that cut its values into rows (rows + 1 entries, from 0) and the values."""

    first: int  # release row of the block's first row
    lists: dict[str, tuple[np.ndarray, np.ndarray]]

    @property
    def rows(self) -> int:
        return len(self.lists["input_ids"][0]) - 1

    def offsets(self, name: str) -> np.ndarray:
        return self.lists[name][0]

    def values(self, name: str) -> np.ndarray:
        return self.lists[name][1]

    def segment_starts(self) -> np.ndarray:
        """The block-relative token index where each packed sample begins."""
        lengths = self.values("segment_lengths").astype(np.int64)
        return np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(lengths) else lengths

    def position_ids(self) -> np.ndarray:
        """Positions restarting at 0 at every packed sample (the text row of the batch contract)."""
        lengths = self.values("segment_lengths").astype(np.int64)
        total = int(lengths.sum())
        return np.arange(total, dtype=np.int64) - np.repeat(self.segment_starts(), lengths)


def _column(table: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    arr = table.column(name).combine_chunks()
    offsets = arr.offsets.to_numpy().astype(np.int64)
    flat = arr.values
    if pa.types.is_string(flat.type) or pa.types.is_large_string(flat.type):  # image paths
        values = np.array(flat.to_pylist()[offsets[0] : offsets[-1]], dtype=object)
    else:
        values = flat.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]
    return offsets - offsets[0], values


def blocks(release: Path, manifest: Manifest, shard: int) -> Iterator[Block]:
    """The rows of one shard, a row group at a time (memory: one row group)."""
    first = sum(s.sequences for s in manifest.shards[:shard])
    pf = pq.ParquetFile(release / manifest.shards[shard].path, memory_map=True)
    for g in range(pf.metadata.num_row_groups):
        table = pf.read_row_group(g)
        block = Block(first, {name: _column(table, name) for name in table.column_names})
        first += block.rows
        yield block


def hashed(folder: Path) -> list[ExportFile]:
    """Every file under `folder` (but export.json), sorted by path, with its sha256."""
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel != MANIFEST:
            files.append(ExportFile(path=rel, sha256=file_sha256(path), bytes=path.stat().st_size))
    return files


def checked_release(release: str | Path, epoch: int | None = None) -> tuple[Path, Manifest]:
    """The release, once `recipe verify` finds nothing wrong with it, as epoch `epoch`
    sees it (a multi-epoch release must name one: each is a release of its own)."""
    from ..release.verify import verify

    release = Path(release)
    manifest = read_manifest(release)
    report = verify(release)
    if not report.ok:
        listed = "; ".join(str(p).strip() for p in report.problems[:5])
        more = f" (and {len(report.problems) - 5} more)" if len(report.problems) > 5 else ""
        raise ReleaseError(f"{release} does not verify, so it is not exported: {listed}{more}; "
                           f"run `recipe verify {release}` and rebuild it")
    if manifest.epoch_count > 1 and epoch is None:
        raise ReleaseError(f"{release} has {manifest.epoch_count} epochs; export one of them with --epoch E "
                           f"(0..{manifest.epoch_count - 1}), once for each epoch a training run needs")
    return release, manifest.epoch(epoch or 0)
