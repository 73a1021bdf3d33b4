"""mRoPE positions of a packed row for Qwen2-VL-style models, in the `[4, L]` layout that
transformers reads as packed: row 0 the plain text positions restarting at 0 in every
segment (from which the attention mask is built), rows 1-3 the temporal / height / width
positions that the model's own `get_rope_index` gives each segment alone.

Within a segment, text advances by one per token; an image of merged grid t x h x w starts
at the current position p, its tokens (row by row, left to right) take p + (ti, hi, wi),
and the text after it continues at p + max(h, w). Computed with whole-array NumPy."""

from __future__ import annotations

import numpy as np


def segment_starts(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)


def mrope_positions(
    segment_lengths: np.ndarray, image_starts: np.ndarray, grids: np.ndarray, merge: int
) -> np.ndarray:
    """`[4, sum(segment_lengths)]` int64 positions. `image_starts` are row-relative run
    starts, `grids` the `(t, h, w)` patch grid of each image (before merging)."""
    n = int(segment_lengths.sum())
    starts = segment_starts(segment_lengths)
    local = np.arange(n, dtype=np.int64) - np.repeat(starts, segment_lengths)
    out = np.empty((4, n), dtype=np.int64)
    out[0] = local
    if len(image_starts) == 0:
        out[1:] = local
        return out
    grids = np.asarray(grids, dtype=np.int64).reshape(-1, 3)
    t, h, w = grids[:, 0], grids[:, 1] // merge, grids[:, 2] // merge
    size = t * h * w
    # Each image takes `size` tokens but moves the text on by max(h, w) only.
    shift = size - np.maximum(h, w)
    ends = image_starts + size
    delta = np.zeros(n + 1, dtype=np.int64)
    np.add.at(delta, ends, shift)
    behind = np.cumsum(delta)[:n]  # shift of all images ending at or before each token
    # Per segment: at its first token, everything counted so far (including an image that
    # ends right there) belongs to earlier segments.
    behind = behind - np.repeat(np.append(behind, 0)[starts], segment_lengths)
    text = local - behind
    out[1:] = text
    # Image tokens: offset k within the image -> (k // (h w), (k // w) % h, k % w).
    which = np.repeat(np.arange(len(image_starts)), size)
    k = np.arange(len(which)) - np.repeat(np.concatenate([[0], np.cumsum(size)[:-1]]), size)
    at = np.repeat(image_starts, size) + k
    p = text[np.repeat(image_starts, size)]
    hw, wi = h[which] * w[which], w[which]
    out[1, at] = p + k // hw
    out[2, at] = p + (k // wi) % h[which]
    out[3, at] = p + k % wi
    return out
