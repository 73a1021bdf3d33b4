"""Layouts: how a source's resolved fields become turns, one function per layout —
`qa`, `caption`, `conversation` (LLaVA/ShareGPT from/value or OpenAI role/content) and
`alpaca`, `asr` — then the image and audio paths and template fields of the internal form. All column
operations; no Python per row."""

from __future__ import annotations

from typing import Callable

import polars as pl

from ..errors import SourceError, recipe_error
from ..recipe.plan import SourcePlan
from .. import imageref
from .columns import ASSISTANT, AUDIOS, CONTENTS, IMAGE_BYTES, IMAGES, ROLES, ROW, SYSTEM, USER, VIDEOS, Normalized, template_column
from .fields import Rows, as_text, require
from .joins import group_by_image

DEFAULT_ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
}
ROLE_CODES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
_TWO_TURNS = pl.lit([USER, ASSISTANT], dtype=pl.List(pl.UInt8))


def qa(frame: pl.DataFrame, source: SourcePlan, resolved: dict[str, str], notes: list[str]) -> pl.DataFrame:
    for key in ("question", "answer"):
        frame = require(frame, resolved[key], source, key, notes)
    return frame.with_columns(
        _TWO_TURNS.alias(ROLES),
        pl.concat_list(as_text(frame, resolved["question"]), as_text(frame, resolved["answer"])).alias(CONTENTS),
    )


def caption(frame: pl.DataFrame, source: SourcePlan, resolved: dict[str, str], notes: list[str]) -> pl.DataFrame:
    frame = require(frame, resolved["caption"], source, "caption", notes)
    return frame.with_columns(
        _TWO_TURNS.alias(ROLES),
        pl.concat_list(pl.lit(""), as_text(frame, resolved["caption"])).alias(CONTENTS),
    )


def asr(frame: pl.DataFrame, source: SourcePlan, resolved: dict[str, str], notes: list[str]) -> pl.DataFrame:
    """A clip and its transcript: the instruction (from the source's pool, "asr" by
    default) with the clip's placeholder as the user turn, the transcript trained."""
    for key in ("audio", "text"):
        frame = require(frame, resolved[key], source, key, notes)
    return frame.with_columns(
        _TWO_TURNS.alias(ROLES),
        pl.concat_list(pl.lit(""), as_text(frame, resolved["text"])).alias(CONTENTS),
    )


def _message_column(frame: pl.DataFrame, source: SourcePlan, resolved: dict[str, str]) -> str:
    if "conversations" in resolved:
        return resolved["conversations"]
    found = [c for c in ("conversations", "messages", "conversation") if c in frame.columns]
    if not found:
        raise SourceError(
            f"source '{source.name}' ({source.key}.fields.conversations): no 'conversations' or 'messages' column; "
            f"map the conversation column with fields.conversations (columns: {', '.join(c for c in frame.columns if not c.startswith('__'))})"
        )
    return found[0]


def _message_keys(frame: pl.DataFrame, name: str, col: str) -> tuple[str, str]:
    dtype = frame.schema[col]
    if not (isinstance(dtype, pl.List) and isinstance(dtype.inner, pl.Struct)):
        raise SourceError(f"source '{name}': column '{col}' is {dtype}, not a list of messages")
    keys = {f.name for f in dtype.inner.fields}
    if {"from", "value"} <= keys:
        return "from", "value"
    if {"role", "content"} <= keys:
        return "role", "content"
    raise SourceError(
        f"source '{name}': messages in '{col}' have keys {sorted(keys)}; expected from/value (LLaVA, ShareGPT) or role/content (OpenAI)"
    )


def _role_codes(source: SourcePlan) -> dict[str, int]:
    at = source.key
    for k, v in source.spec.roles.items():
        if v not in ROLE_CODES:
            raise recipe_error(f"{at}.roles.{k}: '{v}' is not a role (system, user, assistant)", key=f"{at}.roles.{k}")
    return {k: ROLE_CODES[v] for k, v in {**DEFAULT_ROLES, **source.spec.roles}.items()}


def conversation(frame: pl.DataFrame, source: SourcePlan, resolved: dict[str, str], notes: list[str]) -> pl.DataFrame:
    name = source.name
    col = _message_column(frame, source, resolved)
    role_key, text_key = _message_keys(frame, name, col)
    codes = _role_codes(source)
    turns = frame.select(ROW, pl.col(col).alias("__t")).explode("__t")
    raw_roles = turns.select(ROW, pl.col("__t").struct.field(role_key).alias("r"))
    unknown = raw_roles.filter(pl.col("r").is_not_null() & ~pl.col("r").is_in(list(codes)))
    if unknown.height:
        row, role = unknown.row(0)
        raise SourceError(
            f"source '{name}', row {row}, field '{col}[*].{role_key}': unknown role '{role}'; "
            f"map it with {source.key}.roles = {{ {role} = \"user\" }}"
        )
    role_expr = pl.element().struct.field(role_key).replace_strict(codes, return_dtype=pl.UInt8, default=None)
    text_expr = pl.element().struct.field(text_key).cast(pl.String)
    frame = frame.with_columns(
        pl.col(col).list.eval(role_expr).alias(ROLES),
        pl.col(col).list.eval(text_expr).alias(CONTENTS),
    )
    empty = frame.filter(pl.col(col).is_null() | (pl.col(col).list.len() == 0))
    if empty.height:
        raise SourceError(f"source '{name}', row {empty[ROW][0]}, field '{col}': empty conversation")
    bad = frame.filter(pl.col(ROLES).list.eval(pl.element().is_null()).list.any() | pl.col(CONTENTS).list.eval(pl.element().is_null()).list.any())
    if bad.height:
        raise SourceError(f"source '{name}', row {bad[ROW][0]}, field '{col}': a message without {role_key} or {text_key}")
    return frame


def alpaca(frame: pl.DataFrame, source: SourcePlan, resolved: dict[str, str], notes: list[str]) -> pl.DataFrame:
    spec = source.spec
    cols: dict[str, str] = {}
    for key in ("instruction", "input", "output"):
        if key in resolved:
            cols[key] = resolved[key]
        elif key in frame.columns:
            cols[key] = key
        elif key != "input":
            raise SourceError(f"source '{spec.name}' ({source.key}.fields.{key}): no '{key}' column")
    for key in ("instruction", "output"):
        frame = require(frame, cols[key], source, key, notes)
    prompt = pl.col(cols["instruction"]).cast(pl.String)
    if "input" in cols:
        inp = pl.col(cols["input"]).cast(pl.String).fill_null("")
        prompt = pl.when(inp.str.strip_chars() == "").then(prompt).otherwise(prompt + "\n\n" + inp)
    return frame.with_columns(
        _TWO_TURNS.alias(ROLES),
        pl.concat_list(prompt, pl.col(cols["output"]).cast(pl.String)).alias(CONTENTS),
    )


LAYOUTS: dict[str, Callable[[pl.DataFrame, SourcePlan, dict[str, str], list[str]], pl.DataFrame]] = {
    "qa": qa,
    "caption": caption,
    "conversation": conversation,
    "alpaca": alpaca,
    "asr": asr,
}


def _clips_expr(resolved: dict[str, str], medium: str) -> pl.Expr | None:
    """A sample's clip paths of `medium` ("audio" or "video"): fields.audios (a list) or
    fields.audio (one), likewise videos or video; None when the source maps neither."""
    empty = pl.lit([], dtype=pl.List(pl.String))
    if f"{medium}s" in resolved:
        return pl.col(resolved[f"{medium}s"]).cast(pl.List(pl.String)).list.drop_nulls().fill_null(empty)
    if medium in resolved:
        return pl.concat_list(pl.col(resolved[medium]).cast(pl.String)).list.drop_nulls()
    return None


def _check_clip_paths(frame: pl.DataFrame, source: SourcePlan, column: str, medium: str) -> None:
    paths = frame.select(ROW, column).explode(column).drop_nulls(column)
    bad = paths.filter(pl.col(column).str.starts_with("/") | pl.col(column).str.contains(r"(^|/)\.\.(/|$)"))
    if bad.height:
        row, path = bad.row(0)
        raise SourceError(f"source '{source.name}', row {row}, field '{medium}': the path '{path}' escapes the source's {medium}_root")


def _images_expr(frame: pl.DataFrame, resolved: dict[str, str]) -> pl.Expr:
    empty = pl.lit([], dtype=pl.List(pl.String))
    if "images" in resolved:
        return pl.col(resolved["images"]).cast(pl.List(pl.String)).list.drop_nulls().fill_null(empty)
    if "image" in resolved:
        return pl.concat_list(pl.col(resolved["image"]).cast(pl.String)).list.drop_nulls()
    if "image" in frame.columns and frame.schema["image"] == pl.String:
        # LLaVA files carry `image` on multimodal rows and omit it on text-only ones.
        return pl.concat_list(pl.col("image")).list.drop_nulls()
    return empty


def _check_image_paths(frame: pl.DataFrame, source: SourcePlan) -> None:
    name = source.name
    paths = frame.select(ROW, IMAGES).explode(IMAGES).drop_nulls(IMAGES)
    bad = paths.filter(pl.col(IMAGES).str.starts_with("/") | pl.col(IMAGES).str.contains(r"(^|/)\.\.(/|$)"))
    if bad.height:
        row, path = bad.row(0)
        raise SourceError(f"source '{name}', row {row}, field 'image': the path '{path}' escapes the source's image_root")
    if source.container is None:
        # A loose path that reads as a container reference would be opened as one.
        like = paths.filter(
            pl.col(IMAGES).str.contains(imageref.RANGE.pattern) | pl.col(IMAGES).str.contains(imageref.CELL.pattern)
        )
        if like.height:
            row, path = like.row(0)
            raise SourceError(
                f"source '{name}', row {row}, field 'image': the path '{path}' reads as a container reference "
                "(…#offset=N,size=N or …#rg=N,row=N,col=NAME); rename the file"
            )


def to_internal(rows: Rows) -> Normalized:
    """The rows (fields resolved, LLM stages applied) in the internal form."""
    source, frame, resolved = rows.source, rows.frame, rows.resolved
    frame = LAYOUTS[source.spec.layout](frame, source, resolved, rows.notes)
    frame = frame.with_columns(_images_expr(frame, resolved).alias(IMAGES))
    _check_image_paths(frame, source)
    for column, medium in ((AUDIOS, "audio"), (VIDEOS, "video")):
        clips = _clips_expr(resolved, medium)
        if clips is not None:
            frame = frame.with_columns(clips.alias(column))
            _check_clip_paths(frame, source, column, medium)
    if source.spec.group_by == "image":
        frame = require(frame, resolved["image"], source, "image", rows.notes)
        frame = group_by_image(frame, resolved["image"])
    texts = [as_text(frame, resolved[k]).fill_null("").alias(template_column(k)) for k in source.template_fields]
    carried = [c for c in (IMAGE_BYTES, AUDIOS, VIDEOS) if c in frame.columns]
    out = frame.select(ROW, ROLES, CONTENTS, IMAGES, *carried, *texts)
    return Normalized(source=source, frame=out.rechunk(), notes=rows.notes, resolved=rows.found)
