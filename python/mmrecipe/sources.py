"""Source readers: files in jsonl / json / parquet / csv, read with polars, normalized to
one internal form per sample: turns (role code, text), image paths, and the extra fields
that instruction templates use. A source may join a second table by key (`join`) and
fold all questions about one image into one conversation (`group_by = "image"`).
Everything is column operations; no Python per row."""

from __future__ import annotations

import glob
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import msgspec
import polars as pl

from . import _core, fieldpath
from .errors import DataError, SourceError, recipe_error
from .recipe import RESERVED_FIELDS, JoinSpec, Recipe, SourceSpec, generator_of, resolve_path, source_key

if TYPE_CHECKING:
    from .stages import LLMStages

SYSTEM, USER, ASSISTANT = 0, 1, 2
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

RESERVED = RESERVED_FIELDS

ROW, ROLES, CONTENTS, IMAGES = "__row", "__roles", "__contents", "__images"


@dataclass
class Normalized:
    """One source in the internal form: columns ROW, ROLES, CONTENTS, IMAGES, and one
    column per template field (named by `field_names`)."""

    spec: SourceSpec
    frame: pl.DataFrame
    files: list[Path]
    field_names: list[str] = field(default_factory=list)
    #: What reading dropped on the way (rows without a join match under on_error = "skip").
    notes: list[str] = field(default_factory=list)
    #: Field keys that resolved to a value on at least one row.
    resolved: set[str] = field(default_factory=set)

    def __len__(self) -> int:
        return self.frame.height


def template_fields(spec: SourceSpec) -> list[str]:
    """The mapped fields instruction templates may use (those the layout does not consume)."""
    return [k for k in spec.fields if k not in RESERVED]


def source_files(recipe: Recipe, index: int) -> list[Path]:
    spec = recipe.source[index]
    at = source_key(recipe, index)
    patterns = [spec.path] if isinstance(spec.path, str) else list(spec.path)
    files: list[Path] = []
    for pat in patterns:
        full = resolve_path(recipe, pat)
        if any(ch in pat for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(str(full), recursive=True))
            if not matches:
                raise SourceError(f"source '{spec.name}' ({at}.path): no file matches '{pat}'")
            files.extend(matches)
        elif not full.is_file():
            raise SourceError(f"source '{spec.name}' ({at}.path): file not found: {full}")
        else:
            files.append(full)
    return files


def join_file(recipe: Recipe, index: int, files: list[Path]) -> Path:
    """The file a source's `join` reads: `join.path`, else the source's own file."""
    spec = recipe.source[index]
    at = source_key(recipe, index)
    assert spec.join is not None
    if spec.join.path is None:
        return files[0]
    full = resolve_path(recipe, spec.join.path)
    if not full.is_file():
        raise SourceError(f"source '{spec.name}' ({at}.join.path): file not found: {full}")
    return full


def image_root(recipe: Recipe, index: int, files: list[Path]) -> Path | None:
    """The folder a source's image paths are relative to (as the build resolves them)."""
    spec = recipe.source[index]
    if spec.image_root:
        return resolve_path(recipe, spec.image_root)
    return files[0].parent if files else None


def _format_of(spec: SourceSpec, path: Path) -> str:
    if spec.format:
        return spec.format
    ext = path.suffix.lower().lstrip(".")
    if ext in ("jsonl", "ndjson"):
        return "jsonl"
    if ext in ("json", "parquet", "csv"):
        return ext
    raise SourceError(f"source '{spec.name}': cannot tell the format of {path.name}; set format = \"jsonl\" | \"json\" | \"parquet\" | \"csv\"")


def read_file(spec: SourceSpec, path: Path) -> pl.DataFrame:
    fmt = _format_of(spec, path)
    if path.stat().st_size == 0:
        return pl.DataFrame()
    try:
        if fmt == "jsonl":
            try:
                return pl.read_ndjson(path, infer_schema_length=None)
            except Exception:
                _raise_bad_json_line(spec, path)
                raise
        if fmt == "json":
            frame = pl.read_json(path, infer_schema_length=None)
            if spec.json_key:
                if spec.json_key not in frame.columns:
                    raise SourceError(f"source '{spec.name}': {path.name} has no top-level key '{spec.json_key}' (json_key)")
                frame = frame.select(pl.col(spec.json_key).explode()).unnest(spec.json_key)
            return frame
        if fmt == "parquet":
            return pl.read_parquet(path)
        return pl.read_csv(path, infer_schema_length=None)
    except SourceError:
        raise
    except Exception as e:  # polars raises several exception types for unreadable input
        raise SourceError(f"source '{spec.name}': cannot read {path} as {fmt}: {e}") from None


def _raise_bad_json_line(spec: SourceSpec, path: Path) -> None:
    """On the error path only: finds the first line that is not a JSON object."""
    import msgspec

    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                line.decode("utf-8")  # checked first: msgspec versions report bad UTF-8 differently
            except UnicodeDecodeError:
                raise SourceError(f"source '{spec.name}': {path}, line {number}: not UTF-8 text") from None
            try:
                value = msgspec.json.decode(line)
            except msgspec.DecodeError as e:
                raise SourceError(f"source '{spec.name}': {path}, line {number}: malformed JSON ({e})") from None
            if not isinstance(value, dict):
                raise SourceError(f"source '{spec.name}': {path}, line {number}: expected a JSON object, got {type(value).__name__}")


def read_source(recipe: Recipe, index: int) -> pl.DataFrame:
    spec = recipe.source[index]
    files = source_files(recipe, index)
    frames = [read_file(spec, f) for f in files]
    frame = frames[0] if len(frames) == 1 else pl.concat(frames, how="diagonal_relaxed")
    if frame.height == 0:
        raise _no_rows(spec, files)
    return frame


def _data_columns(frame: pl.DataFrame) -> str:
    return ", ".join(c for c in frame.columns if not c.startswith("__"))


def _resolve(frame: pl.DataFrame, spec: SourceSpec, at: str, key: str, out: str, partial: bool = False) -> pl.DataFrame:
    """Adds column `out` holding the field `key` of the source, resolved on the data. In a
    slice of a source (`partial`), a path this slice cannot resolve gives nulls; whether it
    resolves somewhere is checked over the whole source (`check_resolved`)."""
    text = spec.fields[key]
    where = f"{at}.fields.{key}"
    try:
        path = fieldpath.parse_field(text)
    except fieldpath.FieldPathError as e:
        raise recipe_error(f"{where}: {e}", key=where) from None
    for column in path.columns:
        if column not in frame.columns:
            if partial:
                return frame.with_columns(pl.lit(None).alias(out))
            raise SourceError(f"{where}: source '{spec.name}' has no column '{column}' (columns: {_data_columns(frame)})")
    try:
        frame = fieldpath.resolve(frame, path, out)
    except pl.exceptions.PolarsError as e:
        if partial:
            return frame.with_columns(pl.lit(None).alias(out))
        raise SourceError(f"{where}: the path '{text}' does not fit source '{spec.name}': {e}") from None
    if frame[out].null_count() == frame.height and not partial:
        raise _resolves_on_no_row(spec, at, key)
    return frame


def streamable(recipe: Recipe, index: int) -> bool:
    """Whether a source can be read a slice at a time: JSON Lines or JSON arrays, with no
    step that needs all rows at once (joins, group_by, a list under a key)."""
    spec = recipe.source[index]
    if spec.group_by is not None or spec.join is not None or spec.json_key:
        return False
    return all(_format_of(spec, f) in ("jsonl", "json") for f in source_files(recipe, index))


def iter_normalized(recipe: Recipe, index: int, rows: int, stages: LLMStages | None = None) -> Iterator[Normalized]:
    """The source in the internal form, `rows` records at a time when it is streamable
    (memory then stays flat in the source's size), else all at once."""
    if not streamable(recipe, index):
        yield normalize(recipe, index, stages=stages)
        return
    spec = recipe.source[index]
    files = source_files(recipe, index)
    offset = 0
    found: set[str] = set()
    for path in files:
        try:
            reader = _core.JsonChunks(str(path), _format_of(spec, path) == "json")
            while (chunk := reader.next_chunk(rows)) is not None:
                try:
                    frame = pl.read_ndjson(io.BytesIO(chunk), infer_schema_length=None)
                except Exception:
                    if _format_of(spec, path) == "jsonl":
                        _raise_bad_json_line(spec, path)
                    raise
                norm = normalize(recipe, index, frame=frame, row_offset=offset, partial=True, files=files, stages=stages)
                offset += frame.height
                found |= norm.resolved
                yield norm
        except (ValueError, OSError, pl.exceptions.PolarsError) as e:
            raise SourceError(f"source '{spec.name}': cannot read {path}: {e}") from None
    if offset == 0:
        raise _no_rows(spec, files)
    for key in spec.fields:
        if key not in found:
            raise _resolves_on_no_row(spec, source_key(recipe, index), key)


def _no_rows(spec: SourceSpec, files: list[Path]) -> SourceError:
    return SourceError(f"source '{spec.name}': no rows in {', '.join(str(f) for f in files)}")


def _resolves_on_no_row(spec: SourceSpec, at: str, key: str) -> SourceError:
    return SourceError(f"{at}.fields.{key}: the path '{spec.fields[key]}' resolves on no row of source '{spec.name}'")


def _as_text(frame: pl.DataFrame, col: str) -> pl.Expr:
    dtype = frame.schema[col]
    if isinstance(dtype, pl.List):
        return pl.col(col).list.eval(pl.element().cast(pl.String)).list.join("\n")
    return pl.col(col).cast(pl.String)


def _context_text(frame: pl.DataFrame, col: str) -> pl.Expr:
    """A context field as text for a prompt: lists one item per line, records as JSON
    (COCO boxes: {"category": "dog", "bbox": [..]})."""
    dtype = frame.schema[col]
    if isinstance(dtype, pl.List) and isinstance(dtype.inner, pl.Struct):
        return pl.col(col).list.eval(pl.element().struct.json_encode()).list.join("\n")
    if isinstance(dtype, pl.Struct):
        return pl.col(col).struct.json_encode()
    if isinstance(dtype, pl.List) and isinstance(dtype.inner, pl.List):
        return pl.col(col).list.eval(pl.element().cast(pl.List(pl.String)).list.join(", ")).list.join("\n")
    return _as_text(frame, col)


def _require(frame: pl.DataFrame, col: str, spec: SourceSpec, key: str) -> None:
    nulls = frame[col].is_null()
    if nulls.any():
        row = int(frame.filter(nulls)[ROW][0])
        raise SourceError(f"source '{spec.name}', row {row}, field '{key}' ({spec.fields.get(key, key)}): missing value")


def normalize(
    recipe: Recipe,
    index: int,
    frame: pl.DataFrame | None = None,
    row_offset: int = 0,
    partial: bool = False,
    files: list[Path] | None = None,
    stages: LLMStages | None = None,
) -> Normalized:
    """Reads source `index` of the recipe and brings it to the internal form. With `frame`,
    normalizes those rows (numbered from `row_offset`); `partial` says they are one slice
    of the source, where a field may be absent without being an error. `files`: the
    source's files when the caller has them already. `stages` runs answer lengthening
    and conversation generation (default: served from their caches only, no calls)."""
    spec = recipe.source[index]
    at = source_key(recipe, index)
    if files is None:
        files = source_files(recipe, index)
    if frame is None:
        frame = read_source(recipe, index)
    frame = frame.with_row_index(ROW, offset=row_offset).with_columns(pl.col(ROW).cast(pl.UInt64))
    notes: list[str] = []
    if spec.join is not None:
        joined = join_file(recipe, index, files)
        frame = _join(frame, spec, at, joined, notes)
        files = files + [joined] if joined not in files else files

    resolved: dict[str, str] = {}
    for key in spec.fields:
        resolved[key] = f"__f_{key}"
        frame = _resolve(frame, spec, at, key, resolved[key], partial)
    found = {k for k, col in resolved.items() if frame[col].null_count() < frame.height}

    generated = generator_of(recipe, index)
    if generated is not None:
        # The LLM writes this source's conversations from the context fields.
        j, g = generated
        context_spec = msgspec.structs.replace(spec, fields=g.fields)
        context: dict[str, pl.Expr] = {}
        for key in g.fields:
            frame = _resolve(frame, context_spec, at, key, f"__g_{key}", partial)
            context[key] = _context_text(frame, f"__g_{key}")
        frame = _stages(stages, recipe).generate(frame, recipe, index, context)
    if spec.layout == "conversation":
        frame = _conversation(frame, spec, at, resolved)
    elif spec.layout == "qa":
        for key in ("question", "answer"):
            _require(frame, resolved[key], spec, key)
        if spec.lengthen is not None:
            frame = _stages(stages, recipe).lengthen(frame, recipe, index, {k: _as_text(frame, c) for k, c in resolved.items()}, resolved["answer"])
        frame = frame.with_columns(
            pl.lit([USER, ASSISTANT], dtype=pl.List(pl.UInt8)).alias(ROLES),
            pl.concat_list(_as_text(frame, resolved["question"]), _as_text(frame, resolved["answer"])).alias(CONTENTS),
        )
    elif spec.layout == "caption":
        _require(frame, resolved["caption"], spec, "caption")
        frame = frame.with_columns(
            pl.lit([USER, ASSISTANT], dtype=pl.List(pl.UInt8)).alias(ROLES),
            pl.concat_list(pl.lit(""), _as_text(frame, resolved["caption"])).alias(CONTENTS),
        )
    elif spec.layout == "alpaca":
        frame = _alpaca(frame, spec, at, resolved)

    frame = frame.with_columns(_images_expr(frame, resolved).alias(IMAGES))
    _check_image_paths(frame, spec)
    if spec.group_by == "image":
        _require(frame, resolved["image"], spec, "image")
        frame = _group_by_image(frame, resolved["image"])
    names = template_fields(spec)
    out = frame.select(ROW, ROLES, CONTENTS, IMAGES, *[_as_text(frame, resolved[k]).fill_null("").alias(f"__t_{k}") for k in names])
    return Normalized(spec=spec, frame=out.rechunk(), files=files, field_names=names, notes=notes, resolved=found)


def _stages(stages: LLMStages | None, recipe: Recipe) -> LLMStages:
    if stages is not None:
        return stages
    from .stages import LLMStages

    return LLMStages(recipe, mode="cache", progress=False)


def _group_by_image(frame: pl.DataFrame, image: str) -> pl.DataFrame:
    """One row per image: its questions and answers as alternating turns in the order of
    the original rows (LLaVA-1.5); ROW becomes the group's first original row."""
    return (
        frame.sort(ROW)
        .group_by(pl.col(image).cast(pl.String).alias("__group"), maintain_order=True)
        .agg(pl.col(ROW).first(), pl.col(ROLES).explode(), pl.col(CONTENTS).explode(), pl.col(IMAGES).first())
        .drop("__group")
    )


def _join(frame: pl.DataFrame, spec: SourceSpec, at: str, path: Path, notes: list[str]) -> pl.DataFrame:
    """The source's rows with the columns of their matching record in `path` (a left
    join on join.left_on = join.right_on; columns the rows already have get `_right`)."""
    join = spec.join
    assert join is not None
    where = f"{at}.join"
    right = read_file(msgspec.structs.replace(spec, format=join.format, json_key=join.json_key), path)
    if join.left_on not in frame.columns:
        raise SourceError(f"{where}.left_on: source '{spec.name}' has no column '{join.left_on}' (columns: {_data_columns(frame)})")
    if join.right_on not in right.columns:
        raise SourceError(f"{where}.right_on: {path.name} has no column '{join.right_on}' (columns: {', '.join(right.columns)})")
    right = right.filter(pl.col(join.right_on).is_not_null())  # a null key names no record
    right = _unique_keys(right, join, where, path).with_columns(pl.lit(True).alias("__matched"))
    left_key, right_key = _key_types(frame, right, join)
    joined = frame.join(right, left_on=left_key, right_on=right_key, how="left", maintain_order="left", suffix="_right")
    missing = joined.filter(pl.col("__matched").is_null())
    if missing.height:
        joined = _unmatched(joined, missing, spec, join, path, notes)
    return joined.drop("__matched")


def _unique_keys(right: pl.DataFrame, join: JoinSpec, where: str, path: Path) -> pl.DataFrame:
    """A joined key must name one record, or rows would silently multiply."""
    counts = right.group_by(join.right_on).len().filter(pl.col("len") > 1)
    if counts.height:
        key, n = counts.row(0)
        raise SourceError(
            f"{where}.right_on: '{join.right_on}' = {key!r} appears {n} times in {path.name} "
            f"({counts.height} keys repeat); join on a column that is unique in the joined file"
        )
    return right


def _key_types(frame: pl.DataFrame, right: pl.DataFrame, join: JoinSpec) -> tuple[pl.Expr, pl.Expr]:
    """Join keys of different types (123 and "123") are compared as text."""
    left, rightk = pl.col(join.left_on), pl.col(join.right_on)
    if frame.schema[join.left_on] != right.schema[join.right_on]:
        return left.cast(pl.String), rightk.cast(pl.String)
    return left, rightk


def _unmatched(joined: pl.DataFrame, missing: pl.DataFrame, spec: SourceSpec, join: JoinSpec, path: Path, notes: list[str]) -> pl.DataFrame:
    """Rows whose key has no record: a data error under the source's on_error policy."""
    row, key = missing.select(ROW, join.left_on).row(0)
    what = f"{missing.height} of {joined.height} rows have no record in {path.name} with {join.right_on} = their {join.left_on}"
    if spec.on_error == "skip":
        notes.append(f"source '{spec.name}': {what} (first: row {row}, {join.left_on} = {key!r}); skipped")
        return joined.filter(pl.col("__matched").is_not_null())
    err = DataError(
        f"source '{spec.name}', row {row}, field '{join.left_on}': no record in {path.name} with "
        f"{join.right_on} = {key!r} ({what}); fix the files, or set on_error = \"skip\" to drop such rows"
    )
    err.source, err.row, err.field = spec.name, int(row), join.left_on
    raise err


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


def _check_image_paths(frame: pl.DataFrame, spec: SourceSpec) -> None:
    paths = frame.select(ROW, IMAGES).explode(IMAGES).drop_nulls(IMAGES)
    bad = paths.filter(pl.col(IMAGES).str.starts_with("/") | pl.col(IMAGES).str.contains(r"(^|/)\.\.(/|$)"))
    if bad.height:
        row, path = bad.row(0)
        raise SourceError(
            f"source '{spec.name}', row {row}, field 'image': the path '{path}' escapes the source's image_root"
        )


def _conversation(frame: pl.DataFrame, spec: SourceSpec, at: str, resolved: dict[str, str]) -> pl.DataFrame:
    if "conversations" in resolved:
        col = resolved["conversations"]
    else:
        found = [c for c in ("conversations", "messages", "conversation") if c in frame.columns]
        if not found:
            raise SourceError(
                f"source '{spec.name}' ({at}.fields.conversations): no 'conversations' or 'messages' column; "
                f"map the conversation column with fields.conversations (columns: {', '.join(c for c in frame.columns if not c.startswith('__'))})"
            )
        col = found[0]
    dtype = frame.schema[col]
    if not (isinstance(dtype, pl.List) and isinstance(dtype.inner, pl.Struct)):
        raise SourceError(f"source '{spec.name}': column '{col}' is {dtype}, not a list of messages")
    keys = {f.name for f in dtype.inner.fields}
    if {"from", "value"} <= keys:
        role_key, text_key = "from", "value"
    elif {"role", "content"} <= keys:
        role_key, text_key = "role", "content"
    else:
        raise SourceError(
            f"source '{spec.name}': messages in '{col}' have keys {sorted(keys)}; expected from/value (LLaVA, ShareGPT) or role/content (OpenAI)"
        )
    mapping = {**DEFAULT_ROLES, **spec.roles}
    for k, v in spec.roles.items():
        if v not in ROLE_CODES:
            raise recipe_error(f"{at}.roles.{k}: '{v}' is not a role (system, user, assistant)", key=f"{at}.roles.{k}")
    codes = {k: ROLE_CODES[v] for k, v in mapping.items()}
    turns = frame.select(ROW, pl.col(col).alias("__t")).explode("__t")
    raw_roles = turns.select(ROW, pl.col("__t").struct.field(role_key).alias("r"))
    unknown = raw_roles.filter(pl.col("r").is_not_null() & ~pl.col("r").is_in(list(codes)))
    if unknown.height:
        row, role = unknown.row(0)
        raise SourceError(
            f"source '{spec.name}', row {row}, field '{col}[*].{role_key}': unknown role '{role}'; "
            f"map it with {at}.roles = {{ {role} = \"user\" }}"
        )
    role_expr = pl.element().struct.field(role_key).replace_strict(codes, return_dtype=pl.UInt8, default=None)
    text_expr = pl.element().struct.field(text_key).cast(pl.String)
    frame = frame.with_columns(
        pl.col(col).list.eval(role_expr).alias(ROLES),
        pl.col(col).list.eval(text_expr).alias(CONTENTS),
    )
    empty = frame.filter(pl.col(col).is_null() | (pl.col(col).list.len() == 0))
    if empty.height:
        raise SourceError(f"source '{spec.name}', row {empty[ROW][0]}, field '{col}': empty conversation")
    bad = frame.filter(pl.col(ROLES).list.eval(pl.element().is_null()).list.any() | pl.col(CONTENTS).list.eval(pl.element().is_null()).list.any())
    if bad.height:
        raise SourceError(f"source '{spec.name}', row {bad[ROW][0]}, field '{col}': a message without {role_key} or {text_key}")
    return frame


def _alpaca(frame: pl.DataFrame, spec: SourceSpec, at: str, resolved: dict[str, str]) -> pl.DataFrame:
    cols: dict[str, str] = {}
    for key in ("instruction", "input", "output"):
        if key in resolved:
            cols[key] = resolved[key]
        elif key in frame.columns:
            cols[key] = key
        elif key != "input":
            raise SourceError(f"source '{spec.name}' ({at}.fields.{key}): no '{key}' column")
    for key in ("instruction", "output"):
        _require(frame, cols[key], spec, key)
    prompt = pl.col(cols["instruction"]).cast(pl.String)
    if "input" in cols:
        inp = pl.col(cols["input"]).cast(pl.String).fill_null("")
        prompt = pl.when(inp.str.strip_chars() == "").then(prompt).otherwise(prompt + "\n\n" + inp)
    return frame.with_columns(
        pl.lit([USER, ASSISTANT], dtype=pl.List(pl.UInt8)).alias(ROLES),
        pl.concat_list(prompt, pl.col(cols["output"]).cast(pl.String)).alias(CONTENTS),
    )
