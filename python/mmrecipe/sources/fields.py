"""The recipe's field paths (`fields = { answer = "answers[0].answer" }`) resolved on a
source's rows, as columns; and the text forms the layouts, templates and prompts use."""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec
import polars as pl

from ..errors import DataError, SourceError, recipe_error
from ..recipe.plan import SourcePlan
from ..recipe.schema import SourceSpec
from . import fieldpath
from .columns import PROBLEM, ROW, field_column
from .joins import join


@dataclass
class Rows:
    """A source's rows (or a slice) with ROW numbered and every mapped field resolved
    into `field_column(key)`; `context` holds a [[generate]] source's context fields as
    text expressions, for its prompts."""

    source: SourcePlan
    frame: pl.DataFrame
    resolved: dict[str, str]
    found: set[str]
    notes: list[str] = field(default_factory=list)
    context: dict[str, pl.Expr] = field(default_factory=dict)


def resolve_rows(source: SourcePlan, frame: pl.DataFrame, row_offset: int = 0, partial: bool = False) -> Rows:
    """Numbers the rows from `row_offset`, joins the source's second table, and resolves
    every mapped field. `partial`: the rows are one slice of the source, where a field may
    be absent without being an error (whether it resolves somewhere is checked over the
    whole source)."""
    spec = source.spec
    frame = frame.with_row_index(ROW, offset=row_offset).with_columns(pl.col(ROW).cast(pl.UInt64))
    notes: list[str] = []
    if PROBLEM in frame.columns:
        frame = flagged(frame, source, notes)
    if source.join is not None:
        frame = join(frame, source, notes)
    resolved: dict[str, str] = {}
    for key in spec.fields:
        resolved[key] = field_column(key)
        frame = resolve(frame, spec, source.key, key, resolved[key], partial)
    found = {k for k, col in resolved.items() if frame[col].null_count() < frame.height}
    context: dict[str, pl.Expr] = {}
    if source.generate is not None:
        g = source.generate.spec
        context_spec = msgspec.structs.replace(spec, fields=g.fields)
        for key in g.fields:
            frame = resolve(frame, context_spec, source.key, key, f"__g_{key}", partial)
            context[key] = context_text(frame, f"__g_{key}")
    return Rows(source=source, frame=frame, resolved=resolved, found=found, notes=notes, context=context)


def _data_columns(frame: pl.DataFrame) -> str:
    return ", ".join(c for c in frame.columns if not c.startswith("__"))


def resolve(frame: pl.DataFrame, spec: SourceSpec, at: str, key: str, out: str, partial: bool = False) -> pl.DataFrame:
    """Adds column `out` holding the field `key` of the source, resolved on the data. In a
    slice of a source (`partial`), a path this slice cannot resolve gives nulls."""
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
        raise resolves_on_no_row(spec, at, key)
    return frame


def resolves_on_no_row(spec: SourceSpec, at: str, key: str) -> SourceError:
    return SourceError(f"{at}.fields.{key}: the path '{spec.fields[key]}' resolves on no row of source '{spec.name}'")


def as_text(frame: pl.DataFrame, col: str) -> pl.Expr:
    dtype = frame.schema[col]
    if isinstance(dtype, pl.List):
        return pl.col(col).list.eval(pl.element().cast(pl.String)).list.join("\n")
    return pl.col(col).cast(pl.String)


def context_text(frame: pl.DataFrame, col: str) -> pl.Expr:
    """A context field as text for a prompt: lists one item per line, records as JSON
    (COCO boxes: {"category": "dog", "bbox": [..]})."""
    dtype = frame.schema[col]
    if isinstance(dtype, pl.List) and isinstance(dtype.inner, pl.Struct):
        return pl.col(col).list.eval(pl.element().struct.json_encode()).list.join("\n")
    if isinstance(dtype, pl.Struct):
        return pl.col(col).struct.json_encode()
    if isinstance(dtype, pl.List) and isinstance(dtype.inner, pl.List):
        return pl.col(col).list.eval(pl.element().cast(pl.List(pl.String)).list.join(", ")).list.join("\n")
    return as_text(frame, col)


def require(frame: pl.DataFrame, col: str, source: SourcePlan, key: str, notes: list[str]) -> pl.DataFrame:
    """The rows that have a value for field `key`. A row without one is a data error, or,
    under on_error = "skip", dropped and counted in `notes`."""
    spec = source.spec
    nulls = frame[col].is_null()
    if not nulls.any():
        return frame
    absent = [c for c in _columns(spec, key) if c not in frame.columns]
    if absent and nulls.all():  # not a row without a value: no row has the column
        where = f"{source.key}.fields.{key}"
        raise SourceError(f"{where}: source '{spec.name}' has no column '{absent[0]}' (columns: {_data_columns(frame)})")
    row = int(frame.filter(nulls)[ROW][0])
    if spec.on_error == "skip":
        notes.append(f"source '{spec.name}': {int(nulls.sum())} rows without a value for '{key}' (first: row {row}); skipped")
        return frame.filter(~nulls)
    raise data_error(spec.name, row, key, f"missing value ({spec.fields.get(key, key)}); fix the data, or set on_error = \"skip\" to drop such rows")


def flagged(frame: pl.DataFrame, source: SourcePlan, notes: list[str]) -> pl.DataFrame:
    """The rows a reader found usable (PROBLEM null); a flagged row is a data error, or,
    under on_error = "skip", dropped and counted in `notes`."""
    bad = frame[PROBLEM].is_not_null()
    if bad.any():
        first = frame.filter(bad)
        row, why = int(first[ROW][0]), str(first[PROBLEM][0])
        if source.spec.on_error == "skip":
            notes.append(f"source '{source.name}': {int(bad.sum())} unusable rows (first: row {row}: {why}); skipped")
            frame = frame.filter(~bad)
        else:
            raise data_error(source.name, row, "image", f"{why}; fix the data, or set on_error = \"skip\" to drop such rows")
    return frame.drop(PROBLEM)


def _columns(spec: SourceSpec, key: str) -> list[str]:
    try:
        return list(fieldpath.parse_field(spec.fields[key]).columns) if key in spec.fields else []
    except fieldpath.FieldPathError:
        return []


def data_error(source: str, row: int, field: str, why: str) -> DataError:
    err = DataError(f"source '{source}', row {row}, field '{field}': {why}")
    err.source, err.row, err.field = source, row, field
    return err
