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
    row_tokens: np.ndarray  # per sequence: tokens
    row_images: np.ndarray  # per sequence: images
    segment_lengths: np.ndarray  # every segment's length, in shard order
    segment_images: np.ndarray  # every segment's images, in shard order


def count_segments(release: str | Path, manifest: Manifest | None = None) -> SegmentCounts:
    release = Path(release)
    manifest = manifest or read_manifest(release)
    n = len(manifest.sources)
    lengths: list[list[np.ndarray]] = [[] for _ in range(n)]
    trained = np.zeros(n, dtype=np.int64)
    images = np.zeros(n, dtype=np.int64)
    sequences = tokens = 0
    row_tokens: list[np.ndarray] = []
    row_images: list[np.ndarray] = []
    all_lengths: list[np.ndarray] = []
    all_images: list[np.ndarray] = []
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
            row_tokens.append(np.diff(table.column("loss_mask").combine_chunks().offsets.to_numpy()))
            seg_img = flat["segment_images"].astype(np.int64)
            seg_offsets = table.column("segment_images").combine_chunks().offsets.to_numpy()
            per_row = np.concatenate([[0], np.cumsum(seg_img)])[seg_offsets]
            row_images.append(np.diff(per_row))
            all_lengths.append(seg_len)
            all_images.append(seg_img)
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

    def cat(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    return SegmentCounts(sequences, tokens, joined, trained, images, cat(row_tokens), cat(row_images), cat(all_lengths), cat(all_images))


def release_stats(release: str | Path, counts: SegmentCounts | None = None, epoch: int = 0) -> dict[str, Any]:
    """The build summary (stats.json) with the realized mixture (`share`) next to the
    target (`target_share`), both of samples or, for a `{ tokens = N }` total, of tokens. What
    the shards can tell (selected, tokens, trained tokens, images, packing) is counted from
    them; what only the build saw (rows, skipped, dropped, truncated) comes from stats.json.
    `disagreements` lists every number on which the two differ. `epoch`: the epoch of a
    multi-epoch release to count (its shards and stats.json)."""
    release = Path(release)
    whole = read_manifest(release)
    manifest = whole.epoch(epoch)
    build = read_stats(release, epoch)
    counts = counts or count_segments(release, manifest)
    mixture = manifest.recipe.get("mixture", {})
    total, alpha = mixture.get("total", "natural"), float(mixture.get("alpha", 0.0))
    kind = "natural" if total == "natural" else "tokens" if isinstance(total, dict) and "tokens" in total else "samples"
    disagreements: list[str] = []
    sources = _source_rows(build["sources"], counts, kind, alpha, disagreements)
    max_images = manifest.recipe.get("output", {}).get("max_images")
    totals = _totals(build, counts, manifest.seq_len, max_images, disagreements)
    return {
        "release_id": manifest.release_id,
        "name": manifest.name,
        "version": manifest.version,
        "mixture": kind,  # what `share` and `target_share` are shares of: samples or tokens
        "alpha": alpha,
        **({"epoch": epoch, "epochs": whole.epoch_count} if whole.epoch_count > 1 else {}),
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


def _totals(build: dict[str, Any], counts: SegmentCounts, seq_len: int, max_images: int | None, disagreements: list[str]) -> dict[str, Any]:
    totals = {k: v for k, v in build.items() if k != "sources"}
    packing = _packing(build.get("packing"), counts, seq_len, max_images, disagreements)
    lower_bound = packing["bounds"]["best"]
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
        _close(key, build.get(key), value, disagreements)
        totals[key] = value
    totals["packing"] = packing
    return totals


def _close(key: str, built: Any, value: float, disagreements: list[str]) -> None:
    if built is not None and not math.isclose(built, value, rel_tol=1e-9, abs_tol=1e-12):
        disagreements.append(f"{key}: stats.json {built}, shards {value}")


def _agree(key: str, built: Any, value: Any, disagreements: list[str]) -> None:
    """Floats within a tolerance, anything else exactly; nothing to compare in a release
    built before stats.json had the key."""
    if isinstance(value, float):
        _close(key, built, value, disagreements)
    elif built is not None and built != value:
        disagreements.append(f"{key}: stats.json {built}, shards {value}")


def _spread(values: np.ndarray) -> dict[str, float]:
    """Min, median (the upper one, as the builder takes it), max and mean."""
    if not len(values):
        return {"min": 0.0, "median": 0.0, "max": 0.0, "mean": 0.0}
    v = np.sort(values.astype(np.float64))
    return {"min": float(v[0]), "median": float(v[len(v) // 2]), "max": float(v[-1]), "mean": float(v.mean())}


def _packing(built: dict[str, Any] | None, counts: SegmentCounts, seq_len: int, max_images: int | None, disagreements: list[str]) -> dict[str, Any]:
    """The packing block of stats.json, its bounds, fills and image counts recounted from
    the shards (what packer ran and the comparison without an image budget come from the
    build)."""
    from .. import _core  # the bounds are the core's; computed the same way here

    packing = dict(built or {})
    lengths = counts.segment_lengths.astype(np.uint32)
    images = counts.segment_images.astype(np.uint32)
    bounds = _core.pack_bounds(lengths, seq_len, images, max_images) if len(lengths) and seq_len else {
        k: 0 for k in ("l1", "l2", "count", "dff", "images", "best")
    }
    fill = counts.row_tokens / seq_len if seq_len else counts.row_tokens.astype(np.float64)
    recounted = {
        "bounds": bounds,
        "fill_per_sequence": _spread(fill),
        "fill_histogram": np.bincount(np.minimum((fill * 10).astype(np.int64), 9), minlength=10).tolist(),
        "images_per_sequence": _spread(counts.row_images),
    }
    for key, value in recounted.items():
        old = packing.get(key)
        if isinstance(value, dict):
            for k, v in value.items():
                _agree(f"packing.{key}.{k}", (old or {}).get(k), v, disagreements)
        else:
            _agree(f"packing.{key}", old, value, disagreements)
        packing[key] = value
    gap = counts.sequences / bounds["best"] - 1.0 if bounds["best"] else 0.0
    _agree("packing.gap", packing.get("gap"), gap, disagreements)
    packing["gap"] = gap
    return packing


def plot_segment_lengths(counts: SegmentCounts, names: list[str], seq_len: int, out: str | Path, packing: dict[str, Any] | None = None) -> Path:
    """A PNG with one histogram of segment lengths per source, on a shared axis, and one
    of the fill of each packed sequence with the lower bounds and the gap to them."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global backend, no display
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise ReleaseError("--plot needs matplotlib: pip install matplotlib") from None
    out = Path(out)
    n = max(len(names), 1)
    fig = Figure(figsize=(8, 3.0 + 1.4 * n), layout="constrained")
    grid = fig.add_gridspec(n + 1, 1, height_ratios=[1.0] * n + [1.3])
    axes = np.array([[fig.add_subplot(grid[i, 0])] for i in range(n)])
    for ax in axes[1:, 0]:
        ax.sharex(axes[0, 0])
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
    fill_ax = fig.add_subplot(grid[n, 0])
    fill = counts.row_tokens / seq_len if seq_len else counts.row_tokens
    fill_ax.hist(fill * 100, bins=np.linspace(0, 100, 51), color="tab:green")
    fill_ax.set_xlim(0, 100)
    fill_ax.set_xlabel("tokens per packed sequence, % of seq_len")
    fill_ax.set_ylabel("sequences")
    if packing:
        b = packing["bounds"]
        fill_ax.set_title(
            f"{counts.sequences:,} sequences; bounds L1 {b['l1']:,}, L2 {b['l2']:,}, best {b['best']:,}: gap {packing['gap']:.2%}",
            fontsize=10,
            loc="left",
        )
    fig.suptitle("Packed sample lengths per source, and fill per sequence")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out
