"""Video: container metadata against PyAV, token grids against transformers'
Qwen2VLVideoProcessor run on each fixture's decoded frames, the rule against its
`sample_frames` and `smart_resize` over random clips, the <video> runs and masks in
releases, ids against the HF tokenizer (with the recipe's added tokens), bad clips, and
the shipped video recipe."""

from __future__ import annotations

import json
import math
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import RECIPES, ROOT, sources_moved
from hypothesis import given, settings
from hypothesis import strategies as st

from mmrecipe import DataError, RecipeError, _core, build, load_recipe
from mmrecipe.loader.video import load_video, video_rule

av = pytest.importorskip("av")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer, Qwen2VLVideoProcessor  # noqa: E402
from transformers.models.qwen2_vl.video_processing_qwen2_vl import smart_resize  # noqa: E402
from transformers.video_utils import VideoMetadata  # noqa: E402

VIDEO = ROOT / "tests" / "fixtures" / "data" / "video"
CLIPS = sorted(p for p in (VIDEO / "clips").glob("*.mp4") if p.name != "not-a-video.mp4")
MODEL = RECIPES / "models" / "smollm2"
ADDED = ["<|vision_start|>", "<|vision_end|>", "<|video_pad|>"]
QWEN2_VL = 'video = { rule = "qwen2-vl" }'


def recipe(folder: Path, source: str, model: str = QWEN2_VL, output: str = "seq_len = 4096") -> Path:
    added = ", ".join(f'"{t}"' for t in ADDED)
    text = (f'[recipe]\nname = "v"\n[model]\ntokenizer = "{MODEL}"\nadded_tokens = [{added}]\n{model}\n'
            f'[output]\n{output}\n[[source]]\n{source}\n')
    (folder / "r.toml").write_text(text)
    return folder / "r.toml"


def conversations(folder: Path, clips: list[list[str]], root: Path | None = VIDEO / "clips", text: str = "<video>\nWhat happens?") -> str:
    """A conversation source, one row per clip list (paths relative to `root`)."""
    with open(folder / "c.jsonl", "w") as f:
        for k, paths in enumerate(clips):
            user = text if len(paths) == 1 else " ".join(["<video>"] * len(paths)) + "\nCompare them."
            f.write(json.dumps({"videos": paths, "conversations": [
                {"from": "human", "value": user}, {"from": "gpt", "value": f"answer number {k}"}]}) + "\n")
    at = f'\nvideo_root = "{root}"' if root is not None else ""
    return f'name = "s"\npath = "{folder / "c.jsonl"}"\nlayout = "conversation"\nfields = {{ videos = "videos" }}{at}'


def release_rows(out: Path) -> list[dict]:
    rows = []
    for part in sorted((out / "data").glob("*.parquet")):
        rows += pq.read_table(part).to_pylist()
    return rows


def clips_of(out: Path) -> dict[str, tuple[int, list[int], int]]:
    """path -> (tokens, [t, h, w], frames sampled) of every clip in a release."""
    found = {}
    for row in release_rows(out):
        for i, p in enumerate(row["video_paths"]):
            grid = [row["video_grid_t"][i], row["video_grid_h"][i], row["video_grid_w"][i]]
            found[p] = (row["video_lengths"][i], grid, row["video_frames"][i])
    return found


def decoded(path: Path) -> tuple[np.ndarray, VideoMetadata]:
    """Every frame of the clip, decoded by PyAV and turned upright by its display matrix,
    and the metadata transformers' PyAV reader gives (frames, average rate)."""
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        frames, rotation = [], 0
        for frame in c.decode(video=0):
            rotation = frame.rotation
            frames.append(frame.to_ndarray(format="rgb24"))
        fps, stated = float(stream.average_rate), stream.frames
    video = np.stack(frames)
    total = stated or len(video)  # Matroska and WebM state no count: every frame decoded
    if rotation % 180:
        video = np.ascontiguousarray(np.rot90(video, k=rotation // 90, axes=(1, 2)))
    return video, VideoMetadata(total_num_frames=total, fps=fps, width=video.shape[2], height=video.shape[1])


def processor_grid(path: Path, **kwargs) -> list[int]:
    video, meta = decoded(path)
    proc = Qwen2VLVideoProcessor()
    out = proc(videos=[video], video_metadata=[meta], do_sample_frames=True, fps=2.0, return_tensors="pt",
               cap_pixels_per_frame=False, **kwargs)
    return out["video_grid_thw"][0].tolist()


# -- container metadata and token counts ---------------------------------------------


@pytest.mark.parametrize("path", CLIPS, ids=[p.name for p in CLIPS])
def test_metadata_matches_pyav(path):
    frames, (num, den), width, height, turned = _core.video_metadata(path)
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        rotation = next(c.decode(video=0)).rotation
        assert (frames, width, height) == (stream.frames, stream.width, stream.height)
        assert Fraction(num, den) == stream.average_rate
        assert frames == sum(1 for _ in c.decode(video=0)) + 1  # the first was decoded above
    assert turned == (rotation % 180 != 0)


def encode_clip(path: Path, fmt: str, codec: str, frames: int = 10, rate: int | Fraction = 12,
                options: dict[str, str] | None = None) -> Path:
    with av.open(str(path), "w", format=fmt, options=options or {}) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 20 % 256, np.uint8), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def test_mov_metadata_matches_pyav(tmp_path):
    path = encode_clip(tmp_path / "a.mov", "mov", "libx264", frames=17, rate=12)
    frames, (num, den), width, height, _ = _core.video_metadata(path)
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        assert (frames, Fraction(num, den), width, height) == (stream.frames, stream.average_rate, 64, 48) == (17, 12, 64, 48)


#: Matroska and WebM clips: (name, format, codec, frames, rate). Codecs the PyAV wheel
#: lacks are left out of the list.
MATROSKA = [(n, f, c, k, r) for n, f, c, k, r in [
    ("vp8.webm", "webm", "libvpx", 23, Fraction(24)),
    ("vp9.webm", "webm", "libvpx-vp9", 17, Fraction(25)),
    ("av1.webm", "webm", "libsvtav1", 9, Fraction(30)),
    ("h264-ntsc.mkv", "matroska", "libx264", 31, Fraction(30000, 1001)),
    ("mpeg4.mkv", "matroska", "mpeg4", 40, Fraction(12)),
] if c in av.codecs_available]


@pytest.fixture(scope="module")
def matroska_clips(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("matroska")
    for name, fmt, codec, frames, rate in MATROSKA:
        encode_clip(folder / name, fmt, codec, frames=frames, rate=rate)
    return folder


@pytest.mark.parametrize("name, frames, rate", [(m[0], m[3], m[4]) for m in MATROSKA], ids=[m[0] for m in MATROSKA])
def test_matroska_and_webm_metadata_give_the_frames_pyav_decodes(matroska_clips, name, frames, rate):
    """Matroska and WebM keep no frame count (PyAV says 0): the core counts the file's
    duration at the track's frame rate, and that is the number of frames PyAV decodes; the
    rate is PyAV's average rate (the loader samples from the same count: the next test)."""
    path = matroska_clips / name
    got, (num, den), width, height, turned = _core.video_metadata(path)
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        assert stream.frames == 0
        assert (Fraction(num, den), width, height, turned) == (stream.average_rate, stream.width, stream.height, False)
        assert Fraction(num, den) == rate
        assert got == sum(1 for _ in c.decode(video=0)) == frames


def test_matroska_grids_and_loaded_frames_match_the_processor(matroska_clips, tmp_path):
    """A release of the Matroska and WebM clips: each grid is what Qwen2VLVideoProcessor
    gives on the decoded frames, and the loader hands over exactly the frames at the
    processor's sampled indices."""
    out = tmp_path / "out"
    names = [m[0] for m in MATROSKA]
    build(recipe(tmp_path, conversations(tmp_path, [[n] for n in names], root=matroska_clips)), out, progress=False)
    found = clips_of(out)
    rule = video_rule({"video": {"rule": "qwen2-vl"}})
    assert len(names) >= 4
    for name in names:
        tokens, grid, sampled = found[name]
        assert grid == processor_grid(matroska_clips / name), name
        video, meta = decoded(matroska_clips / name)
        indices = Qwen2VLVideoProcessor().sample_frames(meta, fps=2.0)
        frames, info, at = load_video(str(matroska_clips / name), rule)
        assert at.tolist() == [int(i) for i in indices] and len(at) == sampled, name
        assert np.array_equal(frames, video[at]), name
        assert info.frames == len(video)


@pytest.mark.parametrize("flags", ["frag_keyframe+empty_moov", "frag_every_frame+empty_moov+default_base_moof",
                                   "frag_keyframe", "dash+frag_keyframe+empty_moov", "faststart"])
@pytest.mark.parametrize("codec, frames, rate", [("libx264", 37, Fraction(24)), ("mpeg4", 41, Fraction(30000, 1001))])
def test_fragmented_mp4_counts_the_frames_of_its_fragments(tmp_path, flags, codec, frames, rate):
    """A fragmented MP4 lists none of its frames in its track tables, or only its first
    fragment's (PyAV then says 0, or that fragment's count): the core counts the track's
    runs in the fragments too, the frames PyAV decodes, at the clip's rate. The loader
    samples from the same count and hands over the decoded frames at the processor's
    indices. (A faststart MP4, not fragmented, for comparison.)"""
    path = tmp_path / "f.mp4"
    with av.open(str(path), "w", format="mp4", options={"movflags": flags}) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"g": "8"}  # a keyframe, so a fragment, every 8 frames
        for i in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 6 % 256, np.uint8), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    got, (num, den), width, height, turned = _core.video_metadata(path)
    assert (Fraction(num, den), width, height, turned) == (rate, 64, 48, False)
    video, meta = decoded(path)
    assert got == len(video) == frames
    if flags == "frag_keyframe":
        with av.open(str(path)) as c:
            assert 0 < c.streams.video[0].frames < frames  # FFmpeg counts the first fragment only
    rule = video_rule({"video": {"rule": "qwen2-vl"}})
    loaded, info, at = load_video(str(path), rule)
    meta.total_num_frames = len(video)
    assert at.tolist() == [int(i) for i in Qwen2VLVideoProcessor().sample_frames(meta, fps=2.0)]
    assert np.array_equal(loaded, video[at]) and info.frames == frames


def test_other_files_are_refused_by_name(tmp_path):
    path = tmp_path / "a.avi"
    path.write_bytes(b"RIFF\0\0\0\0AVI LIST")
    with pytest.raises(ValueError, match=r"cannot read video .*a.avi: not an MP4, MOV, Matroska or WebM file"):
        _core.video_metadata(path)
    cut = tmp_path / "cut.webm"
    encode_clip(tmp_path / "whole.webm", "webm", "libvpx", frames=5)
    cut.write_bytes((tmp_path / "whole.webm").read_bytes()[:40])
    with pytest.raises(ValueError, match=r"cannot read video .*cut.webm: "):
        _core.video_metadata(cut)


def test_fixture_clips_cover_the_cases():
    metas = [_core.video_metadata(p) for p in CLIPS]
    assert len(CLIPS) == 5 and any(m[4] for m in metas)  # one turned clip
    assert Fraction(30000, 1001) in {Fraction(*m[1]) for m in metas}
    assert min(m[0] for m in metas) < 10 and max(m[0] for m in metas) > 90


def test_fixture_grids_match_the_processor_on_decoded_frames(tmp_path):
    out = tmp_path / "out"
    build(recipe(tmp_path, conversations(tmp_path, [[p.name] for p in CLIPS])), out, progress=False)
    found = clips_of(out)
    assert set(found) == {p.name for p in CLIPS}
    for path in CLIPS:
        tokens, grid, frames = found[path.name]
        assert grid == processor_grid(path), path.name
        assert tokens == math.prod(grid) // 4 > 0
        assert grid[0] == math.ceil(frames / 2)


def test_the_pixel_cap_matches_the_processor(tmp_path):
    """cap_pixels_per_frame with a small total budget: frames shrink as the processor's do."""
    model = 'video = { rule = "qwen2-vl", cap_pixels_per_frame = true, max_video_tokens = 60, min_pixels = 3136 }'
    out = tmp_path / "out"
    build(recipe(tmp_path, conversations(tmp_path, [[p.name] for p in CLIPS]), model), out, progress=False)
    found = clips_of(out)
    capped = 0
    for path in CLIPS:
        video, meta = decoded(path)
        proc = Qwen2VLVideoProcessor(min_pixels=3136, max_video_tokens=60)
        ref, free = (proc(videos=[video], video_metadata=[meta], do_sample_frames=True, fps=2.0, return_tensors="pt",
                          cap_pixels_per_frame=cap)["video_grid_thw"][0].tolist() for cap in (True, False))
        assert found[path.name][1] == ref, path.name
        capped += ref != free
    assert capped > 0  # the budget did bind somewhere


@settings(max_examples=60)
@given(total=st.integers(2, 20_000), rate=st.tuples(st.integers(1, 240_000), st.integers(1, 8_000)),
       width=st.integers(28, 4000), height=st.integers(28, 4000), fps=st.sampled_from([0.5, 1.0, 2.0, 3.0]),
       frames=st.tuples(st.integers(1, 16), st.integers(16, 800)))
def test_rule_matches_sample_frames_and_smart_resize(total, rate, width, height, fps, frames):
    """The core's rule against transformers' own sampling and resize, over random clips."""
    clip_fps = rate[0] / rate[1]
    min_frames, max_frames = frames
    if total / clip_fps * fps > 1e7 or max(width, height) / min(width, height) > 200:
        return
    proc = Qwen2VLVideoProcessor()
    meta = VideoMetadata(total_num_frames=total, fps=clip_fps)
    try:
        sampled = len(proc.sample_frames(meta, fps=fps, min_frames=min_frames, max_frames=max_frames))
    except (ValueError, ZeroDivisionError):
        sampled = None
    rule = json.dumps({"fps": fps, "min_frames": min_frames, "max_frames": max_frames, "max_tokens": 1 << 20})
    if sampled is None:
        with pytest.raises(ValueError, match="no frame can be sampled"):
            _core.video_token_count(rule, total, rate, width, height)
        return
    h, w = smart_resize(height, width, factor=28, min_pixels=128 * 28 * 28, max_pixels=768 * 28 * 28)
    t = math.ceil(sampled / 2)
    tokens, grid, got_frames = _core.video_token_count(rule, total, rate, width, height)
    assert (got_frames, list(grid)) == (sampled, [t, h // 14, w // 14])
    assert tokens == t * (h // 14) * (w // 14) // 4


def test_fixed_count(tmp_path):
    out = tmp_path / "out"
    build(recipe(tmp_path, conversations(tmp_path, [[p.name] for p in CLIPS]), "video = { count = 64 }"), out, progress=False)
    assert list(clips_of(out).values()) == [(64, [0, 0, 0], 0)] * len(CLIPS)


# -- the shipped recipe: runs, masks, ids ------------------------------------------------


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """recipes/video-instruct.toml built on the fixture (as tests/test_release_ids.py lays it out)."""
    folder = tmp_path_factory.mktemp("video")
    shutil.copytree(RECIPES, folder / "recipes")
    shutil.copytree(ROOT / "tests" / "fixtures", folder / "fixtures")
    body = sources_moved(folder / "recipes" / "video-instruct.toml", "../fixtures", 40)
    path = folder / "recipes" / "video-instruct-fixtures.toml"
    path.write_text('extends = "video-instruct.toml"\n' + body)
    result = build(path, folder / "out", progress=False, offline=True)
    return result, path


def test_video_runs_and_masks(shipped):
    result, _ = shipped
    rule = result.manifest.video
    token, start, end = rule["token_id"], rule["start_id"], rule["end_id"]
    runs = 0
    for row in release_rows(result.path):
        ids, mask = np.array(row["input_ids"]), np.array(row["loss_mask"])
        is_video = ids == token
        assert is_video.sum() == sum(row["video_lengths"])  # no video token outside a recorded run
        ends = np.cumsum(row["segment_lengths"])
        for pos, n in zip(row["video_positions"], row["video_lengths"]):
            assert n > 0 and is_video[pos : pos + n].all() and not mask[pos - 1 : pos + n + 1].any()
            assert ids[pos - 1] == start and ids[pos + n] == end  # the wrappers around the run
            seg = int(np.searchsorted(ends, pos, side="right"))
            assert pos + n < ends[seg]  # inside its segment: packing never cuts a run
            runs += 1
        assert mask.any()
    assert runs >= 40  # every sample has a clip; one conversation has two


def test_ids_equal_the_hf_tokenizer_with_the_runs_expanded(shipped):
    result, _ = shipped
    hf = AutoTokenizer.from_pretrained(MODEL)
    hf.add_special_tokens({"additional_special_tokens": ADDED})
    assert [hf.convert_tokens_to_ids(t) for t in ADDED] == [result.manifest.video[k] for k in ("start_id", "end_id", "token_id")]
    data = [json.loads(line) for line in (VIDEO / "conversations.jsonl").read_text().splitlines()]
    checked = set()
    for row in release_rows(result.path):
        at = 0
        for n, srow in zip(row["segment_lengths"], row["segment_row"]):
            lengths = [length for p, length in zip(row["video_positions"], row["video_lengths"]) if at <= p < at + n]
            turns = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in data[srow]["conversations"]]
            for length in lengths:
                turns[0]["content"] = turns[0]["content"].replace("<video>", "<|vision_start|>" + "<|video_pad|>" * length + "<|vision_end|>", 1)
            text = hf.apply_chat_template(turns, tokenize=False)
            assert row["input_ids"][at : at + n] == hf(text, add_special_tokens=False)["input_ids"], srow
            checked.add(srow)
            at += n
    assert checked == set(range(len(data)))


def test_manifest_records_the_rule_and_roots(shipped):
    result, _ = shipped
    m = result.manifest
    assert m.video["rule"] == "qwen2-vl" and m.video["token"] == "<|video_pad|>" and m.video["temporal_patch"] == 2
    assert m.video_roots == {"video-chat": m.video_roots["video-chat"]} and m.video_roots["video-chat"].endswith("fixtures/data/video")
    assert m.recipe["model"]["added_tokens"] == ADDED


def test_a_release_without_video_has_no_video_keys(demo_release):
    raw = json.loads((demo_release / "manifest.json").read_text())
    assert "video" not in raw and "video_roots" not in raw
    assert "video" not in raw["recipe"]["model"] and "added_tokens" not in raw["recipe"]["model"]
    assert all("video_root" not in s for s in raw["recipe"]["source"])
    names = pq.read_schema(next((demo_release / "data").glob("*.parquet"))).names
    assert not [n for n in names if n.startswith("video")]


def test_verify_and_stats_read_a_video_release(shipped):
    from mmrecipe.release.stats import release_stats
    from mmrecipe.release.verify import verify

    result, _ = shipped
    verify(result.path)
    assert release_stats(result.path)


# -- overlong samples: runs kept whole ---------------------------------------------------


def test_truncation_never_cuts_a_run(tmp_path):
    names = [CLIPS[0].name, CLIPS[1].name]
    source = conversations(tmp_path, [names] * 6)
    rows = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    for k, row in enumerate(rows):  # longer and longer prompts after the clips
        row["conversations"][0]["value"] += " more words" * (40 * k)
        row["conversations"][1]["value"] = "an answer " * 30
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    result = build(recipe(tmp_path, source, output='seq_len = 900\noverlong = "truncate"'), out, progress=False)
    full = {n: clips_of(out)[n][0] for n in names}
    token = result.manifest.video["token_id"]
    seen = 0
    for row in release_rows(out):
        ids = np.array(row["input_ids"])
        assert (ids == token).sum() == sum(row["video_lengths"])
        for p, n in zip(row["video_paths"], row["video_lengths"]):
            assert n == full[p]
            seen += 1
    assert result.summary["sources"][0]["truncated"] > 0 and seen > 0


# -- bad input ---------------------------------------------------------------------------


@pytest.fixture
def bad_clips(tmp_path):
    shutil.copy(CLIPS[0], tmp_path / "ok.mp4")
    shutil.copy(VIDEO / "clips" / "not-a-video.mp4", tmp_path / "text.mp4")
    data = CLIPS[0].read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: data.index(b"moov") + 40])  # the track boxes cut short
    (tmp_path / "junk.mp4").write_bytes(b"\0\0\0\x10ftypisom\0\0\0\0\0\0\0\x08moov")
    return tmp_path


@pytest.mark.parametrize("name, message", [
    ("text.mp4", r"cannot read video .*text.mp4: not an MP4 or MOV file"),
    ("cut.mp4", r"cannot read video .*cut.mp4"),
    ("junk.mp4", r"cannot read video .*junk.mp4"),
    ("missing.mp4", r"cannot read video .*missing.mp4"),
])
def test_bad_clips_name_file_and_row(bad_clips, name, message):
    source = conversations(bad_clips, [["ok.mp4"], [name]], root=None)
    with pytest.raises(DataError, match=message) as e:
        build(recipe(bad_clips, source), bad_clips / "out", progress=False)
    assert (e.value.source, e.value.row, e.value.field) == ("s", 1, "video")


def test_a_clip_over_budget_names_file_and_row(tmp_path):
    source = conversations(tmp_path, [["gradient-64x48.mp4"], ["film-160x90.mp4"]])
    with pytest.raises(DataError, match=r"film-160x90.mp4: the clip .* gives 576 tokens .*more than max_tokens = 500") as e:
        build(recipe(tmp_path, source, 'video = { rule = "qwen2-vl", max_tokens = 500 }'), tmp_path / "out", progress=False)
    assert (e.value.source, e.value.row, e.value.field) == ("s", 1, "video")


def test_bad_clips_are_counted_skips(bad_clips):
    source = conversations(bad_clips, [["ok.mp4"], ["text.mp4"], ["cut.mp4"], ["junk.mp4"], ["missing.mp4"], ["ok.mp4"]], root=None)
    result = build(recipe(bad_clips, source + '\non_error = "skip"'), bad_clips / "out", progress=False)
    stats = result.summary["sources"][0]
    assert (stats["rows"], stats["skipped"], stats["usable"]) == (6, 4, 2)
    assert [e.split(",")[0] for e in stats["skipped_examples"]] == ["row 1", "row 2", "row 3", "row 4"]


@pytest.mark.parametrize("clips, text, message", [
    (1, "<video> and <video>", r"the text has more '<video>' placeholders than the sample has video clips \(1\)"),
    (2, "<video> alone", r"the sample has 2 video clips but its text has 1 '<video>' placeholders"),
])
def test_placeholder_and_clip_counts_must_agree(tmp_path, clips, text, message):
    source = conversations(tmp_path, [[CLIPS[0].name], [CLIPS[0].name] * clips])
    rows = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    rows[1]["conversations"][0]["value"] = text
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=message) as e:
        build(recipe(tmp_path, source), tmp_path / "out", progress=False)
    assert (e.value.source, e.value.row) == ("s", 1)


def test_path_escaping_the_video_root(tmp_path):
    with pytest.raises(Exception, match="escapes the source's video_root"):
        build(recipe(tmp_path, conversations(tmp_path, [["../x.mp4"]])), tmp_path / "out", progress=False)


@pytest.mark.parametrize("model, message", [
    ("", r"source\[0\]: source 's' has video, but \[model\] sets no video rule"),
    ("video = { count = 0 }", r"model.video.count: 0 is not between 1 and max_tokens"),
    ("video = { fps = 0.0 }", r"model.video.fps: must be > 0 and at most 1,000, got 0"),
    ("video = { temporal_patch = 0 }", r"model.video.temporal_patch: must be at least 1 and at most 64, got 0"),
    ("video = { min_frames = 10, max_frames = 4 }", r"model.video.min_frames: 10 is not between 0 and max_frames = 4"),
    ("video = { rule = \"llava\" }", r"model.video.rule: 'llava' is not one of: qwen2-vl"),
    ('video = { placeholder = "<image>" }\nimage = { count = 4 }', r"model.video.placeholder: '<image>' is also the image placeholder"),
])
def test_recipe_problems_name_the_key(tmp_path, model, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(recipe(tmp_path, conversations(tmp_path, [["a.mp4"]]), model))


def test_added_tokens_are_checked(tmp_path):
    path = recipe(tmp_path, conversations(tmp_path, [["a.mp4"]]))
    path.write_text(path.read_text().replace('added_tokens = ["<|vision_start|>"', 'added_tokens = ["<|video_pad|>"'))
    with pytest.raises(RecipeError, match=r"model.added_tokens\[2\]: '<\|video_pad\|>' is listed twice"):
        load_recipe(path)


def test_exports_refuse_video_rather_than_lose_it(shipped, tmp_path):
    from mmrecipe import ReleaseError
    from mmrecipe.export import export

    result, _ = shipped
    with pytest.raises(ReleaseError, match="the release has video"):
        export(result.path, "hf", tmp_path / "hf")


def test_fixture_matches_its_script():
    """The clips are what make.py says it writes (their bytes follow the encoder's version;
    their metadata must not)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_video", VIDEO / "make.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert len(module.CLIPS) == len(CLIPS)
    for name, _codec, width, height, rate, frames in module.CLIPS:
        got, (num, den), w, h, turned = _core.video_metadata(VIDEO / name)
        assert (got, Fraction(num, den), w, h, turned) == (frames, rate, width, height, name == module.ROTATED)
