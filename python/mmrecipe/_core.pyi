"""The Rust core of mmrecipe. Few, coarse calls over whole NumPy buffers; the GIL is
released while it works. It defines the exception classes (`mmrecipe.errors` is their
public name and documents them) and raises them itself."""

import os
from typing import Any, TypedDict, final

from typing_extensions import NotRequired

import numpy as np
import numpy.typing as npt

class _BatchColumns(TypedDict):
    """One batch of one source (`mmrecipe.buffers.batch_arguments`): sample i has the
    turns turn_offsets[i]..turn_offsets[i+1] (a role and a content string each) and the
    images image_offsets[i]..image_offsets[i+1] (a path string each)."""

    rows: npt.NDArray[np.uint64]
    turn_offsets: npt.NDArray[np.int64]
    roles: npt.NDArray[np.uint8]
    content_offsets: npt.NDArray[np.int64]
    content_data: npt.NDArray[np.uint8]
    image_offsets: npt.NDArray[np.int64]
    image_path_offsets: npt.NDArray[np.int64]
    image_path_data: npt.NDArray[np.uint8]
    #: Per image, its bytes where the source holds them (parquet cells), as (offsets,
    #: bytes); an empty entry, or none given: the image is read from its path.
    image_data_offsets: NotRequired[npt.NDArray[np.int64]]
    image_data: NotRequired[npt.NDArray[np.uint8]]
    #: Per sample, its audio clips audio_offsets[i]..[i+1] of the path strings
    #: (audio_path_offsets, audio_path_data); none given: the source has no audio.
    audio_offsets: NotRequired[npt.NDArray[np.int64]]
    audio_path_offsets: NotRequired[npt.NDArray[np.int64]]
    audio_path_data: NotRequired[npt.NDArray[np.uint8]]
    #: Per sample, its video clips, as audio; none given: the source has no video.
    video_offsets: NotRequired[npt.NDArray[np.int64]]
    video_path_offsets: NotRequired[npt.NDArray[np.int64]]
    video_path_data: NotRequired[npt.NDArray[np.uint8]]
    #: (offsets, bytes) per template field, in the plan's field order.
    fields: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]]

__all__ = [
    "BUILTIN_TEMPLATES",
    "Compiler",
    "DataError",
    "InternalError",
    "JsonChunks",
    "LLMError",
    "MMRecipeError",
    "RecipeError",
    "ReleaseError",
    "ShardEmitter",
    "SourceError",
    "StorageError",
    "TemplateError",
    "TokenizerError",
    "__version__",
    "builtin_template",
    "content_keys",
    "encode_texts",
    "fill_templates",
    "image_token_count",
    "pack_bounds",
    "pack_lengths",
    "parse_replies",
    "release_columns",
    "video_metadata",
    "video_token_count",
    "tar_members",
    "tokenizer_engine",
]

BUILTIN_TEMPLATES: list[str]
__version__: str

class MMRecipeError(Exception):
    """Base class of every error mmrecipe raises on purpose."""

class RecipeError(MMRecipeError):
    """The recipe is invalid; `key` names the recipe key, `problems` lists every problem."""

    key: str | None
    @property
    def problems(self) -> list[str]: ...
    @problems.setter
    def problems(self, value: list[str]) -> None: ...

class SourceError(MMRecipeError):
    """A source file cannot be read, or a field path does not resolve on it."""

class DataError(MMRecipeError):
    """One data row is unusable; `source`, `row` and `field` say where."""

    source: str | None
    row: int | None
    field: str | None

class TokenizerError(MMRecipeError):
    """The tokenizer cannot be loaded or lacks a token the recipe needs."""

class TemplateError(MMRecipeError):
    """The chat template does not compile or does not render a conversation."""

class ReleaseError(MMRecipeError):
    """A release directory is missing, incomplete, or would be overwritten."""

class LLMError(MMRecipeError):
    """An LLM stage cannot go on."""

class StorageError(MMRecipeError):
    """A file mmrecipe writes or reads back for itself failed; `path` names it."""

    path: str | None

class InternalError(MMRecipeError):
    """A bug in mmrecipe."""

@final
class Compiler:
    """Renders, tokenizes, masks, mixes and packs the samples of one build.

    `plan_json`: the resolved build plan (see `mmrecipe.builder.make_plan`);
    `tokenizer_path`: a tokenizer.json; `threads`: 0 for every core (the output is the same
    for any value); `spill_dir`: where tokenized samples wait for packing (None: memory).
    """

    def __new__(cls, plan_json: bytes, tokenizer_path: str, threads: int = 0, spill_dir: str | None = None) -> Compiler: ...
    def add_batch(self, source: int, columns: _BatchColumns) -> int:
        """Adds one batch of a source: each sample rendered, tokenized, masked and kept
        (in parallel, in row order); returns the usable samples added. Raises DataError
        for an unusable row under on_error = "fail"."""

    def preview_batch(self, source: int, columns: _BatchColumns) -> list[Any]:
        """Per sample (text, ids, mask, offsets, template, image runs) or an error
        message, as a build makes them; nothing is kept."""

    def finish(self) -> str:
        """Mixes and packs everything added; returns the build summary as JSON."""

    def emit(self, lo: int, hi: int) -> dict[str, npt.NDArray[Any]]:
        """Packed rows lo..hi as flat arrays (after `finish`), keyed by the release's
        column names and their offsets: row r is input_ids[row_offsets[r]:row_offsets[r+1]]
        (and loss_mask); its segments segment_offsets[r]..[r+1] of segment_lengths,
        segment_source, segment_row, segment_part, segment_template, segment_repeat,
        segment_images; its image runs image_offsets[r]..[r+1] of image_positions,
        image_lengths, image_grid_t, image_grid_h, image_grid_w and the strings
        (image_path_offsets, image_path_data); its audio runs audio_offsets[r]..[r+1] of
        audio_positions, audio_lengths, audio_samples and the strings (audio_path_offsets,
        audio_path_data), empty without audio; its video runs video_offsets[r]..[r+1] of
        video_positions, video_lengths, video_grid_t/h/w, video_frames and the strings
        (video_path_offsets, video_path_data), empty without video."""

    def shard_plan(self, lo: int, hi: int) -> bytes:
        """The plan of rows lo..hi (after `finish`) that a `ShardEmitter` emits them from
        in another process: the rows' segments and the files holding their token records
        (the spill's file, flushed first, and the entries loaded with `attach`)."""

    def tokenizer_engine(self) -> tuple[str, str]:
        """The engine tokenizing this build ("fast" or "hf") and why it was chosen."""

    def encode_chats(self, chats_json: str) -> list[tuple[str, npt.NDArray[np.uint32], npt.NDArray[np.uint8], list[tuple[int, int]]]]:
        """Renders and tokenizes conversations given as JSON (previews and tests)."""

    def save_source(self, source: int, key: str, meta: bytes, path: str | os.PathLike[str]) -> int:
        """Saves source `source`'s samples (after its last batch) to the token store entry
        `path` for `key`, with `meta` kept beside them; returns the entry's size in bytes.
        Written beside `path` and renamed into place."""

    def load_source(self, source: int, key: str, path: str | os.PathLike[str], attach: bool = False) -> tuple[bytes | None, str]:
        """Loads the token store entry `path` as source `source`'s samples (before any of
        its batches): (meta, "") when the entry is whole and holds `key`, else (None, why),
        the source left empty to be tokenized. `attach`: the token records are read where
        they lie in `path` (which must then stay until the rows are emitted), not copied
        nor hashed (each is checked to parse when read)."""

    def load_unit(self, source: int, key: str, path: str | os.PathLike[str], attach: bool = False) -> tuple[bytes | None, str]:
        """Loads the entry `path` of a work unit of source `source` (the rows after those
        loaded so far) and appends its samples: (meta, "") when whole and holding `key`,
        else (None, why), the source left as it was. `attach` as for `load_source`."""

    def source_max_len(self, source: int) -> int:
        """The longest sample of source `source` tokenized so far, before the overlong policy
        (when it fits seq_len, the policy changed no sample of the source)."""

    def token_id(self, token: str) -> int | None:
        """The id of a token, or None."""

@final
class ShardEmitter:
    """Emits the rows of a shard planned by `Compiler.shard_plan`, reading their token
    records from the files the plan names (where a cluster task writes the shard)."""

    def __new__(cls, plan: bytes) -> ShardEmitter:
        """A plan whose files are not all visible here is an `MMRecipeError` naming one."""
    def rows(self) -> int:
        """The shard's rows."""
    def emit(self, lo: int, hi: int) -> dict[str, npt.NDArray[Any]]:
        """Rows lo..hi of the shard, as `Compiler.emit` gives them."""

@final
class JsonChunks:
    """A JSON Lines file (`array=False`) or a JSON array of records (`array=True`), read as
    JSON Lines chunks without loading the file."""

    def __new__(cls, path: str, array: bool, offset: int = 0, newlines: int = 0, records: int = 0) -> JsonChunks:
        """`offset`, `newlines`, `records`: the file read on from a `position()`."""
    def position(self) -> tuple[int, int, int]:
        """Where the next chunk starts: (byte offset, newlines and records before it)."""
    def next_chunk(self, max_records: int) -> bytes | None:
        """The next chunk of at most `max_records` records, or None at the end."""

def builtin_template(name: str) -> str | None:
    """The Jinja source of a built-in chat template (chatml, llama3, vicuna, alpaca, plain)."""

def image_token_count(
    width: int, height: int, patch: int = 14, merge: int = 2, min_pixels: int = 3136, max_pixels: int = 1003520
) -> int:
    """Image tokens for an image of width × height under the Qwen2-VL rule."""

def video_metadata(path: str | os.PathLike[str]) -> tuple[int, tuple[int, int], int, int, bool]:
    """A clip's container metadata, no frame decoded: (frames, frame rate as (numerator,
    denominator), coded width, coded height, turned a quarter by its display matrix).
    MP4 and MOV: the track's frame count; Matroska and WebM (no count kept): the file's
    duration at the track's default frame rate, rounded.
    ValueError naming the file when it cannot be read."""

def video_token_count(
    rule_json: str, frames: int, rate: tuple[int, int], width: int, height: int, quarter_turned: bool = False
) -> tuple[int, list[int], int]:
    """(tokens, [t, h, w] patch grid, frames sampled) of a clip under the video rule
    `rule_json` (the core plan's `video`, JSON; placeholder and token optional)."""

def pack_lengths(
    lengths: npt.NDArray[np.uint32],
    capacity: int,
    packer: str = "bfd",
    images: npt.NDArray[np.uint32] | None = None,
    max_images: int | None = None,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint32]]:
    """Packing by `packer` ("bfd", "tight", "refill", "patterns", "balanced"), under `max_images` images
    per bin when given: (bin offsets, item indices)."""

def pack_bounds(
    lengths: npt.NDArray[np.uint32],
    capacity: int,
    images: npt.NDArray[np.uint32] | None = None,
    max_images: int | None = None,
) -> dict[str, int]:
    """Lower bounds on the bins any packing needs: l1, l2, count, dff, images, best."""

def fill_templates(
    templates: list[str],
    seed: int,
    stream: str,
    rows: npt.NDArray[np.uint64],
    names: list[str],
    columns: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]],
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]:
    """Per row i, one of `templates` chosen by (seed, stream, rows[i]), its `{name}`
    placeholders filled from the string columns (offsets, bytes) named `names`; returns
    the filled strings as (offsets, bytes). Raises ValueError naming a bad template."""

def content_keys(prefix: bytes, offsets: npt.NDArray[np.int64], data: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """Lower-case hex SHA-256 of `prefix` + each string of (offsets, bytes), 64 bytes per row."""

def parse_replies(
    offsets: npt.NDArray[np.int64], data: npt.NDArray[np.uint8], states: npt.NDArray[np.uint8], format: str, min_turns: int
) -> tuple[
    npt.NDArray[np.uint8],
    npt.NDArray[np.int64],
    npt.NDArray[np.uint8],
    npt.NDArray[np.int64],
    npt.NDArray[np.uint8],
    npt.NDArray[np.int64],
    npt.NDArray[np.uint8],
]:
    """Parses a column of LLM replies ("qa" or "json" `format`), row i as `states[i]` says
    (0 a finished reply, 1 cut at max_tokens, 2 no reply). Returns (valid, turn offsets,
    roles, content offsets, content bytes, reason offsets, reason bytes): a row's turns,
    or why its reply is no conversation of at least `min_turns` exchanges."""

def tar_members(path: str | os.PathLike[str]) -> tuple[list[str], npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    """The regular-file members of an uncompressed tar file, in archive order: (names,
    data offsets, sizes). Raises EOFError for a truncated file, ValueError for one that
    is not a tar archive, OSError when it cannot be opened."""

def release_columns() -> list[str]:
    """The list columns of a release, in order, as `Compiler.emit` names them."""

def tokenizer_engine(tokenizer_path: str, requested: str = "auto") -> tuple[str, str]:
    """The engine a build would tokenize `tokenizer_path` with when `requested` ("auto",
    "hf", "fast"), and why. Forcing "fast" on a tokenizer it cannot encode exactly raises
    RecipeError naming model.tokenizer_engine; an unknown value raises ValueError."""

def encode_texts(tokenizer_path: str, texts: list[str], engine: str) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint32]]:
    """Benchmarks and tests: (offsets per text, ids) of `texts` encoded on one thread by
    one engine alone ("fast" without its word cache, or "hf": the tokenizers crate),
    special-token text as plain text."""
