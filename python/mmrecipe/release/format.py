"""The release format, in one place: the files of a release, the manifest's fields, and
the one column vocabulary of the shards that the Rust emitter, the writer, verify, stats,
diff and the torch reader all use.

    out/NAME/
      manifest.json            Manifest: the resolved recipe, every input's sha256, shards
      stats.json               the build summary: per source and in total
      data/part-NNNNN.parquet  one row per packed sequence, the columns of COLUMNS
      epoch-EEEEE/             with `[output] epochs = N > 1`: epoch E (1..N-1), its own
        stats.json, data/...   templates, subset, order and packing; epoch 0 is the top
                               level, the release a one-epoch build of the recipe writes

Each column is a list per packed row. Its values are cut into rows by one of three
offset arrays the core emits: `row_offsets` (one entry per token), `segment_offsets`
(one per packed sample) or `image_offsets` (one per image); a release built with an audio
rule has the AUDIO_COLUMNS too, cut by `audio_offsets` (one per clip), and one built with a
video rule the VIDEO_COLUMNS, cut by `video_offsets`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, NamedTuple

import msgspec
import pyarrow as pa

from ..errors import ReleaseError
from ..hashing import bytes_sha256

# 2: image_positions count from the start of each packed row (in 1 they counted from the
# start of the row group for every row but the first); image_roots and the image rule with
# its token ids in the manifest; stats.json hashed. 3: each image's (t, h, w) patch grid.
FORMAT = "mmrecipe-release/3"
MANIFEST = "manifest.json"
STATS = "stats.json"
DATA = "data"
ROW_GROUP = 256


class Column(NamedTuple):
    name: str
    type: pa.DataType  # the Arrow type of the list's values
    per: Literal["token", "segment", "image", "audio", "video"]  # which offsets cut it into rows
    meaning: str


COLUMNS: tuple[Column, ...] = (
    Column("input_ids", pa.uint32(), "token", "token ids of the packed sequence"),
    Column("loss_mask", pa.uint8(), "token", "1 where the token is trained (a response token)"),
    Column("segment_lengths", pa.uint32(), "segment", "tokens of each packed sample, in order"),
    Column("segment_source", pa.uint16(), "segment", "index of the sample's source in manifest.sources"),
    Column("segment_row", pa.uint64(), "segment", "the sample's row in its source"),
    Column("segment_part", pa.uint16(), "segment", "part of a conversation split at turns (0 if whole)"),
    Column("segment_template", pa.int32(), "segment", "instruction template chosen (-1: none)"),
    Column("segment_repeat", pa.uint32(), "segment", "pass over an upsampled source (0 for the first)"),
    Column("segment_images", pa.uint32(), "segment", "images in the sample"),
    Column("image_positions", pa.uint32(), "image", "first token of each image run"),
    Column("image_lengths", pa.uint32(), "image", "tokens of each image run"),
    Column("image_paths", pa.string(), "image", "each image's path, relative to its source's image root"),
    Column("image_grid_t", pa.uint32(), "image", "grid rule: frames of each image's patch grid (1); fixed count: 0"),
    Column("image_grid_h", pa.uint32(), "image", "grid rule: patch rows of the image upright, before merging; fixed count: 0"),
    Column("image_grid_w", pa.uint32(), "image", "grid rule: patch columns of the image upright, before merging; fixed count: 0"),
)
COLUMN_NAMES = tuple(c.name for c in COLUMNS)
#: Only in a release whose recipe has `[model] audio` (every other release keeps its bytes).
AUDIO_COLUMNS: tuple[Column, ...] = (
    Column("audio_positions", pa.uint32(), "audio", "first token of each audio run"),
    Column("audio_lengths", pa.uint32(), "audio", "tokens of each audio run"),
    Column("audio_paths", pa.string(), "audio", "each clip's path, relative to its source's audio root"),
    Column("audio_samples", pa.uint64(), "audio", "each clip's length in samples at the rule's sampling rate, from its header"),
)
#: Only in a release whose recipe has `[model] video`.
VIDEO_COLUMNS: tuple[Column, ...] = (
    Column("video_positions", pa.uint32(), "video", "first token of each video run"),
    Column("video_lengths", pa.uint32(), "video", "tokens of each video run"),
    Column("video_paths", pa.string(), "video", "each clip's path, relative to its source's video root"),
    Column("video_grid_t", pa.uint32(), "video", "Qwen2-VL rule: frames sampled / temporal_patch; fixed count: 0"),
    Column("video_grid_h", pa.uint32(), "video", "Qwen2-VL rule: patch rows of the resized frame upright, before merging; fixed count: 0"),
    Column("video_grid_w", pa.uint32(), "video", "Qwen2-VL rule: patch columns of the resized frame upright, before merging; fixed count: 0"),
    Column("video_frames", pa.uint32(), "video", "Qwen2-VL rule: frames sampled from the clip; fixed count: 0"),
)
OFFSETS = {"token": "row_offsets", "segment": "segment_offsets", "image": "image_offsets", "audio": "audio_offsets",
           "video": "video_offsets"}


class InputFile(msgspec.Struct):
    role: str
    path: str
    sha256: str
    bytes: int


class Shard(msgspec.Struct):
    path: str
    sha256: str
    sequences: int
    tokens: int


class EpochPart(msgspec.Struct):
    """One epoch of a multi-epoch release: its shards, totals and stats file."""

    epoch: int
    shards: list[Shard]
    totals: dict[str, Any]
    stats: str  # its stats.json, relative to the release
    stats_sha256: str


def epoch_folder(epoch: int) -> str:
    """Where epoch `epoch` of a release lives, relative to it ("" for epoch 0)."""
    return "" if epoch == 0 else f"epoch-{epoch:05d}"


class Manifest(msgspec.Struct):
    format: str
    mmrecipe_version: str
    name: str
    version: str
    seed: int
    recipe: dict[str, Any]
    inputs: list[InputFile]
    sources: list[str]
    chat_template: str
    seq_len: int
    pad_token_id: int
    shards: list[Shard]
    totals: dict[str, Any]
    # Per source: the folder its image paths are relative to, relative to the recipe's
    # folder (the loader's `image_roots=` maps them on another machine).
    image_roots: dict[str, str] = {}
    # The image rule as built: placeholder, token and token_id, start/end tokens and ids,
    # and either `count` or the grid rule (patch, merge, min_pixels, max_pixels).
    image: dict[str, Any] | None = None
    stats_sha256: str = ""  # stats.json, byte for byte (empty in releases made before it was recorded)
    release_id: str = ""
    # How the ids were computed: {"engine": "fast" | "hf", "reason": ...}. Both engines give
    # the same bytes, so this is not part of the release id (see `release_id_of`).
    tokenizer_engine: dict[str, str] = {}
    # With an audio rule only (UNSET: left out of the JSON, so a release without audio
    # keeps its bytes and id): the rule as built with its token ids, and per source the
    # folder its audio paths are relative to, as image_roots.
    audio: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET
    audio_roots: dict[str, str] | msgspec.UnsetType = msgspec.UNSET
    # With a video rule only, as audio: the rule with its token ids, the video roots.
    video: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET
    video_roots: dict[str, str] | msgspec.UnsetType = msgspec.UNSET
    # Every epoch of a release built with `[output] epochs = N > 1` (epoch 0 first, the
    # same as the fields above); absent from a one-epoch release.
    epochs: list[EpochPart] | msgspec.UnsetType = msgspec.UNSET

    @property
    def epoch_count(self) -> int:
        return 1 if self.epochs is msgspec.UNSET else len(self.epochs)

    def epoch(self, epoch: int) -> "Manifest":
        """This manifest as epoch `epoch` of the release sees it (its shards, totals and
        stats); ReleaseError when the release has no such epoch."""
        if not 0 <= epoch < self.epoch_count:
            raise ReleaseError(f"release {self.name} {self.version} has {self.epoch_count} epoch(s) (0..{self.epoch_count - 1}); "
                               f"there is no epoch {epoch}")
        if self.epochs is msgspec.UNSET:
            return self
        part = self.epochs[epoch]
        return msgspec.structs.replace(self, shards=part.shards, totals=part.totals, stats_sha256=part.stats_sha256)

    def stats_path(self, epoch: int = 0) -> str:
        """The stats.json of epoch `epoch`, relative to the release."""
        self.epoch(epoch)  # in range
        return STATS if self.epochs is msgspec.UNSET else self.epochs[epoch].stats


#: Manifest fields about how a release was made, not what it holds: left out of its id.
NOT_IDENTITY = ("tokenizer_engine",)


def release_id_of(manifest_json: bytes) -> str:
    """A release's id: sha256 of its manifest's compact JSON with `release_id` empty and the
    NOT_IDENTITY fields left out. Decoded generically (not into `Manifest`) so that a field
    this version does not know still counts."""
    raw = msgspec.json.decode(manifest_json)
    raw["release_id"] = ""
    for key in NOT_IDENTITY:
        raw.pop(key, None)
    return bytes_sha256(msgspec.json.encode(raw))


def read_manifest(release: str | Path) -> Manifest:
    path = Path(release) / MANIFEST
    if not path.is_file():
        raise ReleaseError(f"{release} is not a release: no {MANIFEST}")
    try:
        return msgspec.json.decode(path.read_bytes(), type=Manifest)
    except msgspec.DecodeError as e:
        raise ReleaseError(f"{path}: not a valid manifest: {e}") from None


def read_stats(release: str | Path, epoch: int = 0) -> dict[str, Any]:
    """The build summary of epoch `epoch` (stats.json of a one-epoch release)."""
    name = STATS if epoch == 0 else read_manifest(release).stats_path(epoch)
    return json.loads((Path(release) / name).read_text("utf-8"))
