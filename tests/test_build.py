"""End-to-end builds of the bundled demo: what lands on disk, exact counts, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import DEMO, MODEL, small_recipe

from mmrecipe import ReleaseError, build, load_recipe
from mmrecipe.release.format import read_manifest


def tables(release: Path):
    m = read_manifest(release)
    return m, [pq.read_table(release / s.path) for s in m.shards]


def test_demo_release_layout_and_counts(demo_release):
    m, ts = tables(demo_release)
    stats = json.loads((demo_release / "stats.json").read_text())
    recipe = load_recipe(DEMO)
    # Exact mixture: the largest-remainder split of the recipe's total.
    total = recipe.mixture.total["samples"]
    weights = np.array([s.weight for s in recipe.source])
    quotas = weights / weights.sum() * total
    selected = [s["selected"] for s in stats["sources"]]
    assert sum(selected) == total
    assert all(abs(c - q) < 1 for c, q in zip(selected, quotas))
    # Every segment is accounted for, and no row exceeds seq_len.
    seg_src = np.concatenate([np.concatenate(t.column("segment_source").to_numpy(zero_copy_only=False)) for t in ts])
    assert np.bincount(seg_src, minlength=len(selected)).tolist() == selected
    for t in ts:
        for ids, lens, mask in zip(t.column("input_ids").to_pylist(), t.column("segment_lengths").to_pylist(), t.column("loss_mask").to_pylist()):
            assert len(ids) == sum(lens) <= m.seq_len
            assert len(mask) == len(ids)
    assert sum(s.sequences for s in m.shards) == stats["sequences"]
    assert {i.role for i in m.inputs} >= {"recipe", "tokenizer", "source:vqa", "source:chat", "pool:vqa-short"}
    assert not any(p.name.startswith(".") for p in demo_release.parent.iterdir())  # no staging left


def test_image_tokens_are_never_trained_and_match_placeholders(demo_release):
    m, ts = tables(demo_release)
    image_id = 49152
    for t in ts:
        for row in t.to_pylist():
            ids = np.array(row["input_ids"])
            mask = np.array(row["loss_mask"], dtype=bool)
            assert not mask[ids == image_id].any()
            # Image token count = Σ per-image counts, each run where the records say.
            assert (ids == image_id).sum() == sum(row["image_lengths"])
            for pos, n in zip(row["image_positions"], row["image_lengths"]):
                assert 0 < n and pos + n <= len(ids), (pos, n, len(ids))  # a run inside its row
                assert (ids[pos : pos + n] == image_id).all()
            assert len(row["image_paths"]) == sum(row["segment_images"])


def test_segments_decode_to_conversations(demo_release, hf_tokenizer):
    m, ts = tables(demo_release)
    row = ts[0].slice(0, 1).to_pylist()[0]
    start = 0
    for n in row["segment_lengths"]:
        text = hf_tokenizer.decode(row["input_ids"][start : start + n])
        assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_end|>\n")
        start += n


def test_same_release_for_one_or_two_threads(tmp_path):
    a = build(DEMO, tmp_path / "a", threads=1, progress=False)
    b = build(DEMO, tmp_path / "b", threads=2, progress=False)
    files_a = sorted(p.relative_to(a.path) for p in a.path.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b.path) for p in b.path.rglob("*") if p.is_file())
    assert files_a == files_b
    for f in files_a:
        assert (a.path / f).read_bytes() == (b.path / f).read_bytes(), f


def test_existing_release_is_kept_unless_overwrite(tmp_path, demo_release):
    import shutil

    out = tmp_path / "r"
    shutil.copytree(demo_release, out)
    (out / "keep").write_text("x")
    with pytest.raises(ReleaseError, match="already exists"):
        build(DEMO, out, progress=False)
    assert (out / "keep").read_text() == "x"
    build(DEMO, out, progress=False, overwrite=True)  # a release may be replaced
    assert (out / "manifest.json").is_file() and not (out / "keep").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(ReleaseError, match="is not a release"):  # a user's folder may not
        build(DEMO, tmp_path / "mine", progress=False, overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "x"


def test_failed_build_leaves_nothing(tmp_path):
    recipe = tmp_path / "r.toml"
    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                    '{"messages": [{"role": "user", "content": "no answer"}]}\n')
    recipe.write_text(small_recipe('name = "chat"\npath = "d.jsonl"\nlayout = "conversation"'))
    from mmrecipe import DataError

    with pytest.raises(DataError) as e:
        build(recipe, tmp_path / "out", progress=False)
    assert e.value.source == "chat" and e.value.row == 1 and e.value.field == "messages"
    assert "no assistant turn" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "r.toml"]  # no release, no staging
    # With on_error = "skip" the row is counted and the build goes on.
    recipe.write_text(recipe.read_text() + 'on_error = "skip"\n')
    result = build(recipe, tmp_path / "out", progress=False)
    src = result.summary["sources"][0]
    assert (src["rows"], src["skipped"], src["selected"]) == (2, 1, 1)
    assert "row 1" in src["skipped_examples"][0]


def test_changing_any_input_changes_the_release_id(tmp_path):
    import shutil

    from mmrecipe.recipe import load_recipe

    work = tmp_path / "recipes"
    shutil.copytree(DEMO.parent / "demo", work / "demo")
    shutil.copytree(MODEL, work / "models" / "smollm2")
    shutil.copy(DEMO, work / "demo.toml")
    base = build(work / "demo.toml", tmp_path / "a", progress=False).manifest.release_id
    assert build(work / "demo.toml", tmp_path / "a2", progress=False).manifest.release_id == base
    chat = work / "demo" / "data" / "chat.jsonl"
    chat.write_text(chat.read_text().replace("Canberra", "Canberra.", 1))
    changed = build(work / "demo.toml", tmp_path / "b", progress=False).manifest
    assert changed.release_id != base
    assert any(i.role == "source:chat" for i in changed.inputs)
    config = work / "models" / "smollm2" / "tokenizer_config.json"
    config.write_text(config.read_text().replace('"model_max_length": 8192', '"model_max_length": 8193'))
    third = build(work / "demo.toml", tmp_path / "c", progress=False).manifest.release_id
    assert third not in (base, changed.release_id)
    assert load_recipe(work / "demo.toml").recipe.name == "demo"


def test_streamed_sources_give_the_same_release(tmp_path, monkeypatch):
    """Sources read 7 records at a time build exactly what reading them whole builds."""
    import mmrecipe.builder
    from mmrecipe.recipe.plan import SourcePlan

    with monkeypatch.context() as m:
        m.setattr(SourcePlan, "streamable", property(lambda self: False))
        whole = build(DEMO, tmp_path / "whole", progress=False)
    with monkeypatch.context() as m:
        m.setattr(mmrecipe.builder, "BATCH_ROWS", 7)
        streamed = build(DEMO, tmp_path / "streamed", progress=False)
    assert streamed.manifest.release_id == whole.manifest.release_id
    for shard in whole.manifest.shards:
        assert (whole.path / shard.path).read_bytes() == (streamed.path / shard.path).read_bytes()
    assert (whole.path / "stats.json").read_bytes() == (streamed.path / "stats.json").read_bytes()


def test_field_missing_from_some_records_streams(tmp_path):
    """A field absent from a whole slice is fine when other slices have it; absent
    everywhere it is the usual error."""
    import mmrecipe.builder

    lines = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(10)]
    lines += [{"question": "q", "answer": "a", "hint": "h"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    recipe = tmp_path / "r.toml"
    recipe.write_text(small_recipe("""name = "qa"
path = "d.jsonl"
layout = "qa"
fields = { question = "question", answer = "answer", hint = "hint" }
instructions = ["{question} ({hint})"]"""))
    mmrecipe.builder.BATCH_ROWS, saved = 4, mmrecipe.builder.BATCH_ROWS
    try:
        assert build(recipe, tmp_path / "ok", progress=False).summary["sources"][0]["selected"] == 11
        recipe.write_text(recipe.read_text().replace('hint = "hint"', 'hint = "hnit"'))
        from mmrecipe import SourceError

        with pytest.raises(SourceError, match=r"source\[0\].fields.hint: the path 'hnit' resolves on no row"):
            build(recipe, tmp_path / "bad", progress=False)
    finally:
        mmrecipe.builder.BATCH_ROWS = saved
