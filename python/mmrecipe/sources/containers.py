"""Sources whose images live inside their files, read in place: WebDataset tar shards
(a shard at a time) and parquet files with an image-bytes column (a row group at a
time). The image column holds references (`mmrecipe.imageref`), never the bytes.

WebDataset: the members of a shard are grouped by key (the member name up to the first
dot of its last path part); per key one image (`.jpg`, `.jpeg`, `.png`, `.webp`) and
its text members, each a column named by its extension: `txt` (text), `json` (decoded,
so `fields = { caption = "json.caption" }` reads a field of it), any other extension
that is a plain name as text; other members ("a.seg.png") are left out. Columns: `key`,
`image` (the reference), `txt`, `json` ….

Parquet: the image column (binary, or the Hugging Face `Image` struct {bytes, path},
or a list of either) becomes its references; the bytes travel beside them in
IMAGE_BYTES so that the core reads each header from memory.

A row a reader finds unusable (an image without its text, a text without its image, a
null image cell) carries why in PROBLEM; `fields.resolve_rows` fails on it naming source,
row and member, or skips and counts it under on_error = "skip"."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import msgspec
import numpy as np
import polars as pl

from .. import _core, imageref
from ..buffers import arrow
from ..errors import SourceError
from ..recipe.plan import SourcePlan
from .columns import IMAGE_BYTES, PROBLEM

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
#: Text members read as columns of their own: plain names ("txt", "json", "cls").
_TEXT_EXT = r"^[A-Za-z_][A-Za-z0-9_]*$"


def container_name(source: SourcePlan, path: Path) -> str:
    """The container's path as image references name it: relative to the image root."""
    root = source.image_root or path.parent
    rel = os.path.relpath(path.resolve(), root.resolve()).replace(os.sep, "/")
    if rel.startswith("../") or rel == "..":
        raise SourceError(f"source '{source.name}': {path} is not under the source's image_root ({root})")
    return rel


_IS_IMAGE = pl.col("__ext").is_in(IMAGE_EXTS)
_IS_TEXT = ~_IS_IMAGE & pl.col("__ext").str.contains(_TEXT_EXT)


def _members(source: SourcePlan, path: Path) -> pl.DataFrame | None:
    """A shard's members (name, offset, size, order) with their key and extension, from
    its tar headers alone; None for a shard without members. SourceError for an
    unreadable shard, a member twice, or a key with two images."""
    name = source.name
    try:
        names, offsets, sizes = _core.tar_members(path)
    except EOFError as e:
        raise SourceError(f"source '{name}': {path} is truncated: {e}") from None
    except (ValueError, OSError) as e:
        raise SourceError(f"source '{name}': {path} is not a readable (uncompressed) tar file: {e}") from None
    if not names:
        return None
    frame = pl.DataFrame(
        {"__name": names, "__offset": offsets, "__size": sizes},
        schema={"__name": pl.String, "__offset": pl.UInt64, "__size": pl.UInt64},
    ).with_row_index("__order")
    base = pl.col("__name").str.split("/").list.last()
    stem = base.str.split(".").list.first()
    frame = frame.with_columns(
        (pl.col("__name").str.slice(0, pl.col("__name").str.len_chars() - base.str.len_chars()) + stem).alias("__key"),
        base.str.splitn(".", 2).struct.field("field_1").str.to_lowercase().alias("__ext"),
    )
    dup = frame.filter(pl.struct("__key", "__ext").is_duplicated())
    if dup.height:
        raise SourceError(f"source '{name}': {path}: member '{dup['__name'][0]}' appears twice for key '{dup['__key'][0]}'")
    two = frame.filter(_IS_IMAGE).filter(pl.col("__key").is_duplicated())
    if two.height:
        keyed = two.filter(pl.col("__key") == two["__key"][0])["__name"].to_list()
        raise SourceError(f"source '{name}': {path}: key '{two['__key'][0]}' has more than one image ({', '.join(keyed)})")
    return frame


def _keys(frame: pl.DataFrame) -> pl.DataFrame:
    """The keys of a shard's rows, in the order of their first member; members of other
    kinds are left out."""
    used = frame.filter(_IS_IMAGE | _IS_TEXT)
    return used.group_by("__key", maintain_order=True).agg(pl.col("__order").min()).sort("__order").select("__key")


def shard_rows(source: SourcePlan, path: Path) -> int:
    """The rows `read_shard` gives for a shard, from its tar headers alone."""
    frame = _members(source, path)
    return 0 if frame is None else _keys(frame).height


def read_shard(source: SourcePlan, path: Path) -> pl.DataFrame:
    """One WebDataset shard as rows, one per key, in the shard's order."""
    name = source.name
    frame = _members(source, path)
    if frame is None:
        return pl.DataFrame()
    is_image, is_text = _IS_IMAGE, _IS_TEXT
    rel = container_name(source, path)
    images = frame.filter(is_image).select(
        "__key",
        pl.format("{}#offset={},size={}", pl.lit(rel), "__offset", "__size").alias("image"),
        pl.col("__name").alias("__image_member"),
    )
    texts = frame.filter(is_text)
    texts = texts.with_columns(pl.Series("__v", _member_texts(name, path, texts), dtype=pl.String))
    out = _keys(frame).join(images, on="__key", how="left", maintain_order="left")
    ext_names = texts["__ext"].unique(maintain_order=True).to_list()
    for ext in ext_names:
        part = texts.filter(pl.col("__ext") == ext)
        col = part.select("__key", pl.col("__v").alias(ext), pl.col("__name").alias(f"__m_{ext}"))
        out = out.join(col, on="__key", how="left", maintain_order="left")
        if ext == "json":
            out = out.with_columns(_json_column(name, path, out))
    return _pair_problems(out, ext_names, path).rename({"__key": "key"})


def _member_texts(name: str, path: Path, texts: pl.DataFrame) -> list[str]:
    """The text members' contents, read by offset in the shard's order."""
    out: list[str] = []
    with open(path, "rb") as f:
        for member, offset, size in texts.select("__name", "__offset", "__size").iter_rows():
            f.seek(offset)
            try:
                out.append(f.read(size).decode("utf-8"))
            except UnicodeDecodeError:
                raise SourceError(f"source '{name}': {path}: member '{member}' is not UTF-8 text") from None
    return out


def _json_column(name: str, path: Path, frame: pl.DataFrame) -> pl.Series:
    try:
        return frame["json"].str.json_decode(infer_schema_length=None)
    except pl.exceptions.PolarsError:
        for member, text in frame.select("__m_json", "json").drop_nulls().iter_rows():
            try:
                msgspec.json.decode(text)
            except msgspec.DecodeError as e:
                raise SourceError(f"source '{name}': {path}: member '{member}' is not JSON ({e})") from None
        raise


def _pair_problems(frame: pl.DataFrame, exts: list[str], path: Path) -> pl.DataFrame:
    """PROBLEM for a key with an image and no text member, or text and no image."""
    has_text = pl.any_horizontal(*[pl.col(e).is_not_null() for e in exts]) if exts else pl.lit(False)
    text_member = pl.coalesce(*[pl.col(f"__m_{e}") for e in exts]) if exts else pl.lit(None, pl.String)
    where = pl.lit(f"{path}: member '")
    problem = (
        pl.when(pl.col("image").is_null())
        .then(pl.concat_str(where, text_member, pl.lit("' has no image (.jpg, .jpeg, .png, .webp) beside it")))
        .when(~has_text)
        .then(pl.concat_str(where, pl.col("__image_member"), pl.lit("' has no text member (.txt, .json) beside it")))
    )
    drop = ["__image_member", *[f"__m_{e}" for e in exts]]
    return frame.with_columns(problem.alias(PROBLEM)).drop(drop)


def read_row_groups(source: SourcePlan, path: Path, first: int = 0, count: int | None = None) -> Iterator[pl.DataFrame]:
    """A parquet file with an image-bytes column, a row group at a time (all of them, or
    `count` from row group `first`): the column's references in its place, the bytes in
    IMAGE_BYTES."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    col = source.image_column or "image"
    rel = container_name(source, path)
    try:
        f = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for unreadable files
        raise SourceError(f"source '{source.name}': cannot read {path} as parquet: {e}") from None
    if col not in f.schema_arrow.names:
        raise SourceError(f"source '{source.name}': {path} has no column '{col}' (the image column of the source's first file)")
    for rg in range(first, f.num_row_groups if count is None else min(f.num_row_groups, first + count)):
        try:
            table = f.read_row_group(rg)
        except Exception as e:  # noqa: BLE001
            raise SourceError(f"source '{source.name}': cannot read row group {rg} of {path}: {e}") from None
        cells = table.column(col).combine_chunks()
        listed = pa.types.is_list(cells.type) or pa.types.is_large_list(cells.type)
        values = pc.list_flatten(cells) if listed else cells
        if pa.types.is_struct(values.type):
            data = values.field("bytes") if values.type.get_field_index("bytes") >= 0 else pa.nulls(len(values), pa.binary())
            if values.null_count:  # a null struct's child slot may hold anything
                data = pc.if_else(values.is_null(), pa.scalar(None, data.type), data)
        else:
            data = values
        frame = pl.from_arrow(table.drop_columns([col]))
        assert isinstance(frame, pl.DataFrame)
        n = table.num_rows
        prefix = pl.lit(f"{rel}#rg={rg},row=")
        suffix = pl.lit(f",col={_col(col)}")
        index = pl.int_range(len(values), dtype=pl.UInt64, eager=True).cast(pl.String)
        flat_refs = pl.select(pl.concat_str(prefix, pl.lit(index), suffix)).to_series()
        if listed:
            # An element of a list column is named by its position in the row group's
            # flattened column (the loader finds it the same way).
            lengths = pc.list_value_length(cells).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int32)
            offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
            ref_lists = pa.ListArray.from_arrays(offsets, arrow(flat_refs).cast(pa.string()))
            byte_lists = pa.ListArray.from_arrays(offsets, data.cast(pa.binary()))
            frame = frame.with_columns(pl.Series(col, ref_lists), pl.Series(IMAGE_BYTES, byte_lists))
            null = pl.col(IMAGE_BYTES).list.eval(pl.element().is_null()).list.any()
            what = f": an image of column '{col}' is null"
        else:
            one_each = pa.array(np.arange(n + 1, dtype=np.int32))
            frame = frame.with_columns(flat_refs.alias(col), pl.Series(IMAGE_BYTES, pa.ListArray.from_arrays(one_each, data.cast(pa.binary()))))
            null = pl.col(IMAGE_BYTES).list.first().is_null()
            what = f": the image cell '{col}' is null"
        why = pl.concat_str(pl.lit(f"{path}, row group {rg}, row "), pl.int_range(n).cast(pl.String), pl.lit(what))
        yield frame.with_columns(pl.when(null).then(why).alias(PROBLEM))


def _col(col: str) -> str:
    """The column name as a reference writes it."""
    return imageref.cell_ref("", 0, 0, col).rsplit("col=", 1)[1]
