"""Rows joined with a second table by key (VQAv2 questions + annotations, COCO captions +
images) and questions about one image folded into one conversation (`group_by`)."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from ..errors import DataError, SourceError
from ..recipe.plan import JoinPlan, SourcePlan
from ..recipe.schema import SourceSpec
from .columns import CONTENTS, IMAGES, ROLES, ROW
from .read import read_file


def join(frame: pl.DataFrame, source: SourcePlan, notes: list[str]) -> pl.DataFrame:
    """The source's rows with the columns of their matching record in the join file (a
    left join on join.left_on = join.right_on; columns the rows already have get `_right`)."""
    j = source.join
    assert j is not None
    spec, where, path = source.spec, f"{source.key}.join", j.file
    right = read_file(spec.name, path, j.format, j.json_key)
    if j.left_on not in frame.columns:
        cols = ", ".join(c for c in frame.columns if not c.startswith("__"))
        raise SourceError(f"{where}.left_on: source '{spec.name}' has no column '{j.left_on}' (columns: {cols})")
    if j.right_on not in right.columns:
        raise SourceError(f"{where}.right_on: {path.name} has no column '{j.right_on}' (columns: {', '.join(right.columns)})")
    right = right.filter(pl.col(j.right_on).is_not_null())  # a null key names no record
    right = _unique_keys(right, j, where, path).with_columns(pl.lit(True).alias("__matched"))
    left_key, right_key = _key_types(frame, right, j)
    joined = frame.join(right, left_on=left_key, right_on=right_key, how="left", maintain_order="left", suffix="_right")
    missing = joined.filter(pl.col("__matched").is_null())
    if missing.height:
        joined = _unmatched(joined, missing, spec, j, path, notes)
    return joined.drop("__matched")


def _unique_keys(right: pl.DataFrame, j: JoinPlan, where: str, path: Path) -> pl.DataFrame:
    """A joined key must name one record, or rows would silently multiply."""
    counts = right.group_by(j.right_on).len().filter(pl.col("len") > 1)
    if counts.height:
        key, n = counts.row(0)
        raise SourceError(
            f"{where}.right_on: '{j.right_on}' = {key!r} appears {n} times in {path.name} "
            f"({counts.height} keys repeat); join on a column that is unique in the joined file"
        )
    return right


def _key_types(frame: pl.DataFrame, right: pl.DataFrame, j: JoinPlan) -> tuple[pl.Expr, pl.Expr]:
    """Join keys of different types (123 and "123") are compared as text."""
    left, rightk = pl.col(j.left_on), pl.col(j.right_on)
    if frame.schema[j.left_on] != right.schema[j.right_on]:
        return left.cast(pl.String), rightk.cast(pl.String)
    return left, rightk


def _unmatched(joined: pl.DataFrame, missing: pl.DataFrame, spec: SourceSpec, j: JoinPlan, path: Path, notes: list[str]) -> pl.DataFrame:
    """Rows whose key has no record: a data error under the source's on_error policy."""
    row, key = missing.select(ROW, j.left_on).row(0)
    what = f"{missing.height} of {joined.height} rows have no record in {path.name} with {j.right_on} = their {j.left_on}"
    if spec.on_error == "skip":
        notes.append(f"source '{spec.name}': {what} (first: row {row}, {j.left_on} = {key!r}); skipped")
        return joined.filter(pl.col("__matched").is_not_null())
    err = DataError(
        f"source '{spec.name}', row {row}, field '{j.left_on}': no record in {path.name} with "
        f"{j.right_on} = {key!r} ({what}); fix the files, or set on_error = \"skip\" to drop such rows"
    )
    err.source, err.row, err.field = spec.name, int(row), j.left_on
    raise err


def group_by_image(frame: pl.DataFrame, image: str) -> pl.DataFrame:
    """One row per image: its questions and answers as alternating turns in the order of
    the original rows (LLaVA-1.5); ROW becomes the group's first original row."""
    return (
        frame.sort(ROW)
        .group_by(pl.col(image).cast(pl.String).alias("__group"), maintain_order=True)
        .agg(pl.col(ROW).first(), pl.col(ROLES).explode(), pl.col(CONTENTS).explode(), pl.col(IMAGES).first())
        .drop("__group")
    )
