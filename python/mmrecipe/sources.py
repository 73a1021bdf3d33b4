"""Source readers: files in jsonl / json / parquet / csv, read with polars, normalized to
one internal form per sample: turns (role code, text), image paths, and the extra fields
that instruction templates use. Everything is column operations; no Python per row."""

from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from . import fieldpath
from .errors import RecipeError, SourceError
from .recipe import Recipe, SourceSpec, resolve_path

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

# Fields a layout consumes itself; any other mapped field is available to templates.
RESERVED = {"image", "images", "question", "answer", "caption", "conversations", "instruction", "input", "output"}

ROW, ROLES, CONTENTS, IMAGES = "__row", "__roles", "__contents", "__images"


@dataclass
class Normalized:
    """One source in the internal form: columns ROW, ROLES, CONTENTS, IMAGES, and one
    column per template field (named by `field_names`)."""

    spec: SourceSpec
    frame: pl.DataFrame
    files: list[Path]
    field_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.frame.height


def source_files(recipe: Recipe, index: int) -> list[Path]:
    spec = recipe.source[index]
    patterns = [spec.path] if isinstance(spec.path, str) else list(spec.path)
    files: list[Path] = []
    for pat in patterns:
        full = resolve_path(recipe, pat)
        if any(ch in pat for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(str(full), recursive=True))
            if not matches:
                raise SourceError(f"source '{spec.name}' (source[{index}].path): no file matches '{pat}'")
            files.extend(matches)
        elif not full.is_file():
            raise SourceError(f"source '{spec.name}' (source[{index}].path): file not found: {full}")
        else:
            files.append(full)
    return files


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
                value = msgspec.json.decode(line)
            except msgspec.DecodeError as e:
                raise SourceError(f"source '{spec.name}': {path}, line {number}: malformed JSON ({e})") from None
            except UnicodeDecodeError:
                raise SourceError(f"source '{spec.name}': {path}, line {number}: not UTF-8 text") from None
            if not isinstance(value, dict):
                raise SourceError(f"source '{spec.name}': {path}, line {number}: expected a JSON object, got {type(value).__name__}")


def read_source(recipe: Recipe, index: int) -> pl.DataFrame:
    spec = recipe.source[index]
    files = source_files(recipe, index)
    frames = [read_file(spec, f) for f in files]
    frame = frames[0] if len(frames) == 1 else pl.concat(frames, how="diagonal_relaxed")
    if frame.height == 0:
        raise SourceError(f"source '{spec.name}': no rows in {', '.join(str(f) for f in files)}")
    return frame


def _resolve(frame: pl.DataFrame, spec: SourceSpec, index: int, key: str, out: str) -> pl.DataFrame:
    """Adds column `out` holding the field `key` of the source, resolved on the data."""
    text = spec.fields[key]
    where = f"source[{index}].fields.{key}"
    try:
        path = fieldpath.parse(text)
    except fieldpath.FieldPathError as e:
        raise RecipeError(f"{where}: {e}", key=where) from None
    if path.column not in frame.columns:
        raise SourceError(
            f"{where}: source '{spec.name}' has no column '{path.column}' (columns: {', '.join(frame.columns)})"
        )
    try:
        if path.reducer == "most_common":
            frame = fieldpath.most_common(frame, path.expr(), out)
        else:
            frame = frame.with_columns(path.expr().alias(out))
    except pl.exceptions.PolarsError as e:
        raise SourceError(f"{where}: the path '{text}' does not fit source '{spec.name}': {e}") from None
    if frame[out].null_count() == frame.height:
        raise SourceError(f"{where}: the path '{text}' resolves on no row of source '{spec.name}'")
    return frame


def _as_text(frame: pl.DataFrame, col: str) -> pl.Expr:
    dtype = frame.schema[col]
    if isinstance(dtype, pl.List):
        return pl.col(col).list.eval(pl.element().cast(pl.String)).list.join("\n")
    return pl.col(col).cast(pl.String)


def _require(frame: pl.DataFrame, col: str, spec: SourceSpec, key: str) -> None:
    nulls = frame[col].is_null()
    if nulls.any():
        row = int(frame.filter(nulls)[ROW][0])
        raise SourceError(f"source '{spec.name}', row {row}, field '{key}' ({spec.fields.get(key, key)}): missing value")


def normalize(recipe: Recipe, index: int, frame: pl.DataFrame | None = None) -> Normalized:
    """Reads source `index` of the recipe and brings it to the internal form."""
    spec = recipe.source[index]
    files = source_files(recipe, index)
    if frame is None:
        frame = read_source(recipe, index)
    frame = frame.with_row_index(ROW).with_columns(pl.col(ROW).cast(pl.UInt64))

    resolved: dict[str, str] = {}
    for key in spec.fields:
        resolved[key] = f"__f_{key}"
        frame = _resolve(frame, spec, index, key, resolved[key])

    if spec.layout == "conversation":
        frame = _conversation(frame, spec, index, resolved)
    elif spec.layout == "qa":
        for key in ("question", "answer"):
            _require(frame, resolved[key], spec, key)
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
        frame = _alpaca(frame, spec, index, resolved)

    frame = frame.with_columns(_images_expr(frame, resolved).alias(IMAGES))
    _check_image_paths(frame, spec)
    names = [k for k in spec.fields if k not in RESERVED]
    out = frame.select(ROW, ROLES, CONTENTS, IMAGES, *[_as_text(frame, resolved[k]).fill_null("").alias(f"__t_{k}") for k in names])
    return Normalized(spec=spec, frame=out, files=files, field_names=names)


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


def _conversation(frame: pl.DataFrame, spec: SourceSpec, index: int, resolved: dict[str, str]) -> pl.DataFrame:
    if "conversations" in resolved:
        col = resolved["conversations"]
    else:
        found = [c for c in ("conversations", "messages", "conversation") if c in frame.columns]
        if not found:
            raise SourceError(
                f"source '{spec.name}' (source[{index}].fields.conversations): no 'conversations' or 'messages' column; "
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
            raise RecipeError(f"source[{index}].roles.{k}: '{v}' is not a role (system, user, assistant)", key=f"source[{index}].roles.{k}")
    codes = {k: ROLE_CODES[v] for k, v in mapping.items()}
    turns = frame.select(ROW, pl.col(col).alias("__t")).explode("__t")
    raw_roles = turns.select(ROW, pl.col("__t").struct.field(role_key).alias("r"))
    unknown = raw_roles.filter(pl.col("r").is_not_null() & ~pl.col("r").is_in(list(codes)))
    if unknown.height:
        row, role = unknown.row(0)
        raise SourceError(
            f"source '{spec.name}', row {row}, field '{col}[*].{role_key}': unknown role '{role}'; "
            f"map it with source[{index}].roles = {{ {role} = \"user\" }}"
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


def _alpaca(frame: pl.DataFrame, spec: SourceSpec, index: int, resolved: dict[str, str]) -> pl.DataFrame:
    cols = {}
    for key in ("instruction", "input", "output"):
        if key in resolved:
            cols[key] = resolved[key]
        elif key in frame.columns:
            cols[key] = key
        elif key != "input":
            raise SourceError(f"source '{spec.name}' (source[{index}].fields.{key}): no '{key}' column")
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
