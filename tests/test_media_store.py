"""Audio and video sources through the token store: a rebuild loads every source from it
and gives the same bytes as a build without a store; a changed clip (another duration)
makes its source's entry a miss, so the rebuild reads the new clip; a multi-epoch audio
build tokenizes a source without templates once."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_release_ids import PINNED, lay_out

from mmrecipe import build

MEDIA = {"asr-alignment": "audio", "video-instruct": "video"}


def files(release: Path) -> dict[str, bytes]:
    return {str(p.relative_to(release)): p.read_bytes() for p in sorted(release.rglob("*")) if p.is_file()}


def clips(release: Path, medium: str) -> list[tuple[str, int]]:
    """(path, run length) of every clip in the release, in row order."""
    out = []
    for shard in sorted((release / "data").glob("*.parquet")):
        t = pq.read_table(shard, columns=[f"{medium}_paths", f"{medium}_lengths"])
        cols = [t.column(k).combine_chunks() for k in range(2)]
        cols = [c.flatten() if pa.types.is_list(c.type) or pa.types.is_large_list(c.type) else c for c in cols]
        out += list(zip(cols[0].to_pylist(), cols[1].to_pylist()))
    return out


def sources(result) -> list[str]:
    return [s["name"] for s in result.summary["sources"]]


@pytest.mark.parametrize("name", sorted(MEDIA))
def test_a_rebuild_loads_every_source_from_the_store(name, tmp_path):
    recipe = lay_out(tmp_path / "work") / f"{name}-fixtures.toml"
    cache = tmp_path / "cache"
    first = build(recipe, tmp_path / "a", progress=False, offline=True, cache=cache)
    second = build(recipe, tmp_path / "b", progress=False, offline=True, cache=cache)
    plain = build(recipe, tmp_path / "c", progress=False, offline=True, cache=False)
    names = sources(first)
    assert first.store["tokenized"] == names and first.store["reused"] == [] and first.store["saved_bytes"] > 0
    assert second.store["reused"] == names and second.store["tokenized"] == [] and second.store["misses"] == {}
    assert clips(tmp_path / "a", MEDIA[name]), "the release has clips"
    assert files(tmp_path / "a") == files(tmp_path / "b") == files(tmp_path / "c")
    assert first.manifest.release_id == second.manifest.release_id == plain.manifest.release_id == PINNED[name]


@pytest.mark.parametrize("name, users, clip, other", [
    ("asr-alignment", ["librispeech", "audio-chat"], "asr/clips/ls-0001.wav", "asr/clips/ls-0003.wav"),
    ("video-instruct", ["video-chat"], "video/clips/gradient-64x48.mp4", "video/clips/film-160x90.mp4"),
])
def test_a_changed_clip_is_tokenized_again(name, users, clip, other, tmp_path):
    """The sources using the clip (`users`) are tokenized again, the others loaded. The
    fixtures are copied by lay_out: the clip replaced is the copy's."""
    recipes = lay_out(tmp_path / "work")
    recipe, medium, cache = recipes / f"{name}-fixtures.toml", MEDIA[name], tmp_path / "cache"
    first = build(recipe, tmp_path / "a", progress=False, offline=True, cache=cache)
    before = dict(clips(tmp_path / "a", medium))
    stem = Path(clip).name
    (old,) = [n for p, n in before.items() if p.endswith(stem)]
    (want,) = [n for p, n in before.items() if p.endswith(Path(other).name)]
    assert old != want, "the two clips have runs of different lengths"
    shutil.copyfile(recipes.parent / "fixtures" / "data" / other, recipes.parent / "fixtures" / "data" / clip)
    again = build(recipe, tmp_path / "b", progress=False, offline=True, cache=cache)
    assert again.store["tokenized"] == users
    for source in users:
        assert f"{'an audio' if medium == 'audio' else 'a video'} file changed" in again.store["misses"][source]
    assert sorted(again.store["reused"]) == sorted(set(sources(first)) - set(users))
    after = dict(clips(tmp_path / "b", medium))
    assert [n for p, n in after.items() if p.endswith(stem)] == [want]
    assert again.manifest.release_id != first.manifest.release_id
    # The same bytes as a build without a store from the new clip.
    build(recipe, tmp_path / "c", progress=False, offline=True, cache=False)
    assert files(tmp_path / "b") == files(tmp_path / "c")


def test_a_multi_epoch_audio_build_tokenizes_a_source_without_templates_once(tmp_path):
    recipes = lay_out(tmp_path / "work")
    recipe = recipes / "asr-epochs.toml"
    recipe.write_text('extends = "asr-alignment-fixtures.toml"\n[output]\nepochs = 2\n')
    # The asr sources draw instruction templates anew each epoch; audio-chat draws none.
    private = build(recipe, tmp_path / "a", progress=False, offline=True, cache=False)
    assert private.store["tokenized"] == ["librispeech", "common-voice", "audio-chat", "librispeech (epoch 1)",
                                          "common-voice (epoch 1)"]
    assert private.store["reused"] == ["audio-chat (epoch 1)"]
    assert private.store["folder"] is None
    stored = build(recipe, tmp_path / "b", progress=False, offline=True, cache=tmp_path / "cache")
    assert stored.store["tokenized"] == private.store["tokenized"]
    assert files(tmp_path / "a") == files(tmp_path / "b")
    assert len(private.epochs) == 2
    assert clips(tmp_path / "a" / "epoch-00001", "audio") and clips(tmp_path / "a", "audio")
