"""Field paths: the parser round-trips, and resolving a path with polars gives what a
plain-Python walk over the same nested rows gives."""

from __future__ import annotations

from collections import Counter
from typing import Any

import polars as pl
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mmrecipe.sources import fieldpath
from mmrecipe.sources.fieldpath import STAR, FieldFormat, FieldPath, FieldPathError

names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_\-]{0,6}", fullmatch=True)
steps = st.one_of(names, st.integers(-20, 20), st.just(STAR))
paths = st.builds(
    FieldPath, column=names, steps=st.lists(steps, max_size=5).map(tuple), reducer=st.sampled_from([None, *fieldpath.REDUCERS])
)


@given(paths)
def test_parse_round_trips(path):
    assert fieldpath.parse(str(path)) == path


literals = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=8)
placeholders = st.tuples(paths.filter(lambda p: p.reducer != "most_common"), st.sampled_from([0, 2, 12]))


@st.composite
def formats(draw):
    """Literal text and placeholders, never two literals in a row (they would read back as one)."""
    parts: list[Any] = []
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.booleans()) and not (parts and isinstance(parts[-1], str)):
            parts.append(draw(literals))
        parts.append(draw(placeholders))
    if draw(st.booleans()):
        parts.append(draw(literals))
    return FieldFormat(tuple(parts))


@given(formats())
def test_format_round_trips(fmt):
    assert fieldpath.parse_field(str(fmt)) == fmt


# --- resolution against a reference walker ---------------------------------------------
#
# A schema is "int", "str", ("list", schema) or ("struct", {name: schema}); rows are
# generated for it with nulls anywhere, and paths that fit it.

leaf = st.sampled_from(["int", "str"])
schemas = st.recursive(
    leaf,
    lambda inner: st.one_of(
        inner.map(lambda s: ("list", s)),
        st.dictionaries(names, inner, min_size=1, max_size=3).map(lambda d: ("struct", d)),
    ),
    max_leaves=6,
)


def dtype(schema) -> pl.DataType:
    if schema == "int":
        return pl.Int64()
    if schema == "str":
        return pl.String()
    kind, inner = schema
    if kind == "list":
        return pl.List(dtype(inner))
    return pl.Struct({k: dtype(v) for k, v in inner.items()})


def values(schema) -> st.SearchStrategy:
    if schema == "int":
        return st.none() | st.integers(-3, 3)
    if schema == "str":
        return st.none() | st.sampled_from(["a", "b", "c", ""])
    kind, inner = schema
    if kind == "list":
        return st.none() | st.lists(values(inner), max_size=4)
    return st.none() | st.fixed_dictionaries({k: values(v) for k, v in inner.items()})


def result_schema(schema, steps):
    for i, step in enumerate(steps):
        if step == STAR:
            return ("list", result_schema(schema[1], steps[i + 1 :]))
        schema = schema[1] if isinstance(step, int) else schema[1][step]
    return schema


@st.composite
def path_in(draw, columns: dict[str, Any]) -> FieldPath:
    column = draw(st.sampled_from(sorted(columns)))
    schema, walked = columns[column], []
    while not isinstance(schema, str) and draw(st.booleans()):
        kind, inner = schema
        if kind == "list":
            walked.append(draw(st.one_of(st.just(STAR), st.integers(-5, 5))))
            schema = inner
        else:
            key = draw(st.sampled_from(sorted(inner)))
            walked.append(key)
            schema = inner[key]
    result = result_schema(columns[column], walked)
    reducer = None
    if isinstance(result, tuple) and result[0] == "list" and isinstance(result[1], str):
        reducer = draw(st.sampled_from([None, "most_common"]))
    return FieldPath(column, tuple(walked), reducer)


def walk(value: Any, steps: tuple) -> Any:
    """The reference: a plain-Python walk of one row."""
    for i, step in enumerate(steps):
        if value is None:
            return None
        if step == STAR:
            return [walk(v, steps[i + 1 :]) for v in value]
        if isinstance(step, int):
            j = step if step >= 0 else len(value) + step
            value = value[j] if 0 <= j < len(value) else None
        else:
            value = value[step]
    return value


def most_common_of(items: list | None) -> Any:
    seen = [v for v in items or [] if v is not None]
    if not seen:
        return None
    counts = Counter(seen)
    return max(seen, key=lambda v: (counts[v], -seen.index(v)))


@st.composite
def data_and_path(draw):
    columns = draw(st.dictionaries(names, schemas, min_size=1, max_size=3))
    rows = draw(st.lists(st.fixed_dictionaries({c: values(s) for c, s in columns.items()}), min_size=1, max_size=6))
    return columns, rows, draw(path_in(columns))


@given(data_and_path())
def test_resolution_matches_the_reference(case):
    columns, rows, path = case
    frame = pl.DataFrame(rows, schema={c: dtype(s) for c, s in columns.items()})
    got = fieldpath.resolve(frame, path, "__out")["__out"].to_list()
    expected = [walk(row[path.column], path.steps) for row in rows]
    if path.reducer == "most_common":
        expected = [most_common_of(v) for v in expected]
    assert got == expected


# --- functions and formats ---------------------------------------------------------------


def resolve(text: str, **columns) -> list:
    return fieldpath.resolve(pl.DataFrame(columns), fieldpath.parse_field(text), "out")["out"].to_list()


def test_options_and_letter():
    choices = [["cat", "dog"], ["red", "green", "blue"], None]
    assert resolve("options(choices)", choices=choices) == ["A. cat\nB. dog", "A. red\nB. green\nC. blue", None]
    assert resolve("letter(i)", i=[0, 2, None]) == ["A", "C", None]


def test_format_builds_file_names():
    assert resolve("train2017/{image_id:012}.jpg", image_id=[9, 391895]) == ["train2017/000000000009.jpg", "train2017/000000391895.jpg"]
    assert resolve("{a}-{b.c}", a=["x", None], b=[{"c": 1}, {"c": 2}]) == ["x-1", None]  # null, not "-2"
    assert resolve("{{literal}} {a}", a=["x"]) == ["{literal} x"]


@pytest.mark.parametrize(
    "text,message",
    [
        ("{a:5d}", "the only format spec is :0N"),
        ("{a!r}", "conversions are not supported"),
        ("{most_common(a)}", "cannot be used inside a format"),
        ("a}", "not a format"),
        ("{{a}}", "has no {path}"),
        ("{a[x]}", "unexpected '[x]'"),
        ("majority(a)", "unknown reducer 'majority'"),
    ],
)
def test_bad_fields(text, message):
    with pytest.raises(FieldPathError, match=message.replace("(", r"\(").replace("[", r"\[")):
        fieldpath.parse_field(text)
