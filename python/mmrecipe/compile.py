"""The boundary to the Rust core: the plan as the core's JSON plan, and a normalized
source's rows as whole NumPy buffers with named fields. Few, coarse calls:

    Plan ──core_plan()──▶ JSON ──▶ _core.Compiler(plan, tokenizer.json, threads, spill)
    Normalized rows ──batch_columns()──▶ {rows, turn_offsets, roles, content_…} ──▶ add_batch
    finish() ──▶ summary JSON        emit(lo, hi) ──▶ release columns (release.format)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np
import polars as pl
import pyarrow as pa

from . import _core
from .buffers import arrow, binary_buffers, string_buffers
from .recipe.model import ModelFiles
from .recipe.plan import Plan
from .recipe.schema import AudioSpec, ImageSpec, OutputSpec, VideoSpec
from .sources.columns import AUDIOS, CONTENTS, IMAGE_BYTES, IMAGES, ROLES, ROW, VIDEOS, Normalized, template_column

if TYPE_CHECKING:
    from ._core import _BatchColumns


#: The values of `[model] tokenizer_engine` (and of `build(tokenizer_engine=)`).
TOKENIZER_ENGINES = ("auto", "hf", "fast")


def core_plan(plan: Plan, tokenizer_engine: str | None = None, epoch: int = 0) -> dict[str, Any]:
    """The build plan the Rust core executes (it needs no source data); `tokenizer_engine`
    overrides the recipe's; `epoch`: the epoch of a multi-epoch release it builds."""
    recipe = plan.recipe
    total = recipe.mixture.total
    sources = [
        {
            "name": s.name,
            "templates": s.templates,
            "fields": s.template_fields,
            "image_root": str(s.image_root) if s.image_root else None,
            "weight": s.spec.weight,
            "on_error": s.spec.on_error,
            "max_epochs": s.spec.max_epochs,
            # Only with audio: the plan (and the token store's keys) of other recipes unchanged.
            **({"audio_root": str(s.audio_root)} if recipe.model.audio is not None and s.audio_root else {}),
            **({"video_root": str(s.video_root)} if recipe.model.video is not None and s.video_root else {}),
        }
        for s in plan.sources
    ]
    return settings(plan.model, recipe.model.image, recipe.output, recipe.model.audio, recipe.model.video) | {
        "seed": recipe.recipe.seed,
        "epoch": epoch,
        "mixture": "natural" if isinstance(total, str) else dict(total),
        "alpha": recipe.mixture.alpha,
        "sources": sources,
        "tokenizer_engine": tokenizer_engine or recipe.model.tokenizer_engine,
    }


def settings(model: ModelFiles, image: ImageSpec | None, output: OutputSpec, audio: AudioSpec | None = None,
             video: VideoSpec | None = None) -> dict[str, Any]:
    """What shapes each sample's tokens: the chat template, its tokens, the image, audio
    and video rules and the output options (a build's plan, and `encode.ChatEncoder`'s)."""
    # Only with added tokens: the plan of every other recipe unchanged.
    added = {"added_tokens": list(model.added_tokens)} if model.added_tokens else {}
    return added | audio_settings(audio) | video_settings(video) | {
        "chat_template": model.chat_template,
        "bos_token": model.bos_token,
        "eos_token": model.eos_token,
        "image": msgspec.to_builtins(image) if image else None,
        "seq_len": output.seq_len,
        "train_on": output.train_on,
        "train_on_eos": output.train_on_eos,
        "overlong": output.overlong,
        "packing": output.packing,
        "max_images": output.max_images,
        "balance": output.balance,
        "shuffle": output.shuffle,
    }


def audio_settings(audio: AudioSpec | None) -> dict[str, Any]:
    """`{"audio": the core's audio plan}`, or nothing without an audio rule (so that the
    plan of a recipe without audio is what it was before audio existed)."""
    if audio is None:
        return {}
    rule = msgspec.to_builtins(audio)
    del rule["rule"]  # the only rule besides a fixed count: the core knows it by the keys
    return {"audio": rule}


def video_settings(video: VideoSpec | None) -> dict[str, Any]:
    """`{"video": the core's video plan}`, or nothing without a video rule (the plan of a
    recipe without video is what it was before video existed)."""
    if video is None:
        return {}
    rule = msgspec.to_builtins(video)
    del rule["rule"]  # the only rule besides a fixed count: the core knows it by the keys
    return {"video": rule}


def check_tokenizer_engine(value: object) -> None:
    """ValueError unless `value` is None or one of TOKENIZER_ENGINES."""
    if value is not None and value not in TOKENIZER_ENGINES:
        raise ValueError(f"tokenizer_engine: {value!r} is not one of {', '.join(repr(e) for e in TOKENIZER_ENGINES)}")


def make_compiler(plan: Plan, threads: int = 0, spill_dir: Path | None = None, tokenizer_engine: str | None = None,
                  epoch: int = 0) -> Any:
    """The core's compiler for `plan` (at `epoch`): render, tokenize, mask, mix, pack (rayon,
    GIL released). `tokenizer_engine`: "auto", "hf" or "fast" instead of the recipe's
    `[model] tokenizer_engine`."""
    check_tokenizer_engine(tokenizer_engine)
    encoded = msgspec.json.encode(core_plan(plan, tokenizer_engine, epoch))
    return _core.Compiler(encoded, str(plan.model.tokenizer_json), threads, str(spill_dir) if spill_dir else None)


def _list_parts(series: pl.Series) -> tuple[np.ndarray, pa.Array]:
    """(offsets starting at 0, flattened values) of a list column."""
    lengths = series.list.len().fill_null(0).to_numpy().astype(np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets, arrow(series).flatten()


def batch_columns(norm: Normalized, start: int, length: int) -> _BatchColumns:
    """The columns argument of `Compiler.add_batch` (and `preview_batch`) for rows
    start..start+length of a normalized source: NumPy arrays by name, and `fields` as
    (offsets, bytes) per template field in the plan's order."""
    part = norm.frame.slice(start, length)
    turn_offsets, contents = _list_parts(part[CONTENTS])
    _, roles = _list_parts(part[ROLES])
    content_offsets, content_data = string_buffers(contents)
    image_offsets, images = _list_parts(part[IMAGES])
    image_path_offsets, image_path_data = string_buffers(images)
    extra: dict[str, Any] = {}
    if IMAGE_BYTES in part.columns:  # images held in the source's files: their bytes, per image
        _, data = _list_parts(part[IMAGE_BYTES])
        extra["image_data_offsets"], extra["image_data"] = binary_buffers(data)
    if AUDIOS in part.columns:  # the clips' paths, per sample: the core reads their headers
        extra["audio_offsets"], audios = _list_parts(part[AUDIOS])
        extra["audio_path_offsets"], extra["audio_path_data"] = string_buffers(audios)
    if VIDEOS in part.columns:  # the clips' paths, per sample: the core reads their metadata
        extra["video_offsets"], videos = _list_parts(part[VIDEOS])
        extra["video_path_offsets"], extra["video_path_data"] = string_buffers(videos)
    return {
        **extra,
        "rows": part[ROW].to_numpy().astype(np.uint64, copy=False),
        "turn_offsets": turn_offsets,
        "roles": np.asarray(roles.to_numpy(zero_copy_only=False), dtype=np.uint8),
        "content_offsets": content_offsets,
        "content_data": content_data,
        "image_offsets": image_offsets,
        "image_path_offsets": image_path_offsets,
        "image_path_data": image_path_data,
        "fields": [string_buffers(arrow(part[template_column(name)])) for name in norm.source.template_fields],
    }
