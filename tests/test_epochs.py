"""Multi-epoch releases (`[output] epochs = N`): each epoch draws its own templates, subset,
order and packing from (seed, epoch); epoch 0 is the one-epoch release byte for byte;
verify, stats, diff, export and the loader understand epochs."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import DEMO, RECIPES

from mmrecipe import RecipeError, build, load_recipe
from mmrecipe.recipe import resolve
from mmrecipe.hashing import Hashes
from mmrecipe.release.format import read_manifest
from mmrecipe.release.verify import verify
from mmrecipe.store import source_key

EPOCHS = 3
DEMO_EPOCHS = RECIPES / "demo-epochs.toml"


def files(release: Path) -> dict[str, bytes]:
    return {p.relative_to(release).as_posix(): p.read_bytes() for p in sorted(release.rglob("*")) if p.is_file()}


def segments(release: Path, epoch: int) -> dict[tuple[int, int, int], tuple[int, bytes]]:
    """(source, row, repeat) → (template, the sample's token ids) of every packed sample of an epoch."""
    manifest = read_manifest(release).epoch(epoch)
    out: dict[tuple[int, int, int], tuple[int, bytes]] = {}
    for shard in manifest.shards:
        t = pq.read_table(release / shard.path).to_pylist()
        for row in t:
            start = 0
            for n, src, r, rep, tpl in zip(row["segment_lengths"], row["segment_source"], row["segment_row"],
                                           row["segment_repeat"], row["segment_template"]):
                out[(src, r, rep)] = (tpl, np.asarray(row["input_ids"][start:start + n], np.uint32).tobytes())
                start += n
    return out


@pytest.fixture(scope="module")
def releases(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("epochs")
    one = build(DEMO, tmp / "one", progress=False, cache=False).path
    many = build(DEMO_EPOCHS, tmp / "many", progress=False, cache=False).path
    return {"one": one, "many": many}


def test_epoch_zero_is_the_one_epoch_release(releases):
    one, many = files(releases["one"]), files(releases["many"])
    assert one["data/part-00000.parquet"] == many["data/part-00000.parquet"]
    assert one["stats.json"] == many["stats.json"]
    m1, m3 = read_manifest(releases["one"]), read_manifest(releases["many"])
    assert m1.epoch_count == 1 and "epochs" not in json.loads(one["manifest.json"])
    assert m3.epoch_count == EPOCHS and [p.epoch for p in m3.epochs] == list(range(EPOCHS))
    assert m3.shards == m1.shards == m3.epochs[0].shards and m3.totals == m1.totals
    assert m3.release_id != m1.release_id  # the recipe says 3 epochs
    assert sorted(f for f in many if f.startswith("epoch-")) == [
        f"epoch-{e:05d}/{name}" for e in (1, 2) for name in ("data/part-00000.parquet", "stats.json")]


def test_each_epoch_draws_its_own_templates_subset_and_order(releases):
    recipe = load_recipe(DEMO)
    names = [s.name for s in recipe.source]
    per = [segments(releases["many"], e) for e in range(EPOCHS)]
    counts = [json.loads((releases["many"] / read_manifest(releases["many"]).stats_path(e)).read_text())["sources"] for e in range(EPOCHS)]
    for e in range(EPOCHS):
        # The mixture's exact counts hold in every epoch.
        assert [s["selected"] for s in counts[e]] == [s["selected"] for s in counts[0]] == [120, 60, 120, 100]
        assert sum(1 for k in per[e]) == 400
    vqa, captions, llava = names.index("vqa"), names.index("captions"), names.index("llava")
    for a, b in [(0, 1), (1, 2), (0, 2)]:
        rows = lambda e, s: {k[1] for k in per[e] if k[0] == s}  # noqa: E731
        # vqa keeps 120 of its 149 rows: another subset each epoch.
        assert rows(a, vqa) != rows(b, vqa) and len(rows(a, vqa)) == len(rows(b, vqa)) == 120
        # Templates drawn anew: rows in both epochs mostly got another of the 12.
        both = [k for k in per[a] if k[0] == vqa and k in per[b]]
        assert len(both) > 50
        changed = [k for k in both if per[a][k][0] != per[b][k][0]]
        assert len(changed) > len(both) // 2
        # Where the template is the same the sample is the same; where it differs so do the ids.
        for k in both:
            assert (per[a][k][0] == per[b][k][0]) == (per[a][k][1] == per[b][k][1]), k
        # A source without templates (llava, upsampled) has the same samples every epoch.
        lk = [k for k in per[a] if k[0] == llava]
        assert lk and all(per[a][k] == per[b][k] for k in lk if k in per[b])
        # The order of rows differs.
        first_rows = lambda e: pq.read_table(releases["many"] / read_manifest(releases["many"]).epoch(e).shards[0].path,  # noqa: E731
                                             columns=["segment_row"]).column(0).to_pylist()
        assert first_rows(a) != first_rows(b)
    assert {per[e][k][0] for e in range(EPOCHS) for k in per[e] if k[0] == captions} - {-1}


def test_the_release_is_the_same_on_any_thread_count_and_with_the_token_store(releases, tmp_path):
    want = files(releases["many"])
    assert files(build(DEMO_EPOCHS, tmp_path / "t1", threads=1, progress=False, cache=False).path) == want
    first = build(DEMO_EPOCHS, tmp_path / "s1", progress=False, cache=tmp_path / "store")
    # Sources without templates are tokenized once and loaded for the later epochs.
    assert first.store["tokenized"] == ["vqa", "captions", "llava", "chat", "vqa (epoch 1)", "captions (epoch 1)",
                                        "vqa (epoch 2)", "captions (epoch 2)"]
    assert first.store["reused"] == ["llava (epoch 1)", "chat (epoch 1)", "llava (epoch 2)", "chat (epoch 2)"]
    again = build(DEMO_EPOCHS, tmp_path / "s2", progress=False, cache=tmp_path / "store")
    assert again.store["tokenized"] == [] and len(again.store["reused"]) == 4 * EPOCHS
    assert files(first.path) == files(again.path) == want
    assert [t["sequences"] for t in first.epochs] == [p.totals["sequences"] for p in read_manifest(first.path).epochs]


def test_the_store_keys_on_the_epoch_only_where_it_draws_templates():
    plan = resolve(load_recipe(DEMO_EPOCHS))
    hashes = Hashes()
    one = resolve(load_recipe(DEMO))
    for s in plan.sources:
        keys = [source_key(plan, s, hashes, None, e) for e in range(EPOCHS)]
        assert keys[0] == source_key(one, one.sources[s.index], hashes)  # shared with the one-epoch build
        if len(s.templates) > 1:
            assert len(set(keys)) == EPOCHS, s.name
        else:
            assert len(set(keys)) == 1, s.name


def test_verify_checks_every_epoch(releases, tmp_path):
    import shutil

    assert verify(releases["many"]).ok and verify(releases["many"]).shards == EPOCHS
    copy = tmp_path / "copy"
    shutil.copytree(releases["many"], copy)
    shard = copy / "epoch-00002/data/part-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[100] ^= 1
    shard.write_bytes(bytes(data))
    (copy / "epoch-00001" / "data" / "stray.parquet").write_bytes(b"x")
    stats = json.loads((copy / "epoch-00001/stats.json").read_text())
    stats["sequences"] += 1
    (copy / "epoch-00001/stats.json").write_text(json.dumps(stats))
    problems = {(p.kind, p.path) for p in verify(copy).problems}
    assert problems == {("changed", "epoch-00002/data/part-00000.parquet"), ("extra", "epoch-00001/data/stray.parquet"),
                        ("changed", "epoch-00001/stats.json"), ("inconsistent", "epoch-00001/stats.json")}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmrecipe", *args], capture_output=True, text=True)


def test_stats_diff_and_export_name_an_epoch(releases, tmp_path):
    many = str(releases["many"])
    for e in range(EPOCHS):
        out = cli("stats", many, "--epoch", str(e), "--json")
        assert out.returncode == 0, out.stderr
        stats = json.loads(out.stdout)
        assert (stats["epoch"], stats["epochs"]) == (e, EPOCHS) and not stats["disagreements"]
        assert stats["sequences"] == read_manifest(many).epochs[e].totals["sequences"]
    bad = cli("stats", many, "--epoch", "3")
    assert bad.returncode != 0 and "has 3 epoch(s) (0..2); there is no epoch 3" in bad.stderr
    d = cli("diff", str(releases["one"]), many, "--json")
    assert d.returncode == 0
    changes = json.loads(d.stdout)
    assert {"key": "epochs", "old": 1, "new": 3} in changes["release"]
    assert not any(s["changed"] for s in changes["sources"])  # epoch 0 is the same
    assert "there is no epoch 1" in cli("diff", str(releases["one"]), many, "--epoch", "1").stderr
    refused = cli("export", many, "--to", "megatron", "-o", str(tmp_path / "m"), "--drop-images")
    assert refused.returncode != 0 and "has 3 epochs; export one of them with --epoch E (0..2)" in refused.stderr
    ok = cli("export", many, "--to", "megatron", "-o", str(tmp_path / "m1"), "--drop-images", "--epoch", "1")
    assert ok.returncode == 0, ok.stderr
    exported = json.loads((tmp_path / "m1" / "export.json").read_text())
    assert exported["epoch"] == 1 and exported["rows"] == read_manifest(many).epochs[1].totals["sequences"]


def test_the_loader_reads_the_epoch_it_is_set_to(releases):
    from mmrecipe.torch import EpochWrapWarning, PackedDataset, ReleaseSampler, dataloader

    many = releases["many"]
    manifest = read_manifest(many)
    ds = PackedDataset(many)
    for e in (2, 0, 1):
        ds.set_epoch(e)
        want = pq.read_table(many / manifest.epochs[e].shards[0].path, columns=["input_ids"]).column(0).to_pylist()
        assert len(ds) == len(want) == manifest.epochs[e].totals["sequences"]
        assert [ds[i]["input_ids"].tolist() for i in range(len(ds))] == want
    with pytest.warns(EpochWrapWarning, match="holds 3 epoch"):
        ds.set_epoch(4)
    assert ds.epoch == 1 and len(ds) == manifest.epochs[1].totals["sequences"]
    sampler = ReleaseSampler(PackedDataset(many), rank=1, world_size=2, seed=5)
    for e in range(EPOCHS):
        sampler.set_epoch(e)
        assert len(list(sampler)) == manifest.epochs[e].totals["sequences"] // 2 == len(sampler)
    state = sampler.state_dict()
    other = ReleaseSampler(PackedDataset(many), rank=1, world_size=2, seed=5)
    other.load_state_dict(state)  # epoch 2's size, not epoch 0's
    assert other.dataset.epoch == 2
    with pytest.raises(ValueError, match="persistent DataLoader workers"):
        dataloader(many, num_workers=1, persistent_workers=True)
    loader = dataloader(many, batch_size=4, epoch=1)
    assert sum(b["input_ids"].shape[0] for b in loader) == manifest.epochs[1].totals["sequences"]
    one = PackedDataset(releases["one"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one.set_epoch(0)
    with pytest.warns(EpochWrapWarning, match="holds 1 epoch"):
        one.set_epoch(1)


@pytest.mark.parametrize("value, message", [
    ("0", "output.epochs: must be at least 1 and at most 1,000, got 0"),
    ('"two"', "output.epochs"),
])
def test_bad_epochs_name_the_key(tmp_path, value, message):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'extends = "{DEMO}"\n[output]\nepochs = {value}\n')
    with pytest.raises(RecipeError, match=message):
        load_recipe(recipe)


def test_epochs_of_the_same_samples_pack_them_anew(tmp_path):
    """Sources without templates, every row once: each epoch has the very same samples,
    yet its rows put them together otherwise (and in another order)."""
    data = RECIPES / "demo" / "data"
    recipe = tmp_path / "same.toml"
    recipe.write_text(f"""
[recipe]
name = "same"
[model]
tokenizer = "{RECIPES / 'models' / 'smollm2'}"
image = {{ placeholder = "<image>", token = "<image>", count = 64 }}
[output]
seq_len = 2048
epochs = 2
[[source]]
name = "llava"
path = "{data / 'llava.json'}"
layout = "conversation"
image_root = "{data}"
[[source]]
name = "chat"
path = "{data / 'chat.jsonl'}"
layout = "conversation"
""")
    out = build(recipe, tmp_path / "out", progress=False, cache=False).path
    per = [segments(out, e) for e in range(2)]
    assert per[0] == per[1] and len(per[0]) == 51 + 81  # the same samples, token for token
    manifest = read_manifest(out)

    def rows(e: int) -> list[frozenset]:
        table = pq.read_table(out / manifest.epoch(e).shards[0].path, columns=["segment_source", "segment_row"]).to_pylist()
        return [frozenset(zip(r["segment_source"], r["segment_row"])) for r in table]

    assert sorted(map(sorted, rows(0))) != sorted(map(sorted, rows(1)))  # other partners in the rows
    assert set().union(*rows(0)) == set().union(*rows(1))


def test_an_audio_release_has_epochs_too(tmp_path):
    """Audio builds keep no token store entries, so every epoch tokenizes its sources:
    epoch 0 is still the one-epoch release, and each epoch's audio runs are whole."""
    from test_release_ids import lay_out

    recipes = lay_out(tmp_path / "work")
    (recipes / "asr-epochs.toml").write_text('extends = "asr-alignment-fixtures.toml"\n[output]\nepochs = 2\n')
    one = build(recipes / "asr-alignment-fixtures.toml", tmp_path / "one", progress=False, offline=True).path
    two = build(recipes / "asr-epochs.toml", tmp_path / "two", progress=False, offline=True).path
    assert files(one)["data/part-00000.parquet"] == files(two)["data/part-00000.parquet"]
    assert verify(two).ok
    manifest = read_manifest(two)
    for e in range(2):
        table = pq.read_table(two / manifest.epoch(e).shards[0].path).to_pylist()
        token = manifest.audio["token_id"]
        runs = [(r["input_ids"], p, n) for r in table for p, n in zip(r["audio_positions"], r["audio_lengths"])]
        assert runs and all(n > 0 and all(t == token for t in ids[p:p + n]) and len(ids[p:p + n]) == n for ids, p, n in runs)
