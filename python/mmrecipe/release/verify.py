"""`recipe verify`: do a release's files still hash to what its manifest says, and (given
the recipe's folder) do its inputs?"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from ..errors import LLMError, ReleaseError
from ..hashing import file_sha256
from ..llm.cache import cache_digest
from ..recipe.plan import CACHE_ROLE
from ..recipe.pools import BUILTIN_PREFIX, pools_dir
from .format import MANIFEST, read_manifest, read_stats, release_id_of


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


def _input_path(shown: str, base: Path) -> Path:
    """The file a manifest's input names: a built-in pool in this installation, else a
    path relative to the recipe's folder."""
    if shown.startswith(BUILTIN_PREFIX):
        return pools_dir() / shown.removeprefix(BUILTIN_PREFIX)
    path = Path(shown)
    return path if path.is_absolute() else base / path


def _check_stats(release: Path, name: str, part: Any, epoch: int, problems: list[Problem]) -> None:
    """The stats.json of one epoch: its hash, and its totals against the manifest's."""
    if part.stats_sha256 and (release / name).is_file():
        _check_file(release / name, name, part.stats_sha256, None, problems)
    if not (release / name).is_file():
        problems.append(Problem("missing", name, "the build summary is missing"))
        return
    try:
        totals = {k: v for k, v in read_stats(release, epoch).items() if k != "sources"}
    except ValueError:  # not JSON any more
        problems.append(Problem("changed", name, "not valid JSON"))
        return
    if totals != part.totals:
        keys = sorted(k for k in totals.keys() | part.totals.keys() if totals.get(k) != part.totals.get(k))
        problems.append(Problem("inconsistent", name, f"totals differ from the manifest's: {', '.join(keys)}"))


def verify(release: str | Path, recipe_dir: str | Path | None = None) -> VerifyReport:
    """Re-hashes every shard of every epoch (and, given the folder of the recipe, every
    input) against the manifest, and names each file that differs, is missing or is not
    listed."""
    release = Path(release)
    manifest = read_manifest(release)
    manifest_bytes = (release / MANIFEST).read_bytes()
    parts = [manifest.epoch(e) for e in range(manifest.epoch_count)]
    report = VerifyReport(release, manifest.release_id, sum(len(part.shards) for part in parts), None)
    problems = report.problems

    expected = release_id_of(manifest_bytes)
    if expected != manifest.release_id:
        problems.append(Problem("changed", MANIFEST, f"release_id {_short(manifest.release_id)}… does not match its content ({_short(expected)}…)"))

    for part in parts:
        for shard in part.shards:
            _check_file(release / shard.path, shard.path, shard.sha256, None, problems)
    stats_names = [manifest.stats_path(e) for e in range(manifest.epoch_count)]
    listed = {Path(s.path) for part in parts for s in part.shards} | {Path(MANIFEST)} | {Path(n) for n in stats_names}
    for path in sorted(release.rglob("*")):
        rel = path.relative_to(release)
        if not path.is_dir() and rel not in listed:
            problems.append(Problem("extra", rel.as_posix(), "in the release but not in the manifest"))
    for epoch, (part, name) in enumerate(zip(parts, stats_names)):
        _check_stats(release, name, part, epoch, problems)

    if recipe_dir is not None:
        base = recipe_folder(recipe_dir)
        for item in manifest.inputs:
            path = _input_path(item.path, base)
            _check_file(path, f"{item.path} ({item.role})", item.sha256, item.bytes, problems, item.role)
        report.inputs = len(manifest.inputs)
    return report
