#!/usr/bin/env python3
"""Containers benchmark: the same captioned images as loose files, WebDataset shards and
a parquet file of image bytes; per container, images/s of

    build    a caption build under the grid image rule (every image's header read by
             the core, in place: files, tar members by offset, parquet cells from memory),
             read + tokenize stages, of a second build (the files in the page cache)
    headers  the loader's upright_size (header only, PIL) on every image of the release
    decode   the loader's open_image (full decode, RGB) on every image of the release

    python bench/containers.py [--n 4000] [--side 256] [--per-shard 1000]

Ratios are against loose files.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "recipes" / "models" / "smollm2"
GRID = 'image = { placeholder = "<image>", token = "<image>", patch = 14, merge = 2, min_pixels = 3136, max_pixels = 200704 }'


def images(n: int, side: int) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
    out = []
    for i in range(n):
        w, h = side - (i % 7) * 8, side - (i % 5) * 8
        buf = io.BytesIO()
        Image.fromarray(np.roll(base, i, axis=1)[:h, :w]).save(buf, format="JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def write_all(folder: Path, data: list[bytes], per_shard: int) -> dict[str, str]:
    caps = [f"image number {i} of the benchmark" for i in range(len(data))]
    (folder / "loose" / "img").mkdir(parents=True)
    with open(folder / "loose" / "captions.jsonl", "w") as f:
        for i, b in enumerate(data):
            (folder / "loose" / "img" / f"{i}.jpg").write_bytes(b)
            f.write(json.dumps({"image": f"img/{i}.jpg", "caption": caps[i]}) + "\n")
    (folder / "wds").mkdir()
    for s in range(0, len(data), per_shard):
        with tarfile.open(folder / "wds" / f"shard-{s // per_shard:04d}.tar", "w") as tar:
            for i in range(s, min(len(data), s + per_shard)):
                for name, blob in ((f"{i:08d}.jpg", data[i]), (f"{i:08d}.txt", caps[i].encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
    (folder / "pq").mkdir()
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"image": pa.array([{"bytes": b, "path": None} for b in data], struct), "caption": caps})
    pq.write_table(table, folder / "pq" / "train.parquet", row_group_size=1000)
    return {
        "loose": 'path = "loose/captions.jsonl"\nfields = { image = "image", caption = "caption" }',
        "webdataset": 'path = "wds/*.tar"\nfields = { caption = "txt" }',
        "parquet": 'path = "pq/train.parquet"\nfields = { image = "image", caption = "caption" }',
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--side", type=int, default=256)
    ap.add_argument("--per-shard", type=int, default=1000)
    args = ap.parse_args()
    from mmrecipe import build
    from mmrecipe.loader.pixels import open_image, upright_size
    from mmrecipe.torch import PackedDataset

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = images(args.n, args.side)
        bodies = write_all(folder, data, args.per_shard)
        print(f"{args.n} JPEG images, {sum(map(len, data)) / len(data) / 1024:.1f} KiB each on average")
        rows: dict[str, dict[str, float]] = {}
        for name, body in bodies.items():
            recipe = folder / f"{name}.toml"
            recipe.write_text(f'[recipe]\nname = "b"\n[model]\ntokenizer = "{MODEL}"\n{GRID}\n[output]\npacking = "none"\n'
                              f'[[source]]\nname = "s"\nlayout = "caption"\ninstructions = [""]\n{body}\n')
            for _ in range(2):  # the second build, on files in the page cache
                res = build(recipe, folder / f"out-{name}", progress=False, overwrite=True)
            t_build = res.timings.get("read", 0.0) + res.timings.get("tokenize", 0.0)
            print(f"  {name}: read {res.timings.get('read', 0):.2f} s, tokenize {res.timings.get('tokenize', 0):.2f} s", file=sys.stderr)
            root = folder / {"loose": "loose", "webdataset": "wds", "parquet": "pq"}[name]
            ds = PackedDataset(folder / f"out-{name}")
            paths = [str(root / p) for i in range(len(ds)) for p in ds[i]["image_paths"]]
            upright_size.cache_clear()
            t0 = time.perf_counter()
            for p in paths:
                upright_size(p)
            t_head = time.perf_counter() - t0
            t0 = time.perf_counter()
            for p in paths:
                open_image(p)
            t_dec = time.perf_counter() - t0
            rows[name] = {"build": args.n / t_build, "headers": len(paths) / t_head, "decode": len(paths) / t_dec}
        base = rows["loose"]
        print(f"{'container':<11} {'build img/s':>12} {'headers img/s':>14} {'decode img/s':>13}   ratios vs loose")
        for name, r in rows.items():
            ratios = " ".join(f"{r[k] / base[k]:.2f}" for k in ("build", "headers", "decode"))
            print(f"{name:<11} {r['build']:>12.0f} {r['headers']:>14.0f} {r['decode']:>13.0f}   {ratios}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
