"""Video in the loader: mRoPE positions of rows with image and video runs against the
model's own `get_rope_index` (a tiny random Qwen2-VL, and Qwen2.5-VL's spaced frames),
clips decoded with PyAV and sampled as transformers' Qwen2VLVideoProcessor samples them,
pixels and grids through the processor hook in the workers, checked against the release's
grids, unreadable clips, and a packed forward that equals its segments run alone."""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
av = pytest.importorskip("av")
pytest.importorskip("torchvision")  # transformers' video processors resize with it

from mmrecipe import DataError, RecipeError  # noqa: E402
from mmrecipe.loader.rope import mrope_positions, vision_runs  # noqa: E402
from mmrecipe.release.format import COLUMNS, FORMAT  # noqa: E402
from mmrecipe.torch import IGNORE_INDEX, PackedDataset, dataloader  # noqa: E402

IMAGE, VIDEO = 1, 2  # mm_token_type_ids


def load_example():
    spec = importlib.util.spec_from_file_location("train_vlm", ROOT / "examples" / "train_vlm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("train_vlm", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def qwen2_vl():
    torch.manual_seed(0)
    return load_example().tiny_qwen2_vl(64, 7, hidden=32).double().eval()


@pytest.fixture(scope="module")
def qwen2_5_vl():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel

    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]})
    vision = dict(depth=1, hidden_size=32, out_hidden_size=32, num_heads=2, intermediate_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=25, fullatt_block_indexes=[0])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=7, video_token_id=8,
                              vision_start_token_id=60, vision_end_token_id=61)
    return Qwen2_5_VLModel(config).eval()


# A segment: pieces of (text before the run, image or video, merged t, h, w), then trailing
# text. Two runs of one kind are separated by text (get_rope_index reads adjacent runs of
# one kind as one); an image next to a video needs none.
run = st.tuples(st.integers(0, 5), st.sampled_from([IMAGE, VIDEO]), st.integers(1, 5), st.integers(1, 4), st.integers(1, 4))
segment = st.tuples(st.lists(run, max_size=4), st.integers(0, 4))
# Rows hold at least one video and one image (in the first segment), so every example checks both.
with_both = st.tuples(st.lists(run, max_size=3).map(lambda r: [(1, VIDEO, 2, 2, 3), (0, IMAGE, 1, 3, 2)] + r), st.integers(0, 4))
rows = st.tuples(with_both, st.lists(segment, max_size=3)).map(lambda x: [x[0], *x[1]])


def packed_row(segments, merge=2, spacing=None):
    """Token types, segment lengths, runs (kind, start, grid before merging, interval) of
    a packed row, and each segment's own (types, image grids, video grids, intervals)."""
    types, lengths, runs, alone = [], [], [], []
    for s, (pieces, tail) in enumerate(segments):
        seg, imgs, vids, gaps = [], [], [], []
        last = None
        for k, (text, kind, t, h, w) in enumerate(pieces):
            seg += [0] * (max(text, 1) if kind == last else text)
            t = 1 if kind == IMAGE else t
            grid = (t, h * merge, w * merge)
            gap = 1.0 if spacing is None or kind == IMAGE else spacing[(s + k) % len(spacing)]
            runs.append((kind, len(types) + len(seg), grid, gap))
            (imgs if kind == IMAGE else vids).append(grid)
            if kind == VIDEO:
                gaps.append(gap)
            seg += [kind] * (t * h * w)
            last = kind
        seg += [0] * (tail if pieces else max(tail, 1))
        alone.append((seg, imgs, vids, gaps))
        types += seg
        lengths.append(len(seg))
    return np.array(types), np.array(lengths), runs, alone


def ours(lengths, runs, merge=2, intervals=False):
    img = [(s, g) for kind, s, g, _ in runs if kind == IMAGE]
    vid = [(s, g, i) for kind, s, g, i in runs if kind == VIDEO]
    starts, grids, gaps = vision_runs(np.array([s for s, _ in img], np.int64), np.array([g for _, g in img]).reshape(-1, 3),
                                      np.array([s for s, _, _ in vid], np.int64), np.array([g for _, g, _ in vid]).reshape(-1, 3),
                                      np.array([i for *_, i in vid], np.float32) if intervals else None)
    return mrope_positions(lengths, starts, grids, merge, gaps)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows)
def test_mrope_of_rows_with_images_and_videos_equals_qwen2_vl_get_rope_index(qwen2_vl, segments):
    types, lengths, runs, alone = packed_row(segments)
    got = ours(lengths, runs)
    assert got.shape == (4, int(lengths.sum()))
    at = 0
    for (seg, imgs, vids, _), n in zip(alone, lengths):
        t = torch.tensor([seg])
        if imgs or vids:
            expected = qwen2_vl.model.get_rope_index(
                torch.ones_like(t), t, image_grid_thw=torch.tensor(imgs).reshape(-1, 3) if imgs else None,
                video_grid_thw=torch.tensor(vids).reshape(-1, 3) if vids else None)[0][:, 0].numpy()
        else:
            expected = np.broadcast_to(np.arange(n), (3, n))
        assert np.array_equal(got[1:, at : at + n], expected)
        assert np.array_equal(got[0, at : at + n], np.arange(n))
        at += n


def test_a_video_moves_text_on_by_its_spatial_extent_only(qwen2_vl):
    """Six temporal patches of 1 x 2 merged patches: the frames take temporal positions
    3..8, and the text after the video continues at 3 + max(1, 2) = 5, as the model says."""
    types, lengths, runs, _ = packed_row([([(3, VIDEO, 6, 1, 2)], 2)])
    got = ours(lengths, runs)
    assert got[1, 3:15].tolist() == [3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8]
    assert got[1:, 15].tolist() == [5, 5, 5]
    expected = qwen2_vl.model.get_rope_index(torch.ones(1, 17, dtype=torch.long), torch.from_numpy(types)[None],
                                             video_grid_thw=torch.tensor([[6, 2, 4]]))[0][:, 0]
    assert np.array_equal(got[1:], expected.numpy())


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=25)
@given(rows, st.lists(st.sampled_from([0.5, 1.0, 2.0, 1 / 3, 0.04, 0.07]), min_size=1, max_size=3))
def test_spaced_frames_equal_qwen2_5_vl_get_rope_index(qwen2_5_vl, segments, seconds):
    """Qwen2.5-VL: a video's temporal positions step by tokens_per_second (25) times its
    seconds per temporal patch (float32, as the model multiplies them); images and text as
    Qwen2-VL."""
    tps = qwen2_5_vl.config.vision_config.tokens_per_second
    spacing = [np.float32(s) for s in seconds]  # seconds per temporal patch of each video
    types, lengths, runs, alone = packed_row(segments, spacing=spacing)
    runs = [(kind, s, g, np.float32(tps) * i if kind == VIDEO else i) for kind, s, g, i in runs]
    got = ours(lengths, runs, intervals=True)
    at = 0
    for (seg, imgs, vids, gaps), n in zip(alone, lengths):
        t = torch.tensor([seg])
        if imgs or vids:
            per = torch.tensor(gaps, dtype=torch.float32) if vids else None
            expected = qwen2_5_vl.get_rope_index(
                torch.ones_like(t), t, image_grid_thw=torch.tensor(imgs).reshape(-1, 3) if imgs else None,
                video_grid_thw=torch.tensor(vids).reshape(-1, 3) if vids else None, second_per_grid_ts=per)[0][:, 0].numpy()
            assert np.array_equal(got[1:, at : at + n], expected)
        at += n


# -- releases with videos ---------------------------------------------------------------

VOCAB, IMAGE_ID = 64, 7
VIDEO_ID = VOCAB - 2  # tiny_qwen2_vl's video token
RULE = dict(rule="qwen2-vl", fps=2.0, min_frames=2, max_frames=8, min_pixels=3136, max_pixels=12544, patch=14, merge=2,
            temporal_patch=2, token="<|video_pad|>", token_id=VIDEO_ID)
IMAGE_RULE = dict(token="<image>", patch=14, merge=2, min_pixels=3136, max_pixels=12544)
# (frames, fps, width, height) of the clips the releases hold: 2, 4 or 8 frames sampled,
# frames of 56 x 56 to 84 x 140 pixels after resizing.
CLIPS = [(4, 4, 64, 48), (12, 6, 96, 64), (10, 2, 48, 96), (20, 10, 128, 80), (7, 3, 56, 56)]
VIDEO_COLUMNS = [("video_positions", pa.uint32()), ("video_lengths", pa.uint32()), ("video_paths", pa.string()),
                 ("video_grid_t", pa.uint32()), ("video_grid_h", pa.uint32()), ("video_grid_w", pa.uint32()),
                 ("video_frames", pa.uint32())]


def write_clip(path: Path, frames: int, fps: int, width: int, height: int, seed: int) -> None:
    """An MPEG-4 clip of random frames (each frame differs, so frame order shows)."""
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(frames):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def reference_video_processor(**settings):
    """transformers' own pipeline from the file: it decodes the clip with PyAV and samples
    its frames at the rule's fps itself."""
    from transformers import Qwen2VLVideoProcessor

    rule = {**RULE, **settings}
    return Qwen2VLVideoProcessor(patch_size=rule["patch"], merge_size=rule["merge"], temporal_patch_size=rule["temporal_patch"],
                                 min_pixels=rule["min_pixels"], max_pixels=rule["max_pixels"],
                                 cap_pixels_per_frame=rule.get("cap_pixels_per_frame", False),
                                 max_video_tokens=rule.get("max_video_tokens", 128_000),
                                 do_sample_frames=False)


def reference_inputs(paths: list[Path], **settings) -> dict:
    """transformers' own pipeline from the files: its PyAV reader decodes each clip at the
    frames its processor's sample_frames picks (the rule's fps), then the processor."""
    from transformers.video_utils import load_video

    processor = reference_video_processor(**settings)
    rule = {**RULE, **settings}
    sample = functools.partial(processor.sample_frames, fps=rule["fps"], min_frames=rule["min_frames"],
                               max_frames=rule["max_frames"], temporal_patch_size=rule["temporal_patch"])
    loaded = [load_video(str(p), backend="pyav", sample_indices_fn=lambda metadata, **_: sample(metadata)) for p in paths]
    out = processor(videos=[v for v, _ in loaded], video_metadata=[m for _, m in loaded], do_sample_frames=False,
                    return_tensors="pt")
    return {**out, "frames": [len(m.frames_indices) for _, m in loaded]}


def reference_clip(path: Path, **settings) -> tuple[tuple[int, int, int], int]:
    """The grid and the sampled frame count transformers gives the clip at `path`."""
    out = reference_inputs([path], **settings)
    return tuple(int(x) for x in out["video_grid_thw"][0]), out["frames"][0]


def reference_image(path: Path) -> tuple[int, int, int]:
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    p = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, min_pixels=IMAGE_RULE["min_pixels"], max_pixels=IMAGE_RULE["max_pixels"])
    return tuple(int(x) for x in p(images=[Image.open(path).convert("RGB")], return_tensors="pt")["image_grid_thw"][0])


def media(folder: Path) -> dict[str, tuple]:
    """Clips and images in `folder`: name -> (kind, grid, frames)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    found = {}
    for k, (frames, fps, w, h) in enumerate(CLIPS):
        write_clip(folder / f"c{k}.mp4", frames, fps, w, h, seed=k)
        found[f"c{k}.mp4"] = (VIDEO, *reference_clip(folder / f"c{k}.mp4"))
    rng = np.random.default_rng(0)
    for k, (w, h) in enumerate([(60, 40), (90, 120), (56, 56)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"i{k}.png")
        found[f"i{k}.png"] = (IMAGE, reference_image(folder / f"i{k}.png"), 1)
    return found


def tokens(grid, merge=2) -> int:
    return grid[0] * grid[1] * grid[2] // merge**2


def write_release(out: Path, rows: list[list[list]], found: dict[str, tuple], root: Path, *, images: bool = True,
                  rule: dict | None = None) -> Path:
    """A release of packed rows: each row a list of segments, each segment a list of
    pieces, an int (that many text tokens, the response the second half) or a media name
    (its run). Columns and manifest as a video build writes them."""
    rng = np.random.default_rng(1)
    cols: dict[str, list] = {c.name: [] for c in COLUMNS}
    cols.update({name: [] for name, _ in VIDEO_COLUMNS})
    for r, row in enumerate(rows):
        ids, mask, seg_lengths, per_seg_images = [], [], [], []
        img, vid = {k: [] for k in ("positions", "lengths", "paths", "t", "h", "w")}, {k: [] for k in
                   ("positions", "lengths", "paths", "t", "h", "w", "frames")}
        for segment in row:
            start, n_images = len(ids), 0
            for piece in segment:
                if isinstance(piece, int):
                    ids += rng.integers(10, 50, piece).tolist()
                    mask += [0] * (piece // 2) + [1] * (piece - piece // 2)
                    continue
                kind, grid, frames = found[piece]
                at = img if kind == IMAGE else vid
                at["positions"].append(len(ids))
                at["lengths"].append(tokens(grid))
                at["paths"].append(piece)
                for axis, g in zip("thw", grid):
                    at[axis].append(g)
                if kind == VIDEO:
                    at["frames"].append(frames)
                else:
                    n_images += 1
                ids += [IMAGE_ID if kind == IMAGE else VIDEO_ID] * tokens(grid)
                mask += [0] * tokens(grid)
            seg_lengths.append(len(ids) - start)
            per_seg_images.append(n_images)
        n = len(seg_lengths)
        for name, values in [("input_ids", ids), ("loss_mask", mask), ("segment_lengths", seg_lengths),
                             ("segment_source", [0] * n), ("segment_row", list(range(10 * r, 10 * r + n))),
                             ("segment_part", [0] * n), ("segment_template", [-1] * n), ("segment_repeat", [0] * n),
                             ("segment_images", per_seg_images), ("image_positions", img["positions"]),
                             ("image_lengths", img["lengths"]), ("image_paths", img["paths"]), ("image_grid_t", img["t"]),
                             ("image_grid_h", img["h"]), ("image_grid_w", img["w"])]:
            cols[name].append(values)
        for name, _ in VIDEO_COLUMNS:
            cols[name].append(vid[name.removeprefix("video_").replace("grid_", "")])
    types = {c.name: c.type for c in COLUMNS} | dict(VIDEO_COLUMNS)
    table = pa.table({name: pa.array(v, type=pa.list_(types[name])) for name, v in cols.items()})
    (out / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out / "data" / "part-00000.parquet")
    rule = rule or RULE
    recipe = {"model": {"video": rule, **({"image": IMAGE_RULE} if images else {})},
              "source": [{"name": "clips", "path": str(root / "clips.jsonl")}]}
    manifest = {"format": FORMAT, "mmrecipe_version": "0.1.0", "name": "videos", "version": "1", "seed": 0, "recipe": recipe,
                "inputs": [], "sources": ["clips"], "chat_template": "", "seq_len": 4096, "pad_token_id": 0,
                "shards": [{"path": "data/part-00000.parquet", "sha256": "", "sequences": len(rows),
                            "tokens": sum(len(x) for x in cols["input_ids"])}],
                "totals": {}, "video": rule, "video_roots": {"clips": str(root)}}
    if images:
        manifest.update(image_roots={"clips": str(root)}, image={**IMAGE_RULE, "token_id": IMAGE_ID})
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


ROWS = [
    [[6, "c0.mp4", 9], [4, "i0.png", 3, "c1.mp4", 8], [5, 7]],
    [["c3.mp4", 6, "c2.mp4", 5], [3, "i1.png", "c4.mp4", 6]],
    [[7, "i2.png", 4, "c1.mp4", 5, "i0.png", 6]],
]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    return folder, media(folder)


@pytest.fixture(scope="module")
def release(clips, tmp_path_factory):
    folder, found = clips
    return write_release(tmp_path_factory.mktemp("release") / "r", ROWS, found, folder)


def test_the_generated_clips_sample_several_frames_and_grids(clips):
    _, found = clips
    grids = [g for kind, g, _ in found.values() if kind == VIDEO]
    assert len(grids) == len(CLIPS) and all(t >= 1 and h >= 4 and w >= 4 for t, h, w in grids)
    assert {t for t, _, _ in grids} == {1, 2, 4}  # 2, 4 and 8 frames sampled


@given(st.integers(1, 400), st.sampled_from([1, 2, 3, 4.5, 10, 23.976, 25, 29.97, 30, 60]),
       st.sampled_from([0.5, 1.0, 2.0, 3.0]), st.integers(1, 8), st.integers(2, 64), st.sampled_from([1, 2]))
def test_sampled_frames_equal_qwen2vl_video_processor_sample_frames(frames, fps, rate, low, high, tp):
    from transformers import Qwen2VLVideoProcessor
    from transformers.video_utils import VideoMetadata

    from mmrecipe.loader.video import ClipInfo, VideoRule, sampled_indices

    rule = VideoRule(VIDEO_ID, None, rate, low, max(low, high), 3136, 12544, 14, 2, tp)
    info = ClipInfo(frames, float(fps), 56, 56)
    p = Qwen2VLVideoProcessor()
    try:
        expected = p.sample_frames(VideoMetadata(total_num_frames=frames, fps=float(fps)), temporal_patch_size=tp,
                                   min_frames=low, max_frames=max(low, high), fps=rate).numpy()
    except (ValueError, ZeroDivisionError):
        expected = None
    if expected is None or len(expected) == 0:
        with pytest.raises((ValueError, ZeroDivisionError)):
            sampled_indices(info, rule)
        return
    got = sampled_indices(info, rule)
    # Not always a multiple of tp: the processor's float arange can give one index more
    # (185 frames, 22 wanted: 23), and the rule follows it.
    assert len(got) > 0
    assert np.array_equal(got, expected)


def video_paths(batch, folder: Path) -> list[Path]:
    rows = [batch.videos] if batch["input_ids"].shape[0] == 1 and batch.videos and isinstance(batch.videos[0], dict) else batch.videos
    return [folder / Path(rec["path"]).name for row in rows for rec in row]


def test_loader_video_inputs_equal_transformers_own_pipeline(release, clips):
    folder, found = clips
    loader = dataloader(release, batch_size=3, video_processor="qwen2-vl", image_processor="qwen2-vl")
    batch = next(iter(loader))
    paths = video_paths(batch, folder)
    assert [p.name for p in paths] == ["c0.mp4", "c1.mp4", "c3.mp4", "c2.mp4", "c4.mp4", "c1.mp4"]
    expected = reference_inputs(paths)
    assert batch["pixel_values_videos"].shape[0] > 0
    assert torch.equal(batch["pixel_values_videos"], expected["pixel_values_videos"])
    assert torch.equal(batch["video_grid_thw"], expected["video_grid_thw"])
    assert [rec["frames"] for row in batch.videos for rec in row] == expected["frames"]
    ids, types = batch["input_ids"], batch["mm_token_type_ids"]
    assert torch.equal(types == 2, ids == VIDEO_ID) and torch.equal(types == 1, ids == IMAGE_ID) and (types == 2).any()
    assert batch["position_ids"].shape == (4,) + ids.shape


def test_video_positions_equal_the_models_get_rope_index_per_segment(release, qwen2_vl):
    batch = dataloader(release, batch_size=3, video_processor="qwen2-vl", image_processor="qwen2-vl").collate_fn(
        [PackedDataset(release)[i] for i in range(3)])
    pos, igrid, vgrid = batch["position_ids"], batch["image_grid_thw"], batch["video_grid_thw"]
    img_at = vid_at = checked = 0
    for r, (images, videos) in enumerate(zip(batch.images, batch.videos)):
        seg = batch.segment_ids[r]
        for s in [int(x) for x in seg.unique() if x > 0]:
            where = seg == s
            ids, types = batch["input_ids"][r][where][None], batch["mm_token_type_ids"][r][where][None]
            mine_i = [k for k, rec in enumerate(images) if seg[rec["position"]] == s]
            mine_v = [k for k, rec in enumerate(videos) if seg[rec["position"]] == s]
            if mine_i or mine_v:
                expected, _ = qwen2_vl.model.get_rope_index(
                    ids, types, image_grid_thw=igrid[img_at + mine_i[0] : img_at + mine_i[-1] + 1] if mine_i else None,
                    video_grid_thw=vgrid[vid_at + mine_v[0] : vid_at + mine_v[-1] + 1] if mine_v else None)
                assert torch.equal(pos[1:, r][:, where], expected[:, 0])
                checked += bool(mine_v)
            else:
                assert torch.equal(pos[1:, r][:, where], torch.arange(int(where.sum())).expand(3, -1))
            assert torch.equal(pos[0, r][where], torch.arange(int(where.sum())))
        img_at, vid_at = img_at + len(images), vid_at + len(videos)
    assert checked == 5  # every segment with a video


def test_positions_without_a_video_processor_come_from_the_release(release):
    rows = [PackedDataset(release)[i] for i in range(3)]
    with_frames = dataloader(release, video_processor="qwen2-vl", image_processor="qwen2-vl").collate_fn(rows)
    without = dataloader(release).collate_fn(rows)
    assert "pixel_values_videos" not in without and "pixel_values" not in without
    assert torch.equal(without["position_ids"], with_frames["position_ids"])
    assert torch.equal(without["mm_token_type_ids"], with_frames["mm_token_type_ids"])


def test_worker_batches_equal_in_process_ones(release):
    kwargs = dict(batch_size=1, video_processor="qwen2-vl", image_processor="qwen2-vl")
    here = list(dataloader(release, **kwargs))
    there = list(dataloader(release, num_workers=2, **kwargs))
    assert len(here) == len(there) == 3
    for a, b in zip(here, there):
        assert a.rows == b.rows and a.videos == b.videos and set(a) == set(b)
        for key in a:
            assert torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key]


def test_a_processor_with_other_settings_is_a_recipe_error_naming_the_clip(release):
    with pytest.raises(RecipeError, match=r"release row 0: the video processor gives .*c0\.mp4 the grid 1x\d+x\d+ .*"
                                          r"the release recorded 1x4x4 \(4 tokens\).*min_pixels = 3136") as err:
        dataloader(release, video_processor=reference_video_processor(min_pixels=4 * 12544))
    assert err.value.key == "model.video"


def test_a_clip_sampled_otherwise_than_the_release_counted_is_a_data_error(clips, tmp_path):
    folder, found = clips
    changed = {**found, "c0.mp4": (VIDEO, found["c0.mp4"][1], 4)}
    out = write_release(tmp_path / "r", ROWS, changed, folder)
    with pytest.raises(DataError, match=r"release row 0: .*c0\.mp4 samples 2 frames \(4 frames at 4 fps\), the release counted 4"):
        dataloader(out, video_processor="qwen2-vl")


def test_unreadable_clips_name_the_row_and_file_or_skip_the_row(release, clips, tmp_path):
    import shutil

    folder, _ = clips
    moved = tmp_path / "media"
    shutil.copytree(folder, moved)
    (moved / "c3.mp4").write_bytes(b"not a video at all")
    (moved / "c4.mp4").unlink()
    ds = PackedDataset(release)
    loader = dataloader(release, video_processor="qwen2-vl", video_roots={"clips": moved})
    with pytest.raises(DataError, match=r"release row 1 \(segment 0: source 'clips', row 10\): cannot read video .*c3\.mp4") as err:
        loader.collate_fn([ds[0], ds[1]])
    assert (err.value.source, err.value.row, err.value.field) == ("clips", 10, "video")
    skip = dataloader(release, video_processor="qwen2-vl", video_roots={"clips": moved}, on_missing_video="skip_row")
    batch = skip.collate_fn([ds[0], ds[1], ds[2]])
    assert batch.skipped == [1] and batch.rows == [0, 2]
    assert [Path(r["path"]).name for row in batch.videos for r in row] == ["c0.mp4", "c1.mp4", "c1.mp4"]
    assert batch["video_grid_thw"].shape == (3, 3)


def test_a_video_processor_on_a_release_without_videos_is_refused(demo_release):
    with pytest.raises(ValueError, match="no video rule"):
        dataloader(demo_release, video_processor="qwen2-vl")


def test_a_plain_callable_gets_the_sampled_frames(release, clips):
    seen = []

    def frames(videos):  # uint8 [n, H, W, 3] arrays of the sampled frames
        seen.extend(v.shape for v in videos)
        return torch.zeros(sum(v.shape[0] for v in videos), 3)

    batch = dataloader(release, video_processor=frames).collate_fn([PackedDataset(release)[0]])
    _, found = clips
    assert seen and seen[-2:] == [(found["c0.mp4"][2], 48, 64, 3), (found["c1.mp4"][2], 64, 96, 3)]
    assert batch["video_grid_thw"].tolist() == [list(found["c0.mp4"][1]), list(found["c1.mp4"][1])]


# -- the model's own forward ------------------------------------------------------------


def segments_alone(model, batch) -> tuple[float, int]:
    """Summed token loss and token count of every packed sample run alone, unpacked, with
    the model's defaults and only its own images and videos (the model then computes its
    mRoPE positions itself)."""
    pixels, igrid = batch["pixel_values"], batch["image_grid_thw"]
    videos, vgrid = batch["pixel_values_videos"], batch["video_grid_thw"]
    iends, vends = [0] + igrid.prod(-1).cumsum(0).tolist(), [0] + vgrid.prod(-1).cumsum(0).tolist()
    total, count, img_at, vid_at = 0.0, 0, 0, 0
    for r, (images, clips) in enumerate(zip(batch.images, batch.videos)):
        seg = batch.segment_ids[r]
        for s in [int(x) for x in seg.unique() if x > 0]:
            where = seg == s
            ids, labels = batch["input_ids"][r][where][None], batch["labels"][r][where][None]
            kwargs = {"mm_token_type_ids": (ids == IMAGE_ID).long() + 2 * (ids == VIDEO_ID).long()}
            mine = [img_at + k for k, rec in enumerate(images) if seg[rec["position"]] == s]
            if mine:
                kwargs.update(pixel_values=pixels[iends[mine[0]] : iends[mine[-1] + 1]], image_grid_thw=igrid[mine[0] : mine[-1] + 1])
            mine = [vid_at + k for k, rec in enumerate(clips) if seg[rec["position"]] == s]
            if mine:
                kwargs.update(pixel_values_videos=videos[vends[mine[0]] : vends[mine[-1] + 1]],
                              video_grid_thw=vgrid[mine[0] : mine[-1] + 1])
            with torch.no_grad():
                loss = model(input_ids=ids, labels=labels, **kwargs).loss
            n = int((labels[0, 1:] != IGNORE_INDEX).sum())
            total, count = total + loss.item() * n, count + n
        img_at, vid_at = img_at + len(images), vid_at + len(clips)
    return total, count


@pytest.mark.parametrize("form", [{}, {"flatten": True}, {"attention": "4d", "mask_dtype": torch.float64}])
def test_packed_loss_with_videos_equals_the_samples_run_alone(release, qwen2_vl, form):
    from test_vlm_models import float64_model

    model = float64_model(qwen2_vl)
    model.set_attn_implementation("eager" if form.get("attention") else "sdpa")
    rows = [PackedDataset(release)[i] for i in range(3)]
    padded = dataloader(release, video_processor="qwen2-vl", image_processor="qwen2-vl").collate_fn(rows)
    total, count = segments_alone(model, padded)
    assert count > 0 and padded.padding_mask.min() == 0 and padded["video_grid_thw"].shape[0] == 6
    batch = dataloader(release, video_processor="qwen2-vl", image_processor="qwen2-vl", **form).collate_fn(rows)
    with torch.no_grad():
        packed = model(**batch).loss.item()
        # The controls: the clips' pixels in another order, or the text positions on all
        # four planes, change the loss, so the equality is no coincidence.
        swapped = model(**{**batch, "pixel_values_videos": batch["pixel_values_videos"].flip(0)}).loss.item()
        flat = model(**{**batch, "position_ids": batch["position_ids"][:1].expand(4, -1, -1)}).loss.item()
    assert abs(packed - total / count) < 1e-9, (packed, total / count)
    assert abs(swapped - total / count) > 1e-7 and abs(flat - total / count) > 1e-7


def test_the_pixel_cap_per_frame_follows_the_rule(clips, tmp_path):
    """With cap_pixels_per_frame, a small max_video_tokens shrinks the frames of clips
    with many sampled frames: the loader's processor takes the cap from the release."""
    folder, found = clips
    cap = {"cap_pixels_per_frame": True, "max_video_tokens": 10}
    capped = {name: (VIDEO, *reference_clip(folder / name, **cap)) if kind == VIDEO else (kind, grid, n)
              for name, (kind, grid, n) in found.items()}
    assert any(capped[n][1] != found[n][1] for n in capped)  # the cap changes some grid
    out = write_release(tmp_path / "r", ROWS, capped, folder, rule={**RULE, **cap})
    batch = dataloader(out, batch_size=3, video_processor="qwen2-vl").collate_fn([PackedDataset(out)[i] for i in range(3)])
    expected = reference_inputs(video_paths(batch, folder), **cap)
    assert torch.equal(batch["video_grid_thw"], expected["video_grid_thw"])
    assert torch.equal(batch["pixel_values_videos"], expected["pixel_values_videos"])
    with pytest.raises(RecipeError, match="cap_pixels_per_frame"):
        dataloader(out, video_processor=reference_video_processor())


def test_a_release_with_videos_and_no_image_rule_has_video_positions(clips, tmp_path):
    folder, found = clips
    out = write_release(tmp_path / "r", [[[5, "c1.mp4", 4], [3, "c0.mp4", "c2.mp4", 2]]], found, folder, images=False)
    batch = dataloader(out, video_processor="qwen2-vl").collate_fn([PackedDataset(out)[0]])
    assert batch["position_ids"].shape[0] == 4 and "pixel_values" not in batch
    types = batch["mm_token_type_ids"][0]
    assert int((types == 2).sum()) == sum(tokens(found[n][1]) for n in ("c1.mp4", "c0.mp4", "c2.mp4"))
    first = batch.videos[0][0]
    t, h, w = found["c1.mp4"][1]
    run = batch["position_ids"][1:, 0, first["position"] : first["position"] + first["length"]]
    assert run[0].unique().numel() == t and run[1].unique().numel() == h // 2 and run[2].unique().numel() == w // 2


def quarter_turned(path: Path) -> None:
    """Marks the clip's track as turned 90 degrees (a phone's display matrix)."""
    import struct

    data = bytearray(path.read_bytes())
    at = data.index(b"tkhd")
    matrix = at + 4 + 4 + (28 if data[at + 4] == 1 else 16) + 4 + 8 + 8
    data[matrix : matrix + 36] = struct.pack(">9i", 0, 0x10000, 0, -0x10000, 0, 0, 0, 0, 0x40000000)
    path.write_bytes(bytes(data))


def test_a_quarter_turned_clip_is_decoded_upright(tmp_path):
    from mmrecipe.loader.video import load_video, video_rule

    plain, turned = tmp_path / "plain.mp4", tmp_path / "turned.mp4"
    write_clip(plain, 8, 4, 96, 48, seed=3)
    turned.write_bytes(plain.read_bytes())
    quarter_turned(turned)
    rule = video_rule({"video": RULE})
    frames, info, indices = load_video(str(plain), rule)
    up, up_info, up_indices = load_video(str(turned), rule)
    assert frames.shape == (4, 48, 96, 3) and up.shape == (4, 96, 48, 3)
    assert (up_info.height, up_info.width) == (96, 48) and np.array_equal(indices, up_indices)
    # Turned a quarter clockwise for display, as FFmpeg's autorotate shows it.
    assert np.array_equal(up, np.rot90(frames, -1, axes=(1, 2)))
    grid = dict(zip("thw", reference_video_processor()(videos=[up], do_sample_frames=False, return_tensors="pt")["video_grid_thw"][0].tolist()))
    assert grid["h"] > grid["w"]


def test_qwen2_5_vl_spacing_equals_its_get_rope_index_per_segment(release, clips, qwen2_5_vl):
    folder, _ = clips
    tps = qwen2_5_vl.config.vision_config.tokens_per_second
    batch = dataloader(release, video_processor="qwen2-vl", image_processor="qwen2-vl",
                       video_tokens_per_second=tps).collate_fn([PackedDataset(release)[i] for i in range(3)])
    # transformers' sampled frame rate of each clip (its VideoMetadata), as Qwen2.5-VL's processor divides by it
    from transformers.video_utils import load_video

    processor = reference_video_processor()
    sample = functools.partial(processor.sample_frames, fps=RULE["fps"], min_frames=RULE["min_frames"], max_frames=RULE["max_frames"])
    metas = [load_video(str(p), backend="pyav", sample_indices_fn=lambda metadata, **_: sample(metadata))[1]
             for p in video_paths(batch, folder)]
    expected_seconds = torch.tensor([processor.temporal_patch_size / m.sampled_fps for m in metas], dtype=torch.float32)
    assert torch.equal(batch["second_per_grid_ts"], expected_seconds) and len(set(expected_seconds.tolist())) > 1
    pos, igrid, vgrid, seconds = batch["position_ids"], batch["image_grid_thw"], batch["video_grid_thw"], batch["second_per_grid_ts"]
    img_at = vid_at = checked = 0
    for r, (images, videos) in enumerate(zip(batch.images, batch.videos)):
        seg = batch.segment_ids[r]
        for s in [int(x) for x in seg.unique() if x > 0]:
            where = seg == s
            ids, types = batch["input_ids"][r][where][None], batch["mm_token_type_ids"][r][where][None]
            mine_i = [img_at + k for k, rec in enumerate(images) if seg[rec["position"]] == s]
            mine_v = [vid_at + k for k, rec in enumerate(videos) if seg[rec["position"]] == s]
            if mine_v:
                expected, _ = qwen2_5_vl.get_rope_index(
                    ids, types, image_grid_thw=igrid[mine_i[0] : mine_i[-1] + 1] if mine_i else None,
                    video_grid_thw=vgrid[mine_v[0] : mine_v[-1] + 1], second_per_grid_ts=seconds[mine_v[0] : mine_v[-1] + 1])
                assert torch.equal(pos[1:, r][:, where], expected[:, 0])
                checked += 1
        img_at, vid_at = img_at + len(images), vid_at + len(videos)
    assert checked == 5
    unspaced = dataloader(release, video_processor="qwen2-vl", image_processor="qwen2-vl").collate_fn(
        [PackedDataset(release)[i] for i in range(3)])
    assert not torch.equal(unspaced["position_ids"], pos) and "second_per_grid_ts" not in unspaced


def test_a_processor_with_another_merge_size_is_a_recipe_error(release):
    other = reference_video_processor()
    other.merge_size = 1  # frames resized to multiples of 14, each patch a token
    with pytest.raises(RecipeError, match=r"c0\.mp4 the grid 1x4x5 \(t, h, w patches; 20 tokens\), the release recorded "
                                          r"1x4x4 \(4 tokens\).*merge = 2"):
        dataloader(release, video_processor=other)


def test_inconsistent_video_releases_say_rebuild(clips, tmp_path):
    from mmrecipe import ReleaseError

    folder, found = clips
    out = write_release(tmp_path / "r", ROWS, found, folder)
    table = pq.read_table(out / "data" / "part-00000.parquet")
    shifted = pa.array([[p + 1 for p in row] for row in table["video_positions"].to_pylist()], type=pa.list_(pa.uint32()))
    pq.write_table(table.set_column(table.schema.get_field_index("video_positions"), "video_positions", shifted),
                   out / "data" / "part-00000.parquet")
    with pytest.raises(ReleaseError, match=r"release row 0: its video run at 7 of 4 tokens is not a run of the video token \(id 62\)"):
        PackedDataset(out)[0]
    pq.write_table(table.drop(["video_frames"]), out / "data" / "part-00000.parquet")
    with pytest.raises(ReleaseError, match=r"lacks the column\(s\) \['video_frames'\].*rebuild"):
        PackedDataset(out)


VIDEO_FIXTURE = ROOT / "tests" / "fixtures" / "data" / "video"


def test_a_built_video_release_loads_with_the_recorded_frames_and_grids(tmp_path):
    """End to end on the shipped video fixture (MP4 clips at NTSC and film rates, one
    turned a quarter): the frames and grids the build counted from container metadata are
    the ones the loader's decoding and transformers' processor give, and the positions
    equal Qwen2-VL's get_rope_index per segment."""
    from mmrecipe import build
    from mmrecipe.recipe.schema import ModelSpec

    if "video" not in ModelSpec.__struct_fields__ or not (VIDEO_FIXTURE / "conversations.jsonl").is_file():
        pytest.skip("this build has no [model] video rule")
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'extends = "{ROOT / "recipes" / "video-instruct.toml"}"\n[[source]]\nname = "video-chat"\n'
                      f'path = "{VIDEO_FIXTURE / "conversations.jsonl"}"\n')
    out = build(recipe, tmp_path / "out", progress=False, cache=False).path
    ds = PackedDataset(out)
    batch = dataloader(out, batch_size=len(ds), video_processor="qwen2-vl", recipe_dir=tmp_path).collate_fn(
        [ds[i] for i in range(len(ds))])
    recs = [rec for row in batch.videos for rec in row]
    assert len(recs) == 5 and any(Path(r["path"]).name.startswith("rotated") and r["grid"][1] > r["grid"][2] for r in recs)
    assert batch["video_grid_thw"].tolist() == [list(r["grid"]) for r in recs]
    from transformers import Qwen2VLConfig, Qwen2VLModel

    token = ds.video_rule.token_id
    model = Qwen2VLModel(Qwen2VLConfig(text_config=dict(vocab_size=token + 1, hidden_size=32, intermediate_size=64,
                                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2),
                                       vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2),
                                       video_token_id=token))
    at = 0
    for r, row in enumerate(batch.videos):
        seg = batch.segment_ids[r]
        for s in [int(x) for x in seg.unique() if x > 0]:
            where = seg == s
            mine = [at + k for k, rec in enumerate(row) if seg[rec["position"]] == s]
            types = batch["mm_token_type_ids"][r][where][None]
            expected = model.get_rope_index(batch["input_ids"][r][where][None], types,
                                            video_grid_thw=batch["video_grid_thw"][mine[0] : mine[-1] + 1])[0]
            assert torch.equal(batch["position_ids"][1:, r][:, where], expected[:, 0])
        at += len(row)
