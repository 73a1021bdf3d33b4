"""Packing in real builds: `packing = "tight"` against BFD and the bounds, the image budget
(`max_images`) and image balance, and the packing block of stats.json recounted from the
shards. The packers' own properties (every item once, budgets, bounds below the optimum,
an adversarial family for BFD) are proptests in rust/pack/."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import DEMO, small_recipe

from mmrecipe import _core, build
from mmrecipe.errors import RecipeError
from mmrecipe.recipe import load_recipe
from mmrecipe.release.stats import release_stats


def demo_with(folder: Path, output: str) -> Path:
    path = folder / "r.toml"
    path.write_text(f'extends = "{DEMO}"\n[output]\n{output}\n')
    return path


def rows(release: Path) -> list[dict]:
    out = []
    for part in sorted((release / "data").glob("*.parquet")):
        out += pq.read_table(part, columns=["input_ids", "segment_lengths", "segment_images", "image_lengths"]).to_pylist()
    return out


def test_max_images_bounds_every_sequence_and_is_recounted(tmp_path):
    out = build(demo_with(tmp_path, "max_images = 6"), tmp_path / "out", progress=False).path
    packed = rows(out)
    per_row = [sum(r["segment_images"]) for r in packed]
    assert max(per_row) == 6 and sum(per_row) == sum(len(r["image_lengths"]) for r in packed) > 0
    stats = json.loads((out / "stats.json").read_text())
    p = stats["packing"]
    assert p["max_images"] == 6 and p["images_per_sequence"]["max"] == 6
    # 300 images at most 6 a row need 50 rows, more than tokens alone (30).
    assert p["bounds"]["images"] == -(-sum(per_row) // 6) == p["bounds"]["best"] == stats["lower_bound"]
    assert p["without_image_budget"]["sequences"] < stats["sequences"]
    assert release_stats(out)["disagreements"] == []


def test_balance_images_evens_counts_within_the_tolerance(tmp_path):
    plain = build(DEMO, tmp_path / "plain", progress=False)
    balanced = build(demo_with(tmp_path, 'balance = "images"'), tmp_path / "bal", progress=False)
    a = [sum(r["segment_images"]) for r in rows(plain.path)]
    b = [sum(r["segment_images"]) for r in rows(balanced.path)]
    assert sum(a) == sum(b)
    assert max(b) < max(a) and np.std(b) < np.std(a), (sorted(a), sorted(b))
    assert len(b) <= len(a) + int(len(a) * 0.005)
    cap = balanced.summary["packing"]["image_cap"]
    assert cap is not None and max(b) <= cap


def test_samples_over_max_images_are_dropped_and_counted(tmp_path):
    from PIL import Image

    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    two = {"images": ["a.png", "a.png"], "conversations": [{"from": "human", "value": "<image> and <image>"}, {"from": "gpt", "value": "two"}]}
    one = {"images": ["a.png"], "conversations": [{"from": "human", "value": "<image> one"}, {"from": "gpt", "value": "one"}]}
    (tmp_path / "c.json").write_text(json.dumps([one, two, one]))
    source = 'name = "conv"\npath = "c.json"\nlayout = "conversation"\nfields = { images = "images" }'
    (tmp_path / "r.toml").write_text(small_recipe(source, model="image = { count = 4 }", output="max_images = 1"))
    result = build(tmp_path / "r.toml", tmp_path / "out", progress=False)
    src = result.summary["sources"][0]
    assert (src["rows"], src["dropped_images"], src["selected"]) == (3, 1, 2)
    assert all(sum(r["segment_images"]) <= 1 for r in rows(result.path))


@pytest.mark.parametrize(
    "bad, message",
    [
        ("max_images = 0", "output.max_images: must be at least 1"),
        ('balance = "tokens"', "output.balance"),
        ('balance = "images"\npacking = "none"', 'output.balance: "images" balances packed sequences'),
    ],
)
def test_bad_packing_options_name_their_key(tmp_path, bad, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(demo_with(tmp_path, bad))


def test_an_image_budget_without_an_image_rule_names_its_key(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ok"}]}\n')
    (tmp_path / "r.toml").write_text(small_recipe('name = "c"\npath = "c.jsonl"\nlayout = "conversation"', output="max_images = 2"))
    with pytest.raises(RecipeError, match="output.max_images: counts images, but the recipe has no"):
        load_recipe(tmp_path / "r.toml")


def test_tight_packs_no_worse_than_bfd_and_the_release_is_the_same_for_any_thread_count(tmp_path):
    tight = [build(DEMO, tmp_path / f"t{n}", progress=False, threads=n) for n in (1, 2)]
    bfd = build(demo_with(tmp_path, 'packing = "bfd"'), tmp_path / "bfd", progress=False)
    assert tight[0].manifest.release_id == tight[1].manifest.release_id
    assert tight[0].summary["sequences"] <= bfd.summary["sequences"]
    assert bfd.summary["packing"]["packer"] == "bfd"
    for r in (tight[0], bfd):
        lengths = np.concatenate([np.array(x["segment_lengths"], np.uint32) for x in rows(r.path)])
        assert sum(len(x["input_ids"]) for x in rows(r.path)) == int(lengths.sum())
        assert r.summary["lower_bound"] == _core.pack_bounds(lengths, 2048)["best"]


def test_pack_lengths_packers_on_a_hard_mix():
    # Six 576-token images with short answers fill a 4096 row but seven do not.
    rng = np.random.default_rng(0)
    n = 20_000
    kind = rng.random(n)
    lengths = np.where(kind < 0.4, 576 + rng.lognormal(5.3, 0.8, n), np.where(kind < 0.8, 576 + rng.integers(10, 60, n), rng.lognormal(5.8, 1.0, n)))
    lengths = np.clip(lengths, 20, 4096).astype(np.uint32)
    bound = _core.pack_bounds(lengths, 4096)["best"]
    count = {p: len(_core.pack_lengths(lengths, 4096, p)[0]) - 1 for p in ("bfd", "refill", "patterns", "tight")}
    assert count["tight"] == min(count.values()) and bound / count["bfd"] < 0.99 <= 0.995 <= bound / count["tight"], count
    offsets, items = _core.pack_lengths(lengths, 4096, "tight")
    assert sorted(items.tolist()) == list(range(n))
    assert max(int(lengths[items[a:b]].sum()) for a, b in zip(offsets[:-1], offsets[1:])) <= 4096
    with pytest.raises(ValueError, match="outside 1..=4096"):
        _core.pack_lengths(np.array([5000], np.uint32), 4096)
