"""Where each image's tokens are in a packed row, read from the token ids themselves: the
image token's runs, cut in order by the release's per-image run lengths (two images with
nothing between them form one run). The recorded `image_positions` are checked against
them: releases built before row-relative positions count from the start of the emitted
row group instead, which shows as the same offset on every image of a row and is
tolerated; any other disagreement means the release is inconsistent."""

from __future__ import annotations

import numpy as np

from ..errors import ReleaseError


def image_starts(ids: np.ndarray, lengths: np.ndarray, token_id: int) -> np.ndarray | None:
    """The start of each image's run (images in order), or None when the image tokens of
    `ids` are not exactly `lengths` contiguous runs."""
    where = np.flatnonzero(ids == token_id)
    if len(where) != int(lengths.sum()):
        return None
    if len(lengths) == 0:
        return np.zeros(0, np.int64)
    if (lengths <= 0).any():
        return None
    first = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    last = first + lengths - 1
    if not (where[last] - where[first] == lengths - 1).all():
        return None
    return where[first].astype(np.int64)


def checked_starts(ids: np.ndarray, lengths: np.ndarray, recorded: np.ndarray, token_id: int, row: int) -> np.ndarray:
    """Row-relative image positions of release row `row`, checked against its records."""
    starts = image_starts(ids, lengths, token_id)
    if starts is None:
        raise ReleaseError(
            f"release row {row}: the image token (id {token_id}) does not form the {len(lengths)} runs of "
            f"lengths {lengths.tolist()} the row records ({int((ids == token_id).sum())} image tokens found); "
            "the release is inconsistent: rebuild it")
    if len(recorded) != len(starts):
        raise ReleaseError(f"release row {row}: {len(recorded)} image positions recorded for {len(starts)} images; rebuild the release")
    offset = recorded - starts
    if len(offset) and not (offset == offset[0]).all():
        raise ReleaseError(
            f"release row {row}: the recorded image positions {recorded.tolist()} do not match the image token "
            f"runs at {starts.tolist()}; the release is inconsistent: rebuild it")
    return starts


def infer_token_id(rows: list[tuple[np.ndarray, np.ndarray]]) -> int | None:
    """The one token id whose runs match the image lengths of every given (ids, lengths)
    row, for releases whose manifest does not record it; None if no id or several do."""
    candidates: set[int] | None = None
    for ids, lengths in rows:
        total = int(lengths.sum())
        if total == 0:
            continue
        values, counts = np.unique(ids, return_counts=True)
        here = {int(v) for v in values[counts == total] if image_starts(ids, lengths, int(v)) is not None}
        candidates = here if candidates is None else candidates & here
        if candidates is not None and len(candidates) <= 1:
            break
    if candidates is None or len(candidates) != 1:
        return None
    return candidates.pop()
