"""Field paths: where a value sits in a source row, e.g. ``answers[0].answer``,
``conversations``, ``meta.image``, ``answers[*].answer``, or a function of one:

* ``most_common(answers)``: the most frequent value of a list (ties: the first seen);
* ``options(choices)``: a list of choices as lettered lines, ``A. cat`` / ``B. dog``;
* ``letter(correct_choice_idx)``: a 0-based index as its option letter, ``0`` → ``A``.

A field may also be a *format*: literal text with paths in braces, e.g.
``train2017/{image_id:012}.jpg`` (``:0N`` pads a number with zeros to N digits;
``{{``/``}}`` are literal braces). Everything compiles to polars expressions, so resolving
a field never loops over rows in Python."""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

import polars as pl

_NAME = r"[A-Za-z_][A-Za-z0-9_\-]*"
_TOKEN = re.compile(rf"\.({_NAME})|\[(-?\d+)\]|\[(\*)\]")
_CALL = re.compile(rf"^\s*({_NAME})\s*\((.*)\)\s*$")
_PAD = re.compile(r"^0(\d+)$")

REDUCERS = ("most_common", "options", "letter")
STAR = "*"
LETTERS = {i: ch for i, ch in enumerate(string.ascii_uppercase)}


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

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.column,)

    def expr(self, base: pl.Expr | None = None) -> pl.Expr:
        """The polars expression of the path (before any reducer)."""
        return _build(pl.col(self.column) if base is None else base, self.steps)

    def value_expr(self) -> pl.Expr:
        """The path with its reducer applied (most_common needs a frame: see `resolve`)."""
        if self.reducer == "options":
            return _options(self.expr())
        if self.reducer == "letter":
            return self.expr().cast(pl.Int64, strict=False).replace_strict(LETTERS, default=None, return_dtype=pl.String)
        if self.reducer == "most_common":
            raise FieldPathError("most_common(...) cannot be used inside a format")
        return self.expr()


@dataclass(frozen=True)
class FieldFormat:
    """Text with field paths in braces; `parts` holds literal strings and (path, pad)."""

    parts: tuple[str | tuple[FieldPath, int], ...]

    def __str__(self) -> str:
        out = ""
        for part in self.parts:
            if isinstance(part, str):
                out += part.replace("{", "{{").replace("}", "}}")
            else:
                path, pad = part
                out += f"{{{path}:0{pad}}}" if pad else f"{{{path}}}"
        return out

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(p[0].column for p in self.parts if not isinstance(p, str))

    def value_expr(self) -> pl.Expr:
        pieces = []
        for part in self.parts:
            if isinstance(part, str):
                pieces.append(pl.lit(part))
            else:
                path, pad = part
                text = path.value_expr().cast(pl.String)
                pieces.append(text.str.zfill(pad) if pad else text)
        return pl.concat_str(pieces)  # null when any path is null: no half-built names


Field = FieldPath | FieldFormat


def _build(base: pl.Expr, steps: tuple[str | int, ...]) -> pl.Expr:
    for i, st in enumerate(steps):
        if st == STAR:
            return base.list.eval(_build(pl.element(), steps[i + 1 :]))
        if isinstance(st, int):
            base = base.list.get(st, null_on_oob=True)
        else:
            base = base.struct.field(st)
    return base


def _options(values: pl.Expr) -> pl.Expr:
    letter = pl.int_range(pl.len()).replace_strict(LETTERS, default=None, return_dtype=pl.String)
    return values.list.eval(pl.concat_str(letter, pl.lit(". "), pl.element().cast(pl.String))).list.join("\n")


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
        steps.append(name if name is not None else STAR if star else _number(index, text))
        pos = t.end()
    return FieldPath(head.group(0), tuple(steps), reducer)


# An index or a zero-padding width: no list is longer, and no id wider.
MAX_NUMBER = 10**9
MAX_PAD = 64  # zero padding of an id: wider would only blow up every row


def _number(digits: str, text: str) -> int:
    if len(digits) > 9 or int(digits) > MAX_NUMBER:
        raise FieldPathError(f"'{text}': {digits[:12]}{'…' if len(digits) > 12 else ''} is too large (at most {MAX_NUMBER:,})")
    return int(digits)


def parse_format(text: str) -> FieldFormat:
    """Parses "literal {path} literal {path:012}"; raises FieldPathError."""
    parts: list[str | tuple[FieldPath, int]] = []
    try:
        pieces = list(string.Formatter().parse(text))
    except ValueError as e:
        raise FieldPathError(f"'{text}' is not a format: {e} (write {{{{ and }}}} for literal braces)") from None
    for literal, name, spec, conversion in pieces:
        if literal and parts and isinstance(parts[-1], str):
            parts[-1] += literal  # "a{{b" comes in two pieces
        elif literal:
            parts.append(literal)
        if name is None:
            continue
        if conversion:
            raise FieldPathError(f"'{{{name}!{conversion}}}': conversions are not supported in a format")
        pad = _PAD.match(spec or "")
        if spec and not pad:
            raise FieldPathError(f"'{{{name}:{spec}}}': the only format spec is :0N (pad with zeros to N digits)")
        path = parse(name)
        if path.reducer == "most_common":
            raise FieldPathError(f"'{{{name}}}': most_common(...) cannot be used inside a format")
        width = _number(pad.group(1), text) if pad else 0
        if width > MAX_PAD:
            raise FieldPathError(f"'{{{name}:{spec}}}': pads to {width:,} digits (at most {MAX_PAD})")
        parts.append((path, width))
    if not any(not isinstance(p, str) for p in parts):
        raise FieldPathError(f"'{text}' has no {{path}}: a field needs at least one")
    return FieldFormat(tuple(parts))


def parse_field(text: str) -> Field:
    """A field value of a recipe: a format when it contains braces, else a field path."""
    return parse_format(text) if "{" in text or "}" in text else parse(text)


def resolve(frame: pl.DataFrame, field: Field, name: str) -> pl.DataFrame:
    """Adds column `name`: the value of `field` on every row."""
    if isinstance(field, FieldPath) and field.reducer == "most_common":
        return most_common(frame, field.expr(), name)
    return frame.with_columns(field.value_expr().alias(name))


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
