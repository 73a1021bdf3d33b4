"""Video in the loader: mRoPE positions of rows with image and video runs against the
model's own `get_rope_index` (a tiny random Qwen2-VL, and Qwen2.5-VL's spaced frames),
clips decoded with PyAV and sampled as transformers' Qwen2VLVideoProcessor samples them,
pixels and grids through the processor hook in the workers, checked against the release's
grids, unreadable clips, and a packed forward that equals its segments run alone."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
from conftest import ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from mmrecipe.loader.rope import mrope_positions, vision_runs  # noqa: E402

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
