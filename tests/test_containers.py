"""Sources read in place from the containers large datasets ship in: WebDataset tar
shards and parquet files with image bytes. A release built from them has the same tokens,
masks and image grids as one built from the same data as loose files; its image paths
are references (mmrecipe.imageref) that the core's header reader and the torch loader
open in place; bad containers are errors naming file, member or row."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import small_recipe

from mmrecipe import build, imageref
from mmrecipe.errors import DataError, SourceError

SIZES = [(40, 30), (64, 64), (28, 90), (120, 50), (33, 33), (90, 28), (56, 112)]
GRID = 'image = { placeholder = "<image>", token = "<image>", patch = 14, merge = 2, min_pixels = 784, max_pixels = 50176 }'


def image_bytes(i: int, fmt: str = "PNG") -> bytes:
    from PIL import Image

    w, h = SIZES[i % len(SIZES)]
    rng = np.random.default_rng(i)
    img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    out = io.BytesIO()
    img.save(out, format=fmt)
    return out.getvalue()


def caption(i: int) -> str:
    return f"picture {i}: " + " ".join(["a cat", "two dogs", "a red bus", "the sea"][i % 4] for _ in range(1 + i % 3))


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, n: int, per_shard: int = 4, meta: str = "txt") -> list[Path]:
    """Shards of {key}.png|jpg + {key}.txt (or .json {"caption": ...}); keys in order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(0, n, per_shard):
        path = folder / f"shard-{s // per_shard:03d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(s, min(n, s + per_shard)):
                key = f"sample{i:05d}"
                ext = "jpg" if i % 3 == 2 else "png"
                add(tar, f"{key}.{ext}", image_bytes(i, "JPEG" if ext == "jpg" else "PNG"))
                text = caption(i) if meta == "txt" else json.dumps({"caption": caption(i), "id": i})
                add(tar, f"{key}.{meta}", text.encode())
        paths.append(path)
    return paths


def write_loose(folder: Path, n: int) -> Path:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        ext = "jpg" if i % 3 == 2 else "png"
        (folder / "images" / f"{i}.{ext}").write_bytes(image_bytes(i, "JPEG" if ext == "jpg" else "PNG"))
        rows.append({"image": f"images/{i}.{ext}", "caption": caption(i)})
    path = folder / "captions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path: Path, n: int, struct: bool = True, rows_per_group: int = 3, null_at: int | None = None,
                  corrupt_at: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cells = []
    for i in range(n):
        data = image_bytes(i, "JPEG" if i % 3 == 2 else "PNG")
        if i == corrupt_at:
            data = b"this is not an image"
        cells.append(None if i == null_at else ({"bytes": data, "path": f"{i}.png"} if struct else data))
    kind = pa.struct([("bytes", pa.binary()), ("path", pa.string())]) if struct else pa.binary()
    table = pa.table({"image": pa.array(cells, kind), "caption": [caption(i) for i in range(n)]})
    pq.write_table(table, path, row_group_size=rows_per_group)
    return path


def recipe(tmp: Path, source: str, name: str = "r.toml", output: str = 'packing = "none"\nshuffle = false') -> Path:
    path = tmp / name
    path.write_text(small_recipe(source, model=GRID, output=output))
    return path


CAPTION = 'layout = "caption"\ninstructions = ["Describe it."]\n'


def release_rows(release: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted((release / "data").glob("*.parquet"))])


def same_but_paths(a: Path, b: Path) -> None:
    ta, tb = release_rows(a), release_rows(b)
    assert ta.num_rows == tb.num_rows > 0
    for col in ta.column_names:
        if "path" in col:
            continue
        assert ta.column(col).equals(tb.column(col)), col


@pytest.fixture()
def loose_release(tmp_path: Path) -> Path:
    write_loose(tmp_path / "loose", 10)
    out = tmp_path / "out-loose"
    build(recipe(tmp_path, f'name = "c"\npath = "loose/captions.jsonl"\n{CAPTION}fields = {{ image = "image", caption = "caption" }}', "loose.toml"),
          out, progress=False)
    return out


def test_webdataset_release_equals_loose_files(tmp_path: Path, loose_release: Path):
    write_shards(tmp_path / "shards", 10)
    out = tmp_path / "out-wds"
    res = build(recipe(tmp_path, f'name = "c"\npath = "shards/shard-*.tar"\n{CAPTION}fields = {{ caption = "txt" }}'), out, progress=False)
    same_but_paths(loose_release, out)
    paths = [p for ps in release_rows(out).column("image_paths").to_pylist() for p in ps]
    assert paths[0].startswith("shard-000.tar#offset=") and len(paths) == 10
    assert all(isinstance(imageref.parse(p), imageref.Range) for p in paths)
    # The shards are release inputs, hashed; their image bytes are not in the release.
    roles = {(i.role, i.path) for i in res.manifest.inputs}
    assert ("source:c", "shards/shard-000.tar") in roles and ("source:c", "shards/shard-002.tar") in roles
    blob = b"".join(p.read_bytes() for p in (out / "data").glob("*.parquet"))
    assert image_bytes(4)[16:80] not in blob


def test_webdataset_json_fields(tmp_path: Path, loose_release: Path):
    write_shards(tmp_path / "shards", 10, meta="json")
    out = tmp_path / "out-json"
    build(recipe(tmp_path, f'name = "c"\npath = "shards/*.tar"\n{CAPTION}fields = {{ caption = "json.caption" }}'), out, progress=False)
    same_but_paths(loose_release, out)


@pytest.mark.parametrize("struct", [True, False], ids=["hf-image-struct", "binary"])
def test_parquet_image_bytes_release_equals_loose_files(tmp_path: Path, loose_release: Path, struct: bool):
    write_parquet(tmp_path / "pq" / "train.parquet", 10, struct=struct)
    out = tmp_path / "out-pq"
    res = build(recipe(tmp_path, f'name = "c"\npath = "pq/train.parquet"\n{CAPTION}fields = {{ image = "image", caption = "caption" }}'),
                out, progress=False)
    same_but_paths(loose_release, out)
    paths = [p for ps in release_rows(out).column("image_paths").to_pylist() for p in ps]
    assert paths[:4] == ["train.parquet#rg=0,row=0,col=image", "train.parquet#rg=0,row=1,col=image",
                         "train.parquet#rg=0,row=2,col=image", "train.parquet#rg=1,row=0,col=image"]
    assert [i.path for i in res.manifest.inputs if i.role == "source:c"] == ["pq/train.parquet"]


def test_the_loader_opens_the_same_pixels(tmp_path: Path, loose_release: Path):
    pytest.importorskip("torch")
    from mmrecipe.loader.pixels import open_image, upright_size
    from mmrecipe.torch import PackedDataset

    write_shards(tmp_path / "shards", 10)
    write_parquet(tmp_path / "pq" / "train.parquet", 10)
    outs = []
    for name, body in [("wds", 'path = "shards/*.tar"\nfields = { caption = "txt" }'),
                       ("pq", 'path = "pq/train.parquet"\nfields = { image = "image", caption = "caption" }')]:
        out = tmp_path / f"out-{name}"
        build(recipe(tmp_path, f'name = "c"\n{body}\n{CAPTION}', f"{name}.toml"), out, progress=False)
        outs.append(out)

    def pixels(release: Path, root: Path) -> list[np.ndarray]:
        ds = PackedDataset(release)
        recs = [p for i in range(len(ds)) for p in ds[i]["image_paths"]]
        got = []
        for rel in recs:
            full = str(root / rel)
            img = open_image(full)
            assert upright_size(full) == (img.size[1], img.size[0])
            got.append(np.asarray(img))
        return got

    want = pixels(loose_release, tmp_path / "loose")
    assert len(want) == 10
    for out, root in zip(outs, [tmp_path / "shards", tmp_path / "pq"]):
        got = pixels(out, root)
        assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))


def test_the_loader_follows_a_moved_release(tmp_path: Path):
    pytest.importorskip("torch")
    from mmrecipe.torch import dataloader

    write_shards(tmp_path / "a" / "shards", 6)
    out = tmp_path / "a" / "out"
    build(recipe(tmp_path / "a", f'name = "c"\npath = "shards/*.tar"\n{CAPTION}fields = {{ caption = "txt" }}'), out, progress=False)
    moved = tmp_path / "elsewhere"
    (tmp_path / "a" / "shards").rename(moved)
    loader = dataloader(out, batch_size=2, image_processor="qwen2-vl", image_roots={"c": moved}, shuffle=False)
    batches = list(loader)
    assert sum(int(b["image_grid_thw"].shape[0]) for b in batches) == 6


def test_a_member_without_its_pair(tmp_path: Path):
    folder = tmp_path / "shards"
    folder.mkdir()
    with tarfile.open(folder / "s.tar", "w") as tar:
        add(tar, "a.png", image_bytes(0))
        add(tar, "a.txt", b"a caption")
        add(tar, "b.png", image_bytes(1))  # no caption
        add(tar, "c.txt", b"no image")
    body = f'name = "c"\npath = "shards/s.tar"\n{CAPTION}fields = {{ caption = "txt" }}'
    with pytest.raises(DataError) as e:
        build(recipe(tmp_path, body), tmp_path / "out", progress=False)
    assert "s.tar: member 'b.png' has no text member (.txt, .json) beside it" in str(e.value)
    assert (e.value.source, e.value.row, e.value.field) == ("c", 1, "image")
    res = build(recipe(tmp_path, body + '\non_error = "skip"\n', "skip.toml"), tmp_path / "out-skip", progress=False)
    stats = res.summary["sources"][0]
    assert any("2 unusable rows (first: row 1: " in n and "'b.png'" in n for n in stats["notes"])
    assert release_rows(tmp_path / "out-skip").num_rows == 1


def test_a_truncated_shard(tmp_path: Path):
    [shard] = write_shards(tmp_path / "shards", 3, per_shard=3)
    with tarfile.open(shard) as tar:
        last = tar.getmember("sample00002.jpg")
    # Cut inside the last image's data (its caption and the end-of-archive blocks gone).
    shard.write_bytes(shard.read_bytes()[: last.offset_data + last.size // 2])
    with pytest.raises(SourceError, match=r"shard-000.tar is truncated: member 'sample00002\.jpg' ends at byte"):
        build(recipe(tmp_path, f'name = "c"\npath = "shards/*.tar"\n{CAPTION}fields = {{ caption = "txt" }}'), tmp_path / "o", progress=False)
    shard.write_bytes(b"not a tar file at all" * 40)
    with pytest.raises(SourceError, match="is not a readable"):
        build(recipe(tmp_path, f'name = "c"\npath = "shards/*.tar"\n{CAPTION}fields = {{ caption = "txt" }}', "b.toml"), tmp_path / "o", progress=False)


def test_a_member_that_is_not_an_image(tmp_path: Path):
    folder = tmp_path / "shards"
    folder.mkdir()
    with tarfile.open(folder / "s.tar", "w") as tar:
        add(tar, "a.png", image_bytes(0))
        add(tar, "a.txt", b"fine")
        add(tar, "b.jpg", b"plain text, not a JPEG")
        add(tar, "b.txt", b"broken image")
    body = f'name = "c"\npath = "shards/s.tar"\n{CAPTION}fields = {{ caption = "txt" }}'
    with pytest.raises(DataError) as e:
        build(recipe(tmp_path, body), tmp_path / "out", progress=False)
    assert (e.value.source, e.value.row, e.value.field) == ("c", 1, "image")
    assert "s.tar#offset=" in str(e.value) and "cannot read the size of image" in str(e.value)
    res = build(recipe(tmp_path, body + '\non_error = "skip"\n', "skip.toml"), tmp_path / "out-skip", progress=False)
    assert res.summary["sources"][0]["skipped"] == 1


def test_a_null_or_corrupt_parquet_cell(tmp_path: Path):
    write_parquet(tmp_path / "pq" / "t.parquet", 7, null_at=4)
    body = f'name = "c"\npath = "pq/t.parquet"\n{CAPTION}fields = {{ image = "image", caption = "caption" }}'
    with pytest.raises(DataError) as e:
        build(recipe(tmp_path, body), tmp_path / "out", progress=False)
    assert (e.value.source, e.value.row, e.value.field) == ("c", 4, "image")
    assert "t.parquet, row group 1, row 1: the image cell 'image' is null" in str(e.value)
    res = build(recipe(tmp_path, body + '\non_error = "skip"\n', "skip.toml"), tmp_path / "o1", progress=False)
    assert any("1 unusable rows (first: row 4" in n for n in res.summary["sources"][0]["notes"])
    assert release_rows(tmp_path / "o1").num_rows == 6

    write_parquet(tmp_path / "pq" / "t.parquet", 7, corrupt_at=5)
    with pytest.raises(DataError) as e:
        build(recipe(tmp_path, body, "c.toml"), tmp_path / "out", progress=False)
    assert (e.value.source, e.value.row, e.value.field) == ("c", 5, "image")
    assert "t.parquet#rg=1,row=2,col=image" in str(e.value)


def test_a_loose_path_that_reads_as_a_reference_is_refused(tmp_path: Path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "x.tar#offset=0,size=10", "caption": "c"}) + "\n")
    with pytest.raises(SourceError, match="reads as a container reference"):
        build(recipe(tmp_path, f'name = "c"\npath = "d.jsonl"\n{CAPTION}fields = {{ image = "image", caption = "caption" }}'),
              tmp_path / "o", progress=False)


def test_the_reference_grammar():
    assert imageref.parse("a/b.tar#offset=1536,size=20480") == imageref.Range("a/b.tar", 1536, 20480)
    assert imageref.parse("x#y.tar#offset=0,size=1") == imageref.Range("x#y.tar", 0, 1)
    ref = imageref.cell_ref("f.parquet", 2, 7, "my image,col")
    assert ref == "f.parquet#rg=2,row=7,col=my%20image%2Ccol"
    assert imageref.parse(ref) == imageref.Cell("f.parquet", 2, 7, "my image,col")
    for plain in ["img#1.jpg", "a.tar#offset=01,size=2", "a.tar#offset=1", "a.parquet#rg=0,row=1,col="]:
        assert imageref.parse(plain) is None and not imageref.looks_like_reference(plain)


def test_check_reads_container_images(tmp_path: Path):
    from mmrecipe.check import check

    write_shards(tmp_path / "shards", 5)
    write_parquet(tmp_path / "pq" / "t.parquet", 5, corrupt_at=3)
    check(recipe(tmp_path, f'name = "c"\npath = "shards/*.tar"\n{CAPTION}fields = {{ caption = "txt" }}'), images="all")
    body = f'name = "c"\npath = "pq/t.parquet"\n{CAPTION}fields = {{ image = "image", caption = "caption" }}'
    with pytest.raises(DataError, match=r"row 3, field 'image': t.parquet#rg=1,row=0,col=image: not an image"):
        check(recipe(tmp_path, body, "p.toml"), images="all")


def test_parquet_list_of_images_equals_loose_files(tmp_path: Path):
    """A list column of image structs (datasets' Sequence(Image)): each element a reference
    of its own, by its position in the row group's flattened lists."""
    from mmrecipe.loader.pixels import open_image

    counts = [2, 0, 1, 3, 1]
    (tmp_path / "loose").mkdir()
    rows, cells, k = [], [], 0
    for i, c in enumerate(counts):
        names = []
        for _ in range(c):
            (tmp_path / "loose" / f"{k}.png").write_bytes(image_bytes(k))
            names.append(f"{k}.png")
            k += 1
        rows.append({"images": names, "question": f"What is in picture {i}?", "answer": caption(i)})
        cells.append([{"bytes": (tmp_path / "loose" / n).read_bytes(), "path": n} for n in names])
    (tmp_path / "loose" / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"images": pa.array(cells, pa.list_(struct)), "question": [r["question"] for r in rows],
                             "answer": [r["answer"] for r in rows]}), tmp_path / "pq" / "qa.parquet", row_group_size=3)
    fields = 'layout = "qa"\ninstructions = ["{question}"]\nfields = { images = "images", question = "question", answer = "answer" }'
    build(recipe(tmp_path, f'name = "c"\npath = "loose/qa.jsonl"\n{fields}', "a.toml"), tmp_path / "o-loose", progress=False)
    build(recipe(tmp_path, f'name = "c"\npath = "pq/qa.parquet"\n{fields}', "b.toml"), tmp_path / "o-pq", progress=False)
    same_but_paths(tmp_path / "o-loose", tmp_path / "o-pq")
    paths = [p for ps in release_rows(tmp_path / "o-pq").column("image_paths").to_pylist() for p in ps]
    assert paths == [f"qa.parquet#rg={rg},row={r},col=images" for rg, r in [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (1, 3)]]
    loose = [p for ps in release_rows(tmp_path / "o-loose").column("image_paths").to_pylist() for p in ps]
    for a, b in zip(loose, paths):
        assert np.array_equal(np.asarray(open_image(str(tmp_path / "loose" / a))), np.asarray(open_image(str(tmp_path / "pq" / b))))


def test_members_of_other_kinds_are_left_out(tmp_path: Path):
    folder = tmp_path / "shards"
    folder.mkdir()
    with tarfile.open(folder / "s.tar", "w") as tar:
        add(tar, "README", b"about these shards")
        add(tar, "d/a.png", image_bytes(0))
        add(tar, "d/a.seg.png", image_bytes(1))  # a second image kind of key a: not read
        add(tar, "d/a.TXT", b"a caption")
        add(tar, "d/b.jpg", image_bytes(2, "JPEG"))
        add(tar, "d/b.cls", b"7")
    res = build(recipe(tmp_path, f'name = "c"\npath = "shards/s.tar"\n{CAPTION}fields = {{ caption = "txt" }}\non_error = "skip"'),
                tmp_path / "o", progress=False)
    rows = release_rows(tmp_path / "o")
    assert rows.num_rows == 1 and rows.column("image_paths").to_pylist()[0][0].startswith("s.tar#offset=")
    # Key d/b has a text member (.cls) but no caption: the caption is missing, a counted skip.
    assert any("rows without a value for 'caption' (first: row 1)" in n for n in res.summary["sources"][0]["notes"])


def test_a_header_read_through_a_window_on_the_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("torch")
    from mmrecipe.loader.pixels import upright_size

    [shard] = write_shards(tmp_path / "s", 3, per_shard=3)
    with tarfile.open(shard) as tar:
        m = tar.getmember("sample00001.png")
    ref = imageref.range_ref(str(shard), m.offset_data, m.size)
    monkeypatch.setattr(imageref, "WINDOW_FROM", 0)
    with imageref.opened(ref, header_only=True) as src:
        assert isinstance(src, io.BufferedReader) and src.read(4) == b"\x89PNG"
    upright_size.cache_clear()
    assert upright_size(ref) == (SIZES[1][1], SIZES[1][0])


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["ustar", "gnu", "pax"])
def test_the_core_lists_the_members_tarfile_lists(tmp_path: Path, fmt: int):
    from mmrecipe import _core

    path = tmp_path / "s.tar"
    long = "deep/" * 12 + "k.json"  # over 100 characters: a prefix, a GNU long name or a pax path
    with tarfile.open(path, "w", format=fmt) as tar:
        d = tarfile.TarInfo("folder")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        add(tar, "folder/a.png", image_bytes(0))
        add(tar, "folder/a.txt", "é caption".encode())
        if fmt != tarfile.USTAR_FORMAT or len(long.rsplit("/", 1)[0]) <= 155:
            add(tar, long, b"{}")
        add(tar, "empty.txt", b"")
    with tarfile.open(path) as tar:
        want = [(m.name, m.offset_data, m.size) for m in tar.getmembers() if m.isfile()]
    names, offsets, sizes = _core.tar_members(path)
    assert list(zip(names, offsets.tolist(), sizes.tolist())) == want and len(want) >= 3
