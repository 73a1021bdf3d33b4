"""`recipe verify`, `recipe stats` and `recipe diff` on copies of the demo release, each
copy damaged or rebuilt in one known way."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
from conftest import DEMO, RECIPES

from mmrecipe import ReleaseError, build
from mmrecipe.cli import main
from mmrecipe.release.format import read_manifest, read_stats


def recipe(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def release(demo_release, tmp_path) -> Path:
    """A private copy of the demo release to damage."""
    return Path(shutil.copytree(demo_release, tmp_path / "demo"))


@pytest.fixture
def recipe_dir(demo_release, tmp_path) -> Path:
    """A copy of the inputs the manifest lists under their recipe-relative paths."""
    root = tmp_path / "recipes"
    for item in read_manifest(demo_release).inputs:
        if not Path(item.path).is_absolute() and not item.path.startswith("mmrecipe:"):  # built-in pools stay installed
            (root / item.path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(RECIPES / item.path, root / item.path)
    return root


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_fresh_release_verifies_with_its_inputs(capsys, demo_release):
    code, out, err = recipe(capsys, "verify", demo_release, "--recipe-dir", RECIPES)
    assert code == 0, out + err
    n = len(read_manifest(demo_release).inputs)
    assert f"1 shard(s), {n} inputs: ok" in out
    # Without a recipe folder only the release itself is checked, and the output says so.
    code, out, _ = recipe(capsys, "verify", demo_release)
    assert code == 0 and "inputs not checked" in out
    # The recipe file itself may stand for its folder.
    assert recipe(capsys, "verify", demo_release, "--recipe-dir", DEMO)[0] == 0


def test_changed_missing_and_extra_shards_are_named(capsys, release):
    shard = read_manifest(release).shards[0].path
    flip_byte(release / shard)
    (release / "data" / "part-00099.parquet").write_bytes(b"stray")
    code, out, _ = recipe(capsys, "verify", release)
    assert code == 1
    assert re.search(rf"changed\s+{shard}: sha256", out)
    assert re.search(r"extra\s+data/part-00099.parquet", out)
    assert "2 problem(s)" in out
    (release / shard).unlink()
    code, out, _ = recipe(capsys, "verify", release)
    assert code == 1 and re.search(rf"missing\s+{shard}", out)


def test_changed_and_missing_inputs_are_named(capsys, demo_release, recipe_dir):
    assert recipe(capsys, "verify", demo_release, "--recipe-dir", recipe_dir)[0] == 0
    flip_byte(recipe_dir / "demo/data/vqa.jsonl")
    (recipe_dir / "demo/data/chat.jsonl").unlink()
    code, out, _ = recipe(capsys, "verify", demo_release, "--recipe-dir", recipe_dir)
    assert code == 1
    assert re.search(r"changed\s+demo/data/vqa.jsonl \(source:vqa\): sha256", out)
    assert re.search(r"missing\s+demo/data/chat.jsonl \(source:chat\)", out)
    assert "captions" not in out and "2 problem(s)" in out


def test_edited_manifest_no_longer_matches_its_release_id(capsys, release):
    manifest = json.loads((release / "manifest.json").read_text())
    manifest["seed"] += 1
    (release / "manifest.json").write_text(json.dumps(manifest, indent=2))
    code, out, _ = recipe(capsys, "verify", release)
    assert code == 1 and re.search(r"changed\s+manifest.json: release_id", out)


def test_not_a_release_is_a_clean_error(capsys, tmp_path):
    code, out, err = recipe(capsys, "verify", tmp_path)
    assert code == 1 and out == "" and "not a release" in err and "Traceback" not in err


def test_stats_json_equals_the_build_summary(capsys, demo_release):
    code, out, err = recipe(capsys, "stats", demo_release, "--json")
    assert code == 0 and err == ""
    stats = json.loads(out)
    built = read_stats(demo_release)
    assert stats["disagreements"] == []
    for key, value in built.items():
        if key not in ("sources", "packing"):
            assert stats[key] == pytest.approx(value), key
    for key, value in built["packing"].items():
        assert stats["packing"][key] == (pytest.approx(value) if isinstance(value, (float, dict)) else value), key
    assert stats["packing"]["bounds"]["best"] == built["lower_bound"] >= built["packing"]["bounds"]["l1"] > 0
    weights = sum(s["weight"] for s in built["sources"])
    for row, b in zip(stats["sources"], built["sources"]):
        for key, value in b.items():
            assert row[key] == value, (b["name"], key)
        assert row["share"] == pytest.approx(b["selected"] / built["segments"])
        assert row["target_share"] == pytest.approx(b["weight"] / weights)
    text = recipe(capsys, "stats", demo_release)[1]
    assert "target" in text and "realized" in text and "packing efficiency" in text and "llava" in text


def test_stats_reports_a_summary_the_shards_contradict(capsys, release):
    stats = json.loads((release / "stats.json").read_text())
    stats["sources"][0]["selected"] += 1
    (release / "stats.json").write_text(json.dumps(stats))
    code, out, err = recipe(capsys, "stats", release, "--json")
    assert code == 0 and "vqa.selected: stats.json" in err
    assert json.loads(out)["sources"][0]["selected"] == stats["sources"][0]["selected"] - 1  # counted


def test_stats_plot_writes_a_png(capsys, demo_release, tmp_path, monkeypatch):
    png = tmp_path / "plots" / "lengths.png"
    code, _, err = recipe(capsys, "stats", demo_release, "--plot", png)
    assert code == 0, err
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    # Without matplotlib: a clear error, not a traceback.
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.ticker"):
        monkeypatch.setitem(sys.modules, name, None)  # `import` of each now fails
    code, _, err = recipe(capsys, "stats", demo_release, "--plot", tmp_path / "x.png")
    assert code == 1 and "needs matplotlib" in err


def demo_copy(tmp_path: Path, *replacements: tuple[str, str]) -> Path:
    """The demo recipe in tmp_path, reading the same data and tokenizer by absolute path."""
    text = DEMO.read_text("utf-8")
    for rel in ('"models/smollm2"', '"demo/data'):
        text = text.replace(rel, f'"{RECIPES}/{rel[1:]}')
    for old, new in replacements:
        assert old in text
        text = text.replace(old, new)
    (tmp_path / "demo.toml").write_text(text, "utf-8")
    return tmp_path / "demo.toml"


def test_stats_targets_follow_temperature_and_token_totals(capsys, tmp_path):
    recipe_path = demo_copy(tmp_path, ("total = { samples = 400 }", "total = { tokens = 40000 }\nalpha = 0.5"))
    release = build(recipe_path, tmp_path / "tok", progress=False).path
    code, out, _ = recipe(capsys, "stats", release, "--json")
    stats = json.loads(out)
    assert code == 0 and stats["mixture"] == "tokens" and stats["alpha"] == 0.5
    rows = stats["sources"]
    basis = [r["weight"] * r["usable"] ** 0.5 for r in rows]
    longest = 400  # every demo sample is shorter: the selection overshoots by less per source
    for r, b in zip(rows, basis):
        assert r["target_share"] == pytest.approx(b / sum(basis))
        assert r["share"] == pytest.approx(r["tokens"] / stats["tokens"])
        assert abs(r["tokens"] - r["target_share"] * 40000) < longest


def test_diff_names_the_changed_key_and_counts(capsys, demo_release, tmp_path):
    # Same data and tokenizer; another seed and captions weight.
    demo_copy(tmp_path, ("seed = 42", "seed = 7"), ("weight = 0.15", "weight = 0.25"))
    other = build(tmp_path / "demo.toml", tmp_path / "other", progress=False).path

    code, out, _ = recipe(capsys, "diff", demo_release, other, "--json")
    assert code == 0
    d = json.loads(out)
    assert not d["identical"]
    changes = {c["key"]: (c.get("old"), c.get("new")) for c in d["recipe"]}
    assert changes["recipe.seed"] == (42, 7)
    assert changes["source[1].weight"] == (0.15, 0.25)
    # Only the recipe file changed content; the data moved to absolute paths.
    assert [i["role"] for i in d["inputs"]["changed"]] == ["recipe"]
    assert d["inputs"]["added"] == [] and d["inputs"]["removed"] == []
    assert {i["role"] for i in d["inputs"]["moved"]} >= {"tokenizer", "source:vqa"}
    a, b = read_stats(demo_release), read_stats(other)
    for row, ra, rb in zip(d["sources"], a["sources"], b["sources"]):
        assert row["selected"] == [ra["selected"], rb["selected"]]
        assert row["tokens"] == [ra["tokens"], rb["tokens"]]
    assert d["sources"][1]["changed"] and d["sources"][1]["selected"][1] > d["sources"][1]["selected"][0]

    text = recipe(capsys, "diff", demo_release, other)[1]
    assert "recipe.seed: 42 -> 7" in text and "source[1].weight: 0.15 -> 0.25" in text
    captions = next(line for line in text.splitlines() if line.startswith("captions"))
    assert f"{a['sources'][1]['selected']} -> {b['sources'][1]['selected']}" in captions
    same = recipe(capsys, "diff", demo_release, demo_release)[1]
    assert "identical releases" in same


def test_recipe_dir_must_exist(demo_release, tmp_path):
    from mmrecipe.release.verify import verify

    with pytest.raises(ReleaseError, match="--recipe-dir"):
        verify(demo_release, tmp_path / "nope")


def test_every_file_of_the_release_is_checked(capsys, release):
    """stats.json byte for byte (a changed per-source count is caught, not only the
    totals), and any file the manifest does not list, wherever it is."""
    stats = json.loads((release / "stats.json").read_text())
    stats["sources"][0]["rows"] += 1
    (release / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    (release / "notes.txt").write_text("stray")
    code, out, _ = recipe(capsys, "verify", release)
    assert code == 1
    assert re.search(r"changed\s+stats.json: sha256", out)
    assert re.search(r"extra\s+notes.txt", out)
