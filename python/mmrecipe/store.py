"""The token store: each source's tokenized samples, kept between builds under a key
made of everything that shapes them, so a rebuild reads and tokenizes only the sources
whose key changed (and re-mixes and re-packs the rest from the stored lengths).

    key(source) = sha256 of
        the core plan's sample-shaping keys (chat template, its tokens, image rule,
        train_on, train_on_eos, overlong, seed) and the source's entry (name, templates
        with the short-answer wording, template fields, image root, on_error)
      + the source's recipe table (layout, fields, roles, join, group_by, format, ...)
      + its LLM table as it shapes replies ([lengthen.X] / [[generate]], not how calls go)
      + content hashes: the source's files in order, the tokenizer files, the call cache
        (by content) and the seed examples its LLM table reads

    + the epoch of a multi-epoch release, for a source with more than one template only
      (epoch e > 0 draws its templates anew; every other source's samples are the same
      in every epoch, so its one entry serves them all)

    not in the key: weights, mixture total, alpha, max_epochs, packing, shuffle, shard
    size, tokenizer_engine (the ids are equal for every engine), and seq_len: an entry
    records the seq_len it was built with and its longest sample before the overlong
    policy, and the core reuses it for another seq_len only when every sample fits both
    (then no sample was dropped, truncated or split either way).

Entries live in `<cache>/tokens/<key>.tok` (the format is the core's, rust/store.rs: a
checked header, written beside its name and renamed into place), or `<key>@<seq_len>.tok`
when the overlong policy changed some sample at that seq_len (so entries for two such
lengths coexist), with a `.json` beside each (source, recipe, size) for `recipe cache ls`; an entry's modification time is its last
use, and the least recently used are pruned past the size cap after each build. The cache
folder is `$MMRECIPE_CACHE`, else `$XDG_CACHE_HOME/mmrecipe`, else `~/.cache/mmrecipe`;
`MMRECIPE_CACHE_MAX` caps it (bytes, or with a K/M/G/T suffix; default 20G)."""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from .compile import core_plan
from .hashing import Hashes, bytes_sha256
from .llm.cache import cache_digest
from .recipe import Plan, SourcePlan

#: Bumped when what a key covers changes (old entries then simply stop matching).
KEY_VERSION = 1
DEFAULT_MAX = 20 << 30
SUFFIX = ".tok"

# Every key of the core plan is in exactly one of these (tests/test_store.py fails on a
# key in neither): what shapes a source's samples goes into the key, the rest does not.
CORE_INCLUDED = frozenset({
    "chat_template", "bos_token", "eos_token", "image", "train_on", "train_on_eos", "overlong", "seed", "sources",
    "max_images",  # a sample with more images is dropped as it is added
    "audio",  # only with an audio rule
    "video",  # likewise for video
    "added_tokens",  # only when set: they give the tokenizer new ids
})
CORE_EXCLUDED = frozenset({
    "seq_len",  # checked by the entry itself: reused when every sample fits both lengths
    "packing", "shuffle", "mixture", "alpha", "balance",  # mixing and packing run on stored lengths
    "tokenizer_engine",  # every engine gives the same ids
    "epoch",  # in the key only where it shapes samples: a source with templates to draw from
})
# A source's entry in the core plan.
SOURCE_INCLUDED = frozenset({"name", "templates", "fields", "image_root", "audio_root", "video_root", "on_error"})
SOURCE_EXCLUDED = frozenset({"weight", "max_epochs"})
# The source's recipe table ([[source]], or the one a [[generate]] table becomes).
SPEC_INCLUDED = frozenset({
    "name", "layout", "format", "json_key", "join", "group_by", "fields", "roles", "instructions", "short_answer",
    "lengthen", "on_error",
})
SPEC_EXCLUDED = frozenset({
    "path",  # the files it names are in the key by content, in order
    "image_root",  # in the key resolved (the core plan's image_root)
    "audio_root",  # likewise (the clips themselves: the entry's fingerprint, checked on load)
    "video_root",  # likewise for video
    "weight", "max_epochs",
})
# An LLM table ([lengthen.X] or [[generate]]): what shapes a reply is in the key (it is
# part of each call's cache key too), and what the stage does with it; how calls are made
# is not, nor the files whose content is in the key already.
LLM_INCLUDED = frozenset({
    "model", "system", "temperature", "top_p", "max_tokens", "seed", "method", "prompt", "templates", "pool", "on_error",
    "name", "format", "json_key", "fields", "context", "reply", "min_turns", "conversations",
})
LLM_EXCLUDED = frozenset({
    "endpoint", "api_key_env", "concurrency", "timeout", "retries", "backoff",  # how calls are made
    "cache", "seeds", "path",  # files: in the key by content
    "image_root",  # in the key resolved
    "weight", "max_epochs",  # the mix
})


def cache_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The token store's folder: `explicit`, `$MMRECIPE_CACHE`, `$XDG_CACHE_HOME/mmrecipe`
    or `~/.cache/mmrecipe`."""
    if explicit is not None:
        return Path(explicit).expanduser()
    if os.environ.get("MMRECIPE_CACHE"):
        return Path(os.environ["MMRECIPE_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "mmrecipe"
    return Path.home() / ".cache" / "mmrecipe"


def size_cap() -> int:
    """`MMRECIPE_CACHE_MAX` in bytes (K, M, G, T suffixes are powers of 1024), or 20 GiB."""
    text = os.environ.get("MMRECIPE_CACHE_MAX", "").strip().upper().removesuffix("B").removesuffix("I")
    if not text:
        return DEFAULT_MAX
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(text[-1], 1)
    try:
        return int(float(text.rstrip("KMGT")) * scale)
    except ValueError:
        raise ValueError(f"MMRECIPE_CACHE_MAX: {os.environ['MMRECIPE_CACHE_MAX']!r} is not a size (e.g. 20G, 500M, 1000000)") from None


def _pick(d: dict[str, Any], excluded: frozenset[str]) -> dict[str, Any]:
    """`d` without the excluded keys: a key in neither list counts as shaping the samples
    (tests/test_store.py makes sure there is none)."""
    return {k: d[k] for k in sorted(d) if k not in excluded}


def _llm_table(spec: Any) -> dict[str, Any]:
    return {k: v for k, v in sorted(msgspec.to_builtins(spec).items()) if k not in LLM_EXCLUDED}


def key_parts(plan: Plan, source: SourcePlan, core: dict[str, Any], hashes: Hashes) -> dict[str, Any]:
    """What the key of `source` hashes, as plain data (for tests and debugging)."""
    shared = _pick({k: v for k, v in core.items() if k != "sources"}, CORE_EXCLUDED)
    entry = _pick(core["sources"][source.index], SOURCE_EXCLUDED)
    spec = _pick(msgspec.to_builtins(source.spec), SPEC_EXCLUDED)
    llm: dict[str, Any] | None = None
    if source.lengthen is not None:
        ln = source.lengthen
        cache = cache_digest(ln.cache)[0] if ln.cache is not None and ln.cache.is_file() else None
        llm = {"table": ln.table, "spec": _llm_table(ln.spec), "seed": ln.seed, "fields": ln.fields, "templates": ln.templates, "cache": cache}
    elif source.generate is not None:
        g = source.generate
        llm = {
            "table": g.table, "spec": _llm_table(g.spec), "seed": g.seed,
            "seeds": hashes.file(g.seeds) if g.seeds is not None and g.seeds.is_file() else None,
            "cache": cache_digest(g.cache)[0] if g.cache.is_file() else None,
        }
    parts: dict[str, Any] = {}
    if core.get("epoch") and len(core["sources"][source.index]["templates"]) > 1:
        parts["epoch"] = core["epoch"]  # later epochs draw other templates; other sources keep their samples
    return parts | {
        "version": KEY_VERSION,
        "core": shared,
        "source": entry,
        "spec": spec,
        "formats": source.formats,
        "files": [hashes.file(f) for f in source.all_files],
        "tokenizer": [hashes.file(f) for f in plan.model.files],
        "llm": llm,
    }


def source_key(plan: Plan, source: SourcePlan, hashes: Hashes, tokenizer_engine: str | None = None, epoch: int = 0) -> str:
    """The token store key of one source of `plan` at `epoch` (hex sha256)."""
    core = core_plan(plan, tokenizer_engine, epoch)
    return bytes_sha256(json.dumps(key_parts(plan, source, core, hashes), sort_keys=True, ensure_ascii=True).encode())


@dataclass
class Entry:
    key: str
    source: str
    recipe: str
    bytes: int
    last_used: float


class TokenStore:
    """The entries in one folder: paths, use, listing and pruning."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.tokens = folder / "tokens"

    def path(self, key: str, seq_len: int | None = None) -> Path:
        """The entry of `key` (its name: the key, and `@seq_len` for an entry valid at that
        seq_len only)."""
        return self.tokens / f"{key}{'' if seq_len is None else f'@{seq_len}'}{SUFFIX}"

    def prepare(self) -> None:
        """The entries' folder, created (OSError if it cannot be)."""
        self.tokens.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def touch(path: Path) -> None:
        """Marks an entry used now (its modification time orders pruning)."""
        try:
            os.utime(path)
        except OSError:
            pass

    def describe(self, path: Path, source: str, recipe: str, size: int) -> None:
        """Writes the `.json` of the entry at `path` (what `ls` shows), renamed into place."""
        info = path.with_suffix(".json")
        tmp = info.with_name(f".{info.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        tmp.write_text(json.dumps({"source": source, "recipe": recipe, "bytes": size}), "utf-8")
        os.replace(tmp, info)

    def entries(self) -> list[Entry]:
        """Every entry, most recently used first."""
        out: list[Entry] = []
        if not self.tokens.is_dir():
            return out
        for p in self.tokens.glob(f"*{SUFFIX}"):
            try:
                st = p.stat()
            except OSError:  # pruned by another build meanwhile
                continue
            key = p.name.removesuffix(SUFFIX)
            try:
                info = json.loads((self.tokens / f"{key}.json").read_text("utf-8"))
            except (OSError, ValueError):
                info = {}
            out.append(Entry(key, str(info.get("source", "?")), str(info.get("recipe", "?")), st.st_size, st.st_mtime))  # key: the name
        return sorted(out, key=lambda e: (-e.last_used, e.key))

    def remove(self, name: str) -> None:
        """Removes the entry named `name` (an `Entry.key`)."""
        for p in (self.tokens / f"{name}{SUFFIX}", self.tokens / f"{name}.json"):
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    def prune(self, cap: int) -> list[Entry]:
        """Removes the least recently used entries until the rest fit in `cap` bytes, and
        temporary files left by killed builds; returns what it removed."""
        removed = []
        entries = self.entries()
        total = sum(e.bytes for e in entries)
        for e in reversed(entries):
            if total <= cap:
                break
            self.remove(e.key)
            total -= e.bytes
            removed.append(e)
        if self.tokens.is_dir():
            day = time.time() - 86400
            for tmp in self.tokens.glob(".*.tmp-*"):
                try:
                    if tmp.stat().st_mtime < day:
                        tmp.unlink()
                except OSError:
                    pass
            known = {e.key for e in self.entries()}
            for info in self.tokens.glob("*.json"):  # an entry removed by hand
                if info.name.removesuffix(".json") not in known:
                    try:
                        info.unlink()
                    except OSError:
                        pass
        return removed

    def clear(self) -> int:
        """Removes every entry; returns how many."""
        entries = self.entries()
        for e in entries:
            self.remove(e.key)
        self.prune(0)
        return len(entries)


def human(n: float) -> str:
    """A size in bytes as people read it."""
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024:
            break
    return f"{n:.1f} {unit}"
