"""Work units of a JSON Lines or JSON array source (`sources.units`): read one after another they give
the very slices, in order, that the local build's `read_slices` gives, each unit within
its byte budget unless a single slice is over it, rows numbered as in the whole source."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from conftest import small_recipe
from hypothesis import given
from hypothesis import strategies as st

from mmrecipe import load_recipe
from mmrecipe.recipe import resolve
from mmrecipe.sources.read import read_all, read_slices
from mmrecipe.errors import SourceError
from mmrecipe.sources.units import cut_units, cuttable, read_unit

record = st.fixed_dictionaries({"question": st.text(max_size=30), "answer": st.text(min_size=1, max_size=80)},
                               optional={"extra": st.integers()})
line_ends = st.sampled_from(["\n", "\r\n", "\n\n", "\n \n"])


def _source(folder: Path, files: list[list[tuple[dict, str]]], fmt: str = "jsonl"):
    for k, lines in enumerate(files):
        if fmt == "jsonl":
            text = "".join(json.dumps(r) + end for r, end in lines)
        else:  # the line ends around the commas
            text = "[" + "".join(("," if i else "") + end + json.dumps(r, indent=i % 2 or None) for i, (r, end) in enumerate(lines)) + "]\n"
        (folder / f"part-{k}.{fmt}").write_text(("\ufeff" if k == 1 else "") + text, "utf-8")
    recipe = folder / "r.toml"
    recipe.write_text(small_recipe(f'name = "s"\npath = "{folder}/part-*.{fmt}"\nlayout = "qa"\nfields = {{ question = "question", answer = "answer" }}'))
    return resolve(load_recipe(recipe)).sources[0]


@given(files=st.lists(st.lists(st.tuples(record, line_ends), max_size=40), min_size=1, max_size=3).filter(any),
       rows=st.integers(1, 7), budget=st.integers(1, 3000), fmt=st.sampled_from(["jsonl", "json"]))
def test_units_read_in_turn_are_the_local_slices(tmp_path_factory, files, rows, budget, fmt):
    folder = tmp_path_factory.mktemp("units")
    source = _source(folder, files, fmt)
    want = list(read_slices(source, rows))
    assert cuttable(source)
    units = _units_give(source, want, rows, budget)
    assert sum(u.records for u in units) == sum(f.height for f in want)
    assert sum(u.bytes for u in units) <= sum(p.stat().st_size for p in source.files)


def _units_give(source, want, rows, budget):
    """The source's units, checked to give the slices `want` read in turn, rows numbered
    in the whole source, each within `budget` unless a single slice is over it."""
    units = list(cut_units(source, rows, budget))
    got = [frame for unit in units for frame in read_unit(source, unit, rows)]
    assert len(got) == len(want) >= len(units) >= 1
    for a, b in zip(got, want):
        assert a.equals(b)
    assert [u.row for u in units] == [sum(u.records for u in units[:k]) for k in range(len(units))]
    assert all(u.bytes <= budget or u.slices == 1 for u in units) and all(u.slices >= 1 for u in units)
    return units


def test_a_big_source_is_cut_within_its_budget(tmp_path):
    files = [[({"question": f"q{i}", "answer": "a" * (i % 50 + 1)}, "\n") for i in range(3000)]]
    source = _source(tmp_path, files)
    size = source.files[0].stat().st_size
    units = list(cut_units(source, 100, size // 5))
    assert 5 <= len(units) <= 8
    assert all(u.bytes <= size // 5 for u in units) and sum(u.bytes for u in units) == size
    assert all(u.slices >= 1 and u.offset > 0 for u in units[1:])
    frames = [f for u in units for f in read_unit(source, u, 100)]
    assert pl.concat(frames).equals(pl.concat(list(read_slices(source, 100))))


@pytest.mark.parametrize("fmt, tail", [("jsonl", '{"question": [1}\n'), ("json", ', {"question": "q"}]')])
def test_the_units_of_a_file_the_splitter_refuses_end_in_its_error(tmp_path, fmt, tail):
    """Units up to the slice it refuses, then the rest of the source: read in turn, the
    same slices and then the same error (naming the file's line) as the whole read."""
    files = [[({"question": "q", "answer": "a"}, "\n")] * 50, [({"question": "q2", "answer": "a2"}, "\n")] * 5]
    source = _source(tmp_path, files, fmt)
    with source.files[0].open("a") as f:
        f.write(tail)

    def frames_then_error(frames):
        out = []
        with pytest.raises(SourceError) as e:
            for frame in frames:
                out.append(frame)
        return out, str(e.value)

    units = list(cut_units(source, 5, 100))
    assert len(units) > 3 and units[-1].slices == -1 and all(u.slices >= 1 for u in units[:-1])
    want, error = frames_then_error(read_slices(source, 5))
    got, same = frames_then_error(f for unit in units for f in read_unit(source, unit, 5))
    assert same == error and ("line 51:" in error if fmt == "jsonl" else "data after the closing" in error)
    assert len(got) == len(want) == 10 and all(a.equals(b) for a, b in zip(got, want))


@pytest.mark.parametrize("name, text, extra", [
    ("d.csv", "question,answer\n" + "q,a\n" * 50, ""),
    ("d.json", json.dumps({"rows": [{"question": "q", "answer": "a"}] * 50}), 'json_key = "rows"\n'),
])
def test_other_sources_are_one_unit(tmp_path, name, text, extra):
    data = tmp_path / name
    data.write_text(text)
    recipe = tmp_path / "r.toml"
    recipe.write_text(small_recipe(f'name = "s"\npath = "{data}"\n{extra}layout = "qa"\n'
                                   'fields = { question = "question", answer = "answer" }'))
    assert not cuttable(resolve(load_recipe(recipe)).sources[0])


def _parquet_source(folder: Path, files: list[list[dict]], group: int):
    import pyarrow as pa
    import pyarrow.parquet as pq

    for k, rows in enumerate(files):
        table = pa.table({"question": pa.array([r["question"] for r in rows], pa.string()),
                          "answer": pa.array([r["answer"] for r in rows], pa.string())})
        pq.write_table(table, folder / f"part-{k}.parquet", row_group_size=group)
    recipe = folder / "r.toml"
    recipe.write_text(small_recipe(f'name = "s"\npath = "{folder}/part-*.parquet"\nlayout = "qa"\nfields = {{ question = "question", answer = "answer" }}'))
    return resolve(load_recipe(recipe)).sources[0]


@given(files=st.lists(st.lists(record, max_size=60), min_size=1, max_size=3).filter(any),
       group=st.integers(1, 25), rows=st.integers(1, 9), budget=st.integers(1, 4000))
def test_parquet_units_read_in_turn_are_the_local_slices(tmp_path_factory, files, group, rows, budget):
    """Cut from the footers alone: in turn the units give the local build's slices, each
    `rows` records, which together are the whole read's rows (a parquet source streams)."""
    folder = tmp_path_factory.mktemp("pq-units")
    source = _parquet_source(folder, files, group)
    assert source.streamable and cuttable(source)
    want = list(read_slices(source, rows))
    heights = [min(rows, len(part) - at) for part in files for at in range(0, len(part), rows)]
    assert [f.height for f in want] == heights and len(want) >= 1
    assert pl.concat(want).equals(read_all(source))
    units = _units_give(source, want, rows, budget)
    assert sum(u.records for u in units) == sum(len(part) for part in files)


def test_a_parquet_source_over_its_budget_is_split_and_each_unit_reads_only_its_row_groups(tmp_path, monkeypatch):
    """A file of 40 row groups under a budget of about a tenth of it: several units, each
    reading only the row groups its slices lie in (a unit still reads when the file's
    first row groups are corrupted, and the first unit then fails)."""
    import pyarrow.parquet as pq

    files = [[{"question": f"q{i}", "answer": "a" * (i % 50 + 1)} for i in range(4000)]]
    source = _parquet_source(tmp_path, files, 100)
    total = pq.read_metadata(source.files[0]).row_group(0).total_byte_size * 40
    units = list(cut_units(source, 200, total // 10))
    assert 8 <= len(units) <= 20 and all(u.bytes <= total // 10 for u in units)
    assert [u.offset for u in units] == [sum(u.slices for u in units[:k]) for k in range(len(units))]
    frames = [f for u in units for f in read_unit(source, u, 200)]
    assert pl.concat(frames).equals(read_all(source))
    # Zeros over the data of the first two row groups: only the units over them can tell.
    meta = pq.read_metadata(source.files[0])
    start = min(meta.row_group(0).column(c).data_page_offset for c in range(2))
    end = max(meta.row_group(1).column(c).data_page_offset + meta.row_group(1).column(c).total_compressed_size for c in range(2))
    data = bytearray(source.files[0].read_bytes())
    data[start:end] = bytes(end - start)
    source.files[0].write_bytes(bytes(data))
    later = units[3]
    alone = pl.concat(list(read_unit(source, later, 200)))
    assert alone.height == later.records and alone["question"][0] == f"q{later.row}" and later.row >= 200
    with pytest.raises(SourceError, match="cannot read"):
        list(read_unit(source, units[0], 200))


def test_a_parquet_source_with_image_bytes_is_cut_at_row_groups(tmp_path):
    from test_containers import write_parquet

    write_parquet(tmp_path / "pq" / "a.parquet", 20, rows_per_group=3, null_at=7)
    write_parquet(tmp_path / "pq" / "b.parquet", 8, struct=False, rows_per_group=5)
    recipe = tmp_path / "r.toml"
    recipe.write_text(small_recipe(f'name = "s"\npath = "{tmp_path}/pq/*.parquet"\nlayout = "caption"\n'
                                   'instructions = ["Describe it."]\nfields = { image = "image", caption = "caption" }\non_error = "skip"'))
    source = resolve(load_recipe(recipe)).sources[0]
    assert source.container == "parquet" and cuttable(source)
    want = list(read_slices(source, 0))
    units = list(cut_units(source, 0, 1))  # a row group each
    assert len(units) == len(want) == 7 + 2
    got = [frame for unit in units for frame in read_unit(source, unit, 0)]
    assert all(a.equals(b) for a, b in zip(got, want)) and len(got) == len(want)
    assert [u.row for u in units] == [0, 3, 6, 9, 12, 15, 18, 20, 25]


def test_an_unreadable_parquet_file_is_a_unit_that_ends_in_the_local_error(tmp_path):
    files = [[{"question": "q", "answer": "a"}] * 30, [{"question": "q2", "answer": "a2"}] * 5]
    source = _parquet_source(tmp_path, files, 10)
    source.files[1].write_bytes(b"PAR1 not a parquet file")
    with pytest.raises(SourceError) as whole:
        list(read_slices(source, 10))
    units = list(cut_units(source, 10, 10**9))
    assert units[-1].slices == -1 and units[-1].file == 1 and units[-1].row == 30
    with pytest.raises(SourceError) as cut:
        [f for u in units for f in read_unit(source, u, 10)]
    assert str(cut.value) == str(whole.value) and "part-1.parquet" in str(whole.value)


def test_webdataset_shards_are_a_unit_each_counted_from_their_headers(tmp_path):
    """A unit per shard with rows (an empty shard, or one of other members only, gives
    none), its rows counted from the tar headers: the units read in turn are the local
    build's slices, a key without its image included (a row the reader flags)."""
    import tarfile

    from test_containers import add, write_shards

    paths = write_shards(tmp_path / "wds", 11, per_shard=4)
    with tarfile.open(paths[1], "a") as tar:
        add(tar, "lonely.txt", b"a caption without its image")
        add(tar, "other.seg.png", b"left out")
    with tarfile.open(tmp_path / "wds" / "shard-000a.tar", "w") as tar:  # between 000 and 001: no rows
        add(tar, "mask.seg.png", b"left out")
    recipe = tmp_path / "r.toml"
    recipe.write_text(small_recipe(f'name = "s"\npath = "{tmp_path}/wds/*.tar"\nlayout = "caption"\n'
                                   'instructions = ["Describe it."]\nfields = { image = "image", caption = "txt" }\non_error = "skip"'))
    source = resolve(load_recipe(recipe)).sources[0]
    assert source.container == "webdataset" and cuttable(source) and len(source.files) == 4
    want = list(read_slices(source, 0))
    units = list(cut_units(source, 0, 10**9))
    assert [(u.file, u.row, u.records) for u in units] == [(0, 0, 4), (2, 4, 5), (3, 9, 3)]
    got = [frame for unit in units for frame in read_unit(source, unit, 0)]
    assert len(got) == len(want) == 3 and all(a.equals(b) for a, b in zip(got, want))
    # A truncated shard: the rest of the source from it is the last unit, ending in the local error.
    paths[1].write_bytes(paths[1].read_bytes()[:1000])
    with pytest.raises(SourceError) as whole:
        list(read_slices(source, 0))
    units = list(cut_units(source, 0, 10**9))
    assert [(u.file, u.slices) for u in units] == [(0, 1), (2, -1)]
    with pytest.raises(SourceError) as cut:
        [f for u in units for f in read_unit(source, u, 0)]
    assert str(cut.value) == str(whole.value) and "truncated" in str(whole.value)
