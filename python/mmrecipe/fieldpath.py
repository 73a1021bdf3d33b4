"""Field paths: where a value sits in a source row, e.g. ``answers[0].answer``,
``conversations``, ``meta.image``, ``answers[*].answer``, or ``most_common(answers)``
(the most frequent value of a list; ties go to the first seen). Compiled to polars
expressions, so resolving a path never loops over rows in Python."""

from __future__ import annotations

import re
from dataclasses import dataclass

import polars as pl

_NAME = r"[A-Za-z_][A-Za-z0-9_\-]*"
_TOKEN = re.compile(rf"\.({_NAME})|\[(-?\d+)\]|\[(\*)\]")
_CALL = re.compile(rf"^\s*({_NAME})\s*\((.*)\)\s*$")

REDUCERS = ("most_common",)
STAR = "*"


class FieldPathError(ValueError):
    pass


@dataclass(frozen=True)
class FieldPath:
    column: str
    steps: tuple[str | int, ...] = ()
    reducer: str | None = None

    def __str__(self) -> str:
        s = self.column
        for st in self.steps:
            s += f"[{st}]" if isinstance(st, int) or st == STAR else f".{st}"
        return f"{self.reducer}({s})" if self.reducer else s

    def expr(self, base: pl.Expr | None = None) -> pl.Expr:
        """The polars expression of the path (before any reducer)."""
        return _build(pl.col(self.column) if base is None else base, self.steps)


def _build(base: pl.Expr, steps: tuple[str | int, ...]) -> pl.Expr:
    for i, st in enumerate(steps):
        if st == STAR:
            return base.list.eval(_build(pl.element(), steps[i + 1 :]))
        if isinstance(st, int):
            base = base.list.get(st, null_on_oob=True)
        else:
            base = base.struct.field(st)
    return base


def parse(text: str) -> FieldPath:
    """Parses a field path; raises FieldPathError saying what is wrong."""
    reducer = None
    m = _CALL.match(text)
    if m:
        reducer, text = m.group(1), m.group(2)
        if reducer not in REDUCERS:
            raise FieldPathError(f"unknown reducer '{reducer}' (known: {', '.join(REDUCERS)})")
    text = text.strip()
    head = re.match(_NAME, text)
    if not head:
        raise FieldPathError(f"'{text}' does not start with a column name")
    steps: list[str | int] = []
    pos = head.end()
    while pos < len(text):
        t = _TOKEN.match(text, pos)
        if not t:
            raise FieldPathError(f"unexpected '{text[pos:]}' in field path '{text}' (use .name, [0] or [*])")
        name, index, star = t.groups()
        steps.append(name if name is not None else STAR if star else int(index))
        pos = t.end()
    return FieldPath(head.group(0), tuple(steps), reducer)


def most_common(frame: pl.DataFrame, values: pl.Expr, name: str) -> pl.DataFrame:
    """Adds column `name`: the most frequent non-null element of the list `values` in
    each row (ties: the element seen first). Vectorized with a group-by."""
    idx = "__mc_row"
    exploded = (
        frame.select(pl.int_range(pl.len(), dtype=pl.UInt64).alias(idx), values.alias("__mc_v"))
        .explode("__mc_v")
        .with_row_index("__mc_pos")
        .drop_nulls("__mc_v")
    )
    best = (
        exploded.group_by(idx, "__mc_v")
        .agg(pl.len().alias("__mc_n"), pl.col("__mc_pos").min().alias("__mc_first"))
        .sort([idx, "__mc_n", "__mc_first"], descending=[False, True, False])
        .unique(idx, keep="first", maintain_order=True)
        .select(idx, pl.col("__mc_v").alias(name))
    )
    return (
        frame.with_columns(pl.int_range(pl.len(), dtype=pl.UInt64).alias(idx))
        .join(best, on=idx, how="left", maintain_order="left")
        .drop(idx)
    )
