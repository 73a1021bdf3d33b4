"""`recipe stats`: the realized mixture, counted from the shards themselves (streamed one
row group at a time, only the columns needed), and a length histogram."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from ..errors import ReleaseError
from .format import Manifest, read_manifest, read_stats


@dataclass
class SegmentCounts:
    """Per-source counts of the packed segments, read from the shards."""

    sequences: int
    tokens: int
    lengths: list[np.ndarray]  # per source: every segment's length
    trained: np.ndarray  # per source: loss-masked tokens
    images: np.ndarray  # per source: images


def count_segments(release: str | Path, manifest: Manifest | None = None) -> SegmentCounts:
    release = Path(release)
    manifest = manifest or read_manifest(release)
    n = len(manifest.sources)
    lengths: list[list[np.ndarray]] = [[] for _ in range(n)]
    trained = np.zeros(n, dtype=np.int64)
    images = np.zeros(n, dtype=np.int64)
    sequences = tokens = 0
    columns = ["loss_mask", "segment_lengths", "segment_source", "segment_images"]
    for shard in manifest.shards:
        path = release / shard.path
        if not path.is_file():
            raise ReleaseError(f"{path}: shard listed in the manifest is missing (run `recipe verify {release}`)")
        file = pq.ParquetFile(path, memory_map=True)
        for g in range(file.num_row_groups):
            table = file.read_row_group(g, columns=columns)
            flat = {c: table.column(c).combine_chunks().values.to_numpy(zero_copy_only=False) for c in columns}
            mask, seg_len, seg_src = flat["loss_mask"], flat["segment_lengths"].astype(np.int64), flat["segment_source"]
            sequences += table.num_rows
            tokens += len(mask)
            if not len(seg_len):
                continue
            # Segments tile the rows, so in the flattened row group they tile the tokens too.
            starts = np.concatenate([[0], np.cumsum(seg_len)[:-1]])
            per_segment = np.add.reduceat(mask.astype(np.int64), starts) if len(mask) else np.zeros(len(seg_len), np.int64)
            per_segment[seg_len == 0] = 0  # reduceat gives the next value for an empty slice
            trained += np.bincount(seg_src, weights=per_segment, minlength=n).astype(np.int64)
            images += np.bincount(seg_src, weights=flat["segment_images"], minlength=n).astype(np.int64)
            for s in np.unique(seg_src):
                lengths[s].append(seg_len[seg_src == s])
    joined = [np.concatenate(parts) if parts else np.zeros(0, np.int64) for parts in lengths]
    return SegmentCounts(sequences, tokens, joined, trained, images)


def release_stats(release: str | Path, counts: SegmentCounts | None = None) -> dict[str, Any]:
    """The build summary (stats.json) with the realized mixture (`share`) next to the
    target (`target_share`), both of samples or, for a `{ tokens = N }` total, of tokens. What
    the shards can tell (selected, tokens, trained tokens, images, packing) is counted from
    them; what only the build saw (rows, skipped, dropped, truncated) comes from stats.json.
    `disagreements` lists every number on which the two differ."""
    release = Path(release)
    manifest = read_manifest(release)
    build = read_stats(release)
    counts = counts or count_segments(release, manifest)
    mixture = manifest.recipe.get("mixture", {})
    total, alpha = mixture.get("total", "natural"), float(mixture.get("alpha", 0.0))
    kind = "natural" if total == "natural" else "tokens" if isinstance(total, dict) and "tokens" in total else "samples"
    disagreements: list[str] = []
    sources = _source_rows(build["sources"], counts, kind, alpha, disagreements)
    totals = _totals(build, counts, manifest.seq_len, disagreements)
    return {
        "release_id": manifest.release_id,
        "name": manifest.name,
        "version": manifest.version,
        "mixture": kind,  # what `share` and `target_share` are shares of: samples or tokens
        "alpha": alpha,
        "sources": sources,
        **totals,
        "disagreements": disagreements,
    }


def _realized(key: str, built: Any, counted: int, where: str, disagreements: list[str]) -> int:
    if built != counted:
        disagreements.append(f"{where}{key}: stats.json {built}, shards {counted}")
    return counted


def _source_rows(rows: list[dict[str, Any]], counts: SegmentCounts, kind: str, alpha: float, disagreements: list[str]) -> list[dict[str, Any]]:
    # The target as the builder computes it: every usable sample once ("natural"), else
    # shares ∝ weight × usable^alpha, of the samples or of the tokens.
    if kind == "natural":
        basis = [float(r["usable"]) for r in rows]
    else:
        basis = [float(r["weight"]) * (float(r["usable"]) ** alpha if alpha else 1.0) for r in rows]
    selected_total = sum(len(x) for x in counts.lengths)
    tokens_total = sum(int(x.sum()) for x in counts.lengths)
    sources = []
    for i, r in enumerate(rows):
        row = dict(r)
        for key, counted in (
            ("selected", len(counts.lengths[i])),
            ("tokens", int(counts.lengths[i].sum())),
            ("trained_tokens", int(counts.trained[i])),
            ("images", int(counts.images[i])),
        ):
            row[key] = _realized(key, r.get(key), counted, f"{r['name']}.", disagreements)
        row["target_share"] = basis[i] / sum(basis) if sum(basis) else 0.0
        if kind == "tokens":
            row["share"] = row["tokens"] / tokens_total if tokens_total else 0.0
        else:
            row["share"] = row["selected"] / selected_total if selected_total else 0.0
        sources.append(row)
    return sources


def _totals(build: dict[str, Any], counts: SegmentCounts, seq_len: int, disagreements: list[str]) -> dict[str, Any]:
    totals = {k: v for k, v in build.items() if k != "sources"}
    lower_bound = math.ceil(counts.tokens / seq_len) if seq_len else 0
    for key, counted in (
        ("sequences", counts.sequences),
        ("segments", sum(len(x) for x in counts.lengths)),
        ("tokens", counts.tokens),
        ("trained_tokens", int(counts.trained.sum())),
        ("lower_bound", lower_bound),
    ):
        totals[key] = _realized(key, build.get(key), counted, "", disagreements)
    # Ratios are recomputed the builder's way; compared with a tolerance, not bit for bit.
    for key, value in (
        ("fill", counts.tokens / (counts.sequences * seq_len) if counts.sequences else 0.0),
        ("packing_efficiency", lower_bound / counts.sequences if counts.sequences else 1.0),
    ):
        if key in build and not math.isclose(build[key], value, rel_tol=1e-9):
            disagreements.append(f"{key}: stats.json {build[key]}, shards {value}")
        totals[key] = value
    return totals


def plot_segment_lengths(counts: SegmentCounts, names: list[str], seq_len: int, out: str | Path) -> Path:
    """A PNG with one histogram of segment lengths per source, on a shared axis."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global backend, no display
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise ReleaseError("--plot needs matplotlib: pip install matplotlib") from None
    out = Path(out)
    n = max(len(names), 1)
    fig = Figure(figsize=(8, 1.6 + 1.4 * n))
    axes = fig.subplots(n, 1, sharex=True, squeeze=False)
    # The axis ends at the longest sample, not at seq_len: short samples stay readable.
    longest = max((int(x.max()) for x in counts.lengths if len(x)), default=seq_len)
    bins = np.linspace(0, max(longest, 1), 51)
    for ax, name, lengths in zip(axes[:, 0], names, counts.lengths):
        ax.hist(lengths, bins=bins, color="tab:blue")
        median = f", median {int(np.median(lengths)):,}" if len(lengths) else ""
        ax.set_title(f"{name}: {len(lengths):,} samples{median}", fontsize=10, loc="left")
        ax.set_ylabel("samples")
        ax.yaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))  # counts, not 2.5
    axes[-1, 0].set_xlabel(f"sample length in tokens (longest {longest:,}; packed sequences hold {seq_len:,})")
    axes[-1, 0].set_xlim(0, max(longest, 1))
    fig.suptitle("Packed sample lengths per source")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out
