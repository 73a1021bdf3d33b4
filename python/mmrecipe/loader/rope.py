"""mRoPE positions of a packed row for Qwen2-VL-style models, in the `[4, L]` layout that
transformers reads as packed: row 0 the plain text positions restarting at 0 in every
segment (from which the attention mask is built), rows 1-3 the temporal / height / width
positions that the model's own `get_rope_index` gives each segment alone.

Within a segment, text advances by one per token. A vision run (an image, or a video) of
merged grid t x h x w starts at the current position p; its tokens (frame by frame, row
by row, left to right) take p + (ti, hi, wi), and the text after it continues at
p + max(h, w), for videos too (transformers 5's `get_rope_index`: the temporal extent
does not move the text on). Qwen2.5-VL spaces a video's frames: ti becomes
floor(ti * interval), interval = tokens_per_second * seconds per temporal patch.
Image and video runs of a row are one sequence in token order. Computed with whole-array
NumPy."""

from __future__ import annotations

import numpy as np


def segment_starts(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)


def vision_runs(image_starts: np.ndarray, image_grids: np.ndarray, video_starts: np.ndarray,
                video_grids: np.ndarray, video_intervals: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The image and video runs of a row as one sequence in token order: starts, grids and
    (where videos have intervals) each run's temporal interval (1 for images)."""
    starts = np.concatenate([np.asarray(image_starts, np.int64), np.asarray(video_starts, np.int64)])
    grids = np.concatenate([np.asarray(image_grids, np.int64).reshape(-1, 3), np.asarray(video_grids, np.int64).reshape(-1, 3)])
    order = np.argsort(starts, kind="stable")
    intervals = None
    if video_intervals is not None:
        intervals = np.concatenate([np.ones(len(image_starts), np.float32), np.asarray(video_intervals, np.float32)])[order]
    return starts[order], grids[order], intervals


def mrope_positions(
    segment_lengths: np.ndarray, run_starts: np.ndarray, grids: np.ndarray, merge: int,
    intervals: np.ndarray | None = None,
) -> np.ndarray:
    """`[4, sum(segment_lengths)]` int64 positions. `run_starts` are row-relative starts of
    the vision runs in token order, `grids` the `(t, h, w)` patch grid of each (before
    spatial merging; t is temporal patches, 1 for an image), `intervals` each run's
    temporal spacing (float32, as the model computes it; None: 1)."""
    n = int(segment_lengths.sum())
    starts = segment_starts(segment_lengths)
    local = np.arange(n, dtype=np.int64) - np.repeat(starts, segment_lengths)
    out = np.empty((4, n), dtype=np.int64)
    out[0] = local
    if len(run_starts) == 0:
        out[1:] = local
        return out
    run_starts = np.asarray(run_starts, dtype=np.int64)
    grids = np.asarray(grids, dtype=np.int64).reshape(-1, 3)
    t, h, w = grids[:, 0], grids[:, 1] // merge, grids[:, 2] // merge
    size = t * h * w
    # Each run takes `size` tokens but moves the text on by max(h, w) only.
    shift = size - np.maximum(h, w)
    ends = run_starts + size
    delta = np.zeros(n + 1, dtype=np.int64)
    np.add.at(delta, ends, shift)
    behind = np.cumsum(delta)[:n]  # shift of all runs ending at or before each token
    # Per segment: at its first token, everything counted so far (including a run that
    # ends right there) belongs to earlier segments.
    behind = behind - np.repeat(np.append(behind, 0)[starts], segment_lengths)
    text = local - behind
    out[1:] = text
    # Run tokens: offset k within the run -> (k // (h w), (k // w) % h, k % w).
    which = np.repeat(np.arange(len(run_starts)), size)
    k = np.arange(len(which)) - np.repeat(np.concatenate([[0], np.cumsum(size)[:-1]]), size)
    at = np.repeat(run_starts, size) + k
    p = text[np.repeat(run_starts, size)]
    hw, wi = h[which] * w[which], w[which]
    frame = k // hw
    if intervals is not None:  # float32 products truncated, as torch's `.long()` of them
        frame = (frame.astype(np.float32) * np.asarray(intervals, np.float32)[which]).astype(np.int64)
    out[1, at] = p + frame
    out[2, at] = p + (k // wi) % h[which]
    out[3, at] = p + k % wi
    return out
