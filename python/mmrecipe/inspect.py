"""Reading a finished release back: `verify` (do the files still hash to what the manifest
says?), `release_stats` (the realized mixture, counted from the shards themselves) and
`diff_releases` (what changed between two releases). The shards are streamed one row group
at a time and only the columns needed, so a release of any size fits in memory."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pyarrow.parquet as pq

from .callcache import CACHE_ROLE, cache_digest
from .errors import LLMError, ReleaseError
from .hashing import bytes_sha256, file_sha256
from .release import DATA, MANIFEST, STATS, Manifest, read_manifest, read_stats

# ---------------------------------------------------------------------------------- verify


@dataclass
class Problem:
    kind: str  # "changed", "missing", "extra" or "inconsistent"
    path: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind:<12} {self.path}: {self.detail}"


@dataclass
class VerifyReport:
    release: Path
    release_id: str
    shards: int
    inputs: int | None  # None: the inputs were not checked (no recipe folder given)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def expected_release_id(manifest_bytes: bytes) -> str:
    """The release id the builder gives this manifest: sha256 of its compact JSON with
    `release_id` empty. Decoded generically (not into `Manifest`) so that a field this
    version does not know still counts."""
    raw = msgspec.json.decode(manifest_bytes)
    raw["release_id"] = ""
    return bytes_sha256(msgspec.json.encode(raw))


def _short(sha: str) -> str:
    return sha[:12]


def _check_file(path: Path, shown: str, sha256: str, size: int | None, problems: list[Problem], role: str = "") -> None:
    if not path.is_file():
        problems.append(Problem("missing", shown, "listed in the manifest but not found"))
        return
    if role.startswith(CACHE_ROLE):  # a call cache is hashed by its content (see cache_digest)
        try:
            actual, now = cache_digest(path)
        except LLMError as e:
            problems.append(Problem("changed", shown, str(e)))
            return
    else:
        actual, now = file_sha256(path), path.stat().st_size
    if actual != sha256:
        # The size says whether bytes were edited in place or the file was cut or grown.
        sizes = f", {now:,} bytes (manifest: {size:,})" if size is not None and now != size else ""
        problems.append(Problem("changed", shown, f"sha256 {_short(actual)}… (manifest: {_short(sha256)}…){sizes}"))


def recipe_folder(path: str | Path) -> Path:
    """The folder input paths are relative to: `path` itself, or its folder when `path` is
    the recipe file."""
    p = Path(path)
    if p.is_file():
        return p.parent
    if not p.is_dir():
        raise ReleaseError(f"--recipe-dir {p}: no such folder or recipe file")
    return p


def verify(release: str | Path, recipe_dir: str | Path | None = None) -> VerifyReport:
    """Re-hashes every shard (and, given the folder of the recipe, every input) against
    the manifest, and names each file that differs, is missing or is not listed."""
    release = Path(release)
    manifest = read_manifest(release)
    manifest_bytes = (release / MANIFEST).read_bytes()
    report = VerifyReport(release, manifest.release_id, len(manifest.shards), None)
    problems = report.problems

    expected = expected_release_id(manifest_bytes)
    if expected != manifest.release_id:
        problems.append(Problem("changed", MANIFEST, f"release_id {_short(manifest.release_id)}… does not match its content ({_short(expected)}…)"))

    for shard in manifest.shards:
        _check_file(release / shard.path, shard.path, shard.sha256, None, problems)
    listed = {Path(s.path) for s in manifest.shards}
    data = release / DATA
    if data.is_dir():
        for path in sorted(data.rglob("*")):
            rel = path.relative_to(release)
            if path.is_file() and rel not in listed:
                problems.append(Problem("extra", rel.as_posix(), "in data/ but not in the manifest"))

    stats_path = release / STATS
    if not stats_path.is_file():
        problems.append(Problem("missing", STATS, "the build summary is missing"))
    else:
        try:
            totals = {k: v for k, v in read_stats(release).items() if k != "sources"}
        except ValueError:  # not JSON any more
            totals = None
            problems.append(Problem("changed", STATS, "not valid JSON"))
        if totals is not None and totals != manifest.totals:
            keys = sorted(k for k in totals.keys() | manifest.totals.keys() if totals.get(k) != manifest.totals.get(k))
            problems.append(Problem("inconsistent", STATS, f"totals differ from the manifest's: {', '.join(keys)}"))

    if recipe_dir is not None:
        base = recipe_folder(recipe_dir)
        for item in manifest.inputs:
            path = Path(item.path)
            _check_file(path if path.is_absolute() else base / path, f"{item.path} ({item.role})", item.sha256, item.bytes, problems, item.role)
        report.inputs = len(manifest.inputs)
    return report


# ----------------------------------------------------------------------------------- stats


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
    rows = build["sources"]
    # The target as the builder computes it: every usable sample once ("natural"), else
    # shares ∝ weight × usable^alpha, of the samples or of the tokens.
    if kind == "natural":
        basis = [float(r["usable"]) for r in rows]
    else:
        basis = [float(r["weight"]) * (float(r["usable"]) ** alpha if alpha else 1.0) for r in rows]
    selected_total = sum(len(x) for x in counts.lengths)
    tokens_total = sum(int(x.sum()) for x in counts.lengths)
    disagreements: list[str] = []

    def realized(key: str, built: Any, counted: int, where: str) -> int:
        if built != counted:
            disagreements.append(f"{where}{key}: stats.json {built}, shards {counted}")
        return counted

    sources = []
    for i, r in enumerate(rows):
        row = dict(r)
        name = r["name"]
        for key, counted in (
            ("selected", len(counts.lengths[i])),
            ("tokens", int(counts.lengths[i].sum())),
            ("trained_tokens", int(counts.trained[i])),
            ("images", int(counts.images[i])),
        ):
            row[key] = realized(key, r.get(key), counted, f"{name}.")
        row["target_share"] = basis[i] / sum(basis) if sum(basis) else 0.0
        if kind == "tokens":
            row["share"] = row["tokens"] / tokens_total if tokens_total else 0.0
        else:
            row["share"] = row["selected"] / selected_total if selected_total else 0.0
        sources.append(row)

    seq_len = manifest.seq_len
    totals = {k: v for k, v in build.items() if k != "sources"}
    lower_bound = math.ceil(counts.tokens / seq_len) if seq_len else 0
    for key, counted in (
        ("sequences", counts.sequences),
        ("segments", selected_total),
        ("tokens", counts.tokens),
        ("trained_tokens", int(counts.trained.sum())),
        ("lower_bound", lower_bound),
    ):
        totals[key] = realized(key, build.get(key), counted, "")
    # Ratios are recomputed the builder's way; compared with a tolerance, not bit for bit.
    for key, value in (
        ("fill", counts.tokens / (counts.sequences * seq_len) if counts.sequences else 0.0),
        ("packing_efficiency", lower_bound / counts.sequences if counts.sequences else 1.0),
    ):
        if key in build and not math.isclose(build[key], value, rel_tol=1e-9):
            disagreements.append(f"{key}: stats.json {build[key]}, shards {value}")
        totals[key] = value
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


# ------------------------------------------------------------------------------------ diff


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts and lists as {dotted.key[index]: leaf}, the recipe's key-path style."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, list) and value:
        out = {}
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


_ABSENT = object()


def _change(key: str, old: Any, new: Any) -> dict[str, Any]:
    change: dict[str, Any] = {"key": key}
    if old is not _ABSENT:
        change["old"] = old
    if new is not _ABSENT:
        change["new"] = new
    return change


def _changed_keys(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    keys = list(a) + [k for k in b if k not in a]
    return [_change(k, a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in keys if a.get(k, _ABSENT) != b.get(k, _ABSENT)]


def diff_releases(a: str | Path, b: str | Path) -> dict[str, Any]:
    """What changed from release `a` to release `b`: inputs, recipe keys, release fields,
    per-source counts and totals."""
    ma, mb = read_manifest(a), read_manifest(b)
    sa, sb = read_stats(a), read_stats(b)

    ins_a = {(i.role, i.path): i for i in ma.inputs}
    ins_b = {(i.role, i.path): i for i in mb.inputs}
    added = [i for k, i in ins_b.items() if k not in ins_a]
    removed = [i for k, i in ins_a.items() if k not in ins_b]
    # Same role and content under another path (a recipe moved, a path made absolute).
    moved = []
    for old in list(removed):
        new = next((i for i in added if i.role == old.role and i.sha256 == old.sha256), None)
        if new is not None:
            moved.append({"role": old.role, "old": old.path, "new": new.path, "sha256": old.sha256})
            removed.remove(old)
            added.remove(new)
    inputs = {
        "added": [msgspec.to_builtins(i) for i in added],
        "removed": [msgspec.to_builtins(i) for i in removed],
        "changed": [
            {"role": i.role, "path": i.path, "old": i.sha256, "new": ins_b[k].sha256}
            for k, i in ins_a.items()
            if k in ins_b and i.sha256 != ins_b[k].sha256
        ],
        "moved": moved,
    }

    fields = ("format", "mmrecipe_version", "chat_template", "seq_len", "pad_token_id")
    release_fields = _changed_keys({f: getattr(ma, f) for f in fields}, {f: getattr(mb, f) for f in fields})

    rows_a = {r["name"]: r for r in sa["sources"]}
    rows_b = {r["name"]: r for r in sb["sources"]}
    sources = []
    for name in list(rows_a) + [n for n in rows_b if n not in rows_a]:
        ra, rb = rows_a.get(name, {}), rows_b.get(name, {})
        row: dict[str, Any] = {"name": name}
        for key in ("selected", "tokens", "trained_tokens", "rows", "weight"):
            row[key] = [ra.get(key), rb.get(key)]
        row["changed"] = any(ra.get(k) != rb.get(k) for k in ("selected", "tokens", "trained_tokens", "rows", "weight"))
        sources.append(row)

    totals_a = {k: v for k, v in sa.items() if k != "sources"}
    totals_b = {k: v for k, v in sb.items() if k != "sources"}
    return {
        "a": {"path": str(a), "release_id": ma.release_id},
        "b": {"path": str(b), "release_id": mb.release_id},
        "identical": ma.release_id == mb.release_id,
        "inputs": inputs,
        "recipe": _changed_keys(flatten(ma.recipe), flatten(mb.recipe)),
        "release": release_fields,
        "sources": sources,
        "totals": _changed_keys(totals_a, totals_b),
    }


def show(value: Any, width: int = 60) -> str:
    """A value as JSON, cut to `width` characters (chat templates are long)."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 1] + "…"
