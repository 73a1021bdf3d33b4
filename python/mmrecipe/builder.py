"""`recipe build`, and the one place that knows the order of the pipeline:

    recipe ──resolve──▶ Plan
      for each source:  its token store entry (store.py) when its key matches, else
                        read ─▶ fields resolved ─▶ LLM stages ─▶ layout ─▶ core.add_batch
                        (a slice at a time when the source streams; tokens spill to disk)
                        and the source saved to the token store
                        (engine "ray": a source without LLM stages is read and tokenized
                        on the cluster, a task per work unit (sources/units.py), each
                        saving its entry to a staging folder; the entries are then
                        loaded here in row order, as from the token store)
      core.finish():    exact mixture, interleave, packing (on lengths only)
      core.emit():      packed rows ─▶ shards + stats.json
      (`[output] epochs = N`: the above once per epoch, with the epoch's seed; a source
      without templates to draw is loaded from the token store after the first)
      manifest.json ─▶ the release renamed into place

Python orchestrates whole batches; no loop runs per sample."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
import warnings
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import msgspec

from . import __version__
from .compile import batch_columns, check_tokenizer_engine, make_compiler
from .errors import MMRecipeError, ReleaseError, TokenizerError
from .hashing import Hashes, file_sha256
from .llm.cache import cache_digest
from .llm.pools import expand_pools
from .llm.stages import LLMStages
from .recipe import Plan, Recipe, SourcePlan, load_recipe, resolve
from .recipe.limits import threads_problem
from .recipe.plan import CACHE_ROLE
from .recipe.pools import BUILTIN_PREFIX, pools_dir
from .release.format import DATA, FORMAT, MANIFEST, STATS, EpochPart, InputFile, Manifest, Shard, epoch_folder, release_id_of
from .release.guard import check_destination, lock
from .release.write import shard_ranges, spill_prefix, staging, write_json, write_planned_shard, write_shards
from .sources.columns import Normalized
from .sources.fields import as_text, require, resolve_rows, resolves_on_no_row
from .sources.layouts import to_internal
from .sources.read import read_all, read_slices
from .sources.units import Unit, cut_units, cuttable, read_unit
from .store import TokenStore, cache_dir, size_cap, source_key

BATCH_ROWS = 8192

#: The most bytes of a JSON file one Ray task reads (`ray_unit_bytes`): a task holds
#: about this much input, and a large source spreads over its size / this many tasks.
DEFAULT_UNIT_BYTES = 64 << 20


@dataclass
class BuildResult:
    path: Path
    summary: dict[str, Any]
    manifest: Manifest
    #: Seconds per stage: read (sources → normalized columns), tokenize (render, tokenize,
    #: mask), pack (mixture + packing), write (shards, hashes, manifest); with a token
    #: store, store (entries loaded and saved); with engine "ray", connect (to the
    #: cluster, and from it), and tokenize is the wait for the cluster's tasks and their entries loaded.
    timings: dict[str, float] = field(default_factory=dict)
    #: Per LLM table: rows, served from the cache, calls made, failed, missing.
    llm: dict[str, dict[str, int]] = field(default_factory=dict)
    #: The token store: its folder (None: not used), the sources loaded from it
    #: (`reused`) and those tokenized, why each tokenized one missed, bytes saved, and
    #: warnings (a store that could not be read or written: the build went on without).
    store: dict[str, Any] = field(default_factory=dict)
    #: A multi-epoch release: each epoch's totals (`summary` is epoch 0's); else empty.
    epochs: list[dict[str, Any]] = field(default_factory=list)
    #: With engine "ray": each source tokenized on the cluster (as the store report names
    #: it) with its tasks, one per work unit in row order: rows and bytes of input read.
    tasks: dict[str, list[dict[str, int]]] = field(default_factory=dict)


class TokenStoreWarning(UserWarning):
    """The token store could not be used (unwritable, full): the build went on without it."""


def _progress(total: int, desc: str, unit: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr, dynamic_ncols=True, leave=False)


def normalized(source: SourcePlan, stages: LLMStages, rows: int = BATCH_ROWS) -> Iterator[Normalized]:
    """The source in the internal form, `rows` records at a time when it streams (memory
    then stays flat in the source's size), else all at once: read, fields resolved, LLM
    stages, layout."""
    if not source.streamable:
        yield normalize_rows(source, stages, read_all(source), 0, partial=False)
        return
    found: set[str] = set()
    yield from normalize_slices(source, stages, read_slices(source, rows), 0, found)
    check_resolved(source, found)


def normalize_slices(source: SourcePlan, stages: LLMStages, frames: Iterator[Any], offset: int,
                     found: set[str]) -> Iterator[Normalized]:
    """Slices of a streamed source in the internal form, rows numbered from `offset`; the
    fields that resolve on some row added to `found`."""
    for frame in frames:
        norm = normalize_rows(source, stages, frame, offset, partial=True)
        offset += frame.height
        found |= norm.resolved
        yield norm


def check_resolved(source: SourcePlan, found: set[str]) -> None:
    """That every mapped field of a streamed source resolved on some row of it."""
    for key in source.spec.fields:
        if key not in found:
            raise resolves_on_no_row(source.spec, source.key, key)


def normalize_source(recipe: Recipe | Plan, index: int, stages: LLMStages | None = None) -> Normalized:
    """Every row of source `index` in the internal form, read whole (checks, previews,
    tests). Without `stages`, LLM stages serve what their caches hold and call nothing."""
    plan = recipe if isinstance(recipe, Plan) else resolve(recipe)
    if stages is None:
        with LLMStages(plan, mode="cache", progress=False) as own:
            return normalize_source(plan, index, own)
    source = plan.sources[index]
    return normalize_rows(source, stages, read_all(source), 0, partial=False)


def normalize_rows(source: SourcePlan, stages: LLMStages, frame: Any, offset: int, partial: bool) -> Normalized:
    rows = resolve_rows(source, frame, offset, partial)
    if source.generate is not None:  # the LLM writes this source's conversations
        rows.frame = stages.generate(rows.frame, source, rows.context)
    elif source.lengthen is not None:
        for key in ("question", "answer"):
            rows.frame = require(rows.frame, rows.resolved[key], source, key, rows.notes)
        texts = {k: as_text(rows.frame, c) for k, c in rows.resolved.items()}
        rows.frame = stages.lengthen(rows.frame, source, texts, rows.resolved["answer"])
    return to_internal(rows)


def protected_paths(plan: Plan) -> list[Path]:
    """What a release may never replace or hold: every input file, the tokenizer's and
    the recipe's folders, and every source's image root."""
    paths = [ref.path for ref in plan.inputs]
    paths += [plan.folder, plan.model.tokenizer_json.parent]
    paths += [s.image_root for s in plan.sources if s.image_root is not None]
    return paths


def input_files(plan: Plan, hashes: Hashes | None = None) -> list[InputFile]:
    """The plan's inputs with their content hashes (call caches by their content, so the
    order calls finished in does not change the release), paths relative to the recipe."""
    hashes = hashes or Hashes()
    base = plan.folder.resolve()
    items = []
    for ref in plan.inputs:
        path = ref.path
        if ref.role.startswith(CACHE_ROLE) or ref.role.startswith("seeds:"):
            if not path.is_file():
                continue  # a table whose cache was never written
        shown = _shown_path(ref.role, path, base)
        if ref.role.startswith(CACHE_ROLE):
            sha256, size = cache_digest(path)
        else:
            sha256, size = hashes.file(path), path.stat().st_size
        items.append(InputFile(role=ref.role, path=shown, sha256=sha256, bytes=size))
    return items


def _shown_path(role: str, path: Path, base: Path) -> str:
    """How the manifest names an input: a built-in pool by its name in the package (not
    where mmrecipe is installed), anything else relative to the recipe's folder, so the
    release id follows content, not the paths of this machine."""
    if role.startswith("pool:") and path.resolve().parent == pools_dir():
        return f"{BUILTIN_PREFIX}{path.name}"
    try:
        return os.path.relpath(path.resolve(), base)
    except ValueError:  # no relative path between them (another drive on Windows)
        return str(path)


def recipe_data(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain data (for manifests), without the file paths; an extending
    recipe gives its merged form."""
    d = msgspec.to_builtins(msgspec.structs.replace(recipe, path=None, bases=[]))
    for key in ("path", "bases"):
        d.pop(key, None)
    # How ids are computed, not what they are (the manifest records the engine used).
    d["model"].pop("tokenizer_engine", None)
    # A one-epoch release is what it was before epochs existed (its id unchanged).
    if d["output"].get("epochs") == 1:
        del d["output"]["epochs"]
    # Audio keys only where set: a recipe without audio has the manifest it had before.
    if not d["model"].get("added_tokens"):
        d["model"].pop("added_tokens", None)
    for medium in ("audio", "video"):  # likewise for video
        if d["model"].get(medium) is None:
            d["model"].pop(medium, None)
        for source in d["source"]:
            if source.get(f"{medium}_root") is None:
                source.pop(f"{medium}_root", None)
    return d


def build(
    recipe: str | Path | Recipe | Plan,
    out: str | Path,
    *,
    threads: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    offline: bool = False,
    retry_failed: bool = False,
    tokenizer_engine: str | None = None,
    cache: str | os.PathLike[str] | bool | None = None,
    engine: str = "local",
    ray_address: str | None = None,
    ray_staging: str | os.PathLike[str] | None = None,
    ray_unit_bytes: int | None = None,
    ray_task_timeout: float | None = None,
) -> BuildResult:
    """Builds the release of `recipe` into the folder `out`. LLM stages call their
    endpoints only for what their caches lack; `offline` makes no call at all (and fails
    naming what is missing), `retry_failed` asks again for calls recorded as failed.
    `tokenizer_engine` ("auto", "hf", "fast") overrides the recipe's `[model] tokenizer_engine`;
    the release is the same for any engine.

    `cache`: the token store's folder (None: `store.cache_dir()`, i.e. `$MMRECIPE_CACHE`,
    `$XDG_CACHE_HOME/mmrecipe` or `~/.cache/mmrecipe`; False: no store). A source whose
    key matches an entry is loaded from it instead of being read and tokenized; the
    release is byte-identical either way.

    `engine`: "local" (this machine) or "ray": every source without LLM stages that the
    token store lacks is read and tokenized by a task on the Ray cluster at `ray_address`
    (None: `$RAY_ADDRESS`, else a new local instance), which writes its token store entry
    to a staging folder the nodes share (`ray_staging`, else the hidden spill folder
    beside `out`); the entries' samples (lengths and media, never their tokens) are loaded
    here and mixed and packed as by the local engine, and a task per shard writes it from
    the records where they lie: the same release, byte for byte. A JSON Lines or JSON array source is cut into work
    units, one task each, of at most `ray_unit_bytes` of its files (a task's memory budget
    for its input; default DEFAULT_UNIT_BYTES), at the slices the local build reads; the
    unit size never changes the release. `ray_task_timeout`: seconds the driver waits with
    no task finishing before it fails the build (default ray.TASK_TIMEOUT)."""
    if threads_problem(threads):
        raise ValueError(threads_problem(threads))
    if engine not in ENGINES:
        raise ValueError(f"engine: {engine!r} is not one of {', '.join(map(repr, ENGINES))}")
    if engine != "ray" and any(v is not None for v in (ray_address, ray_staging, ray_unit_bytes, ray_task_timeout)):
        raise ValueError("ray_address, ray_staging, ray_unit_bytes and ray_task_timeout are for engine='ray'")
    if ray_unit_bytes is not None and (isinstance(ray_unit_bytes, bool) or not isinstance(ray_unit_bytes, int) or ray_unit_bytes < 1):
        raise ValueError(f"ray_unit_bytes: {ray_unit_bytes!r} is not a positive number of bytes")
    if ray_task_timeout is not None and not ray_task_timeout > 0:
        raise ValueError(f"ray_task_timeout: {ray_task_timeout!r} is not a positive number of seconds")
    check_tokenizer_engine(tokenizer_engine)  # before anything is written
    plan = recipe if isinstance(recipe, Plan) else resolve(recipe if isinstance(recipe, Recipe) else load_recipe(recipe))
    audio = plan.recipe.model.audio is not None
    video = plan.recipe.model.video is not None
    out = check_destination(Path(out), overwrite, protected_paths(plan))
    stages = LLMStages(plan, mode="offline" if offline else "online", retry_failed=retry_failed, progress=progress)
    hashes = Hashes()
    store = _open_store(cache)
    with lock(out), stages, staging(out, overwrite) as tmp, tempfile.TemporaryDirectory(dir=tmp.parent, prefix=spill_prefix(out)) as spill, ExitStack() as on_cluster:
        plan, _ = expand_pools(plan, stages)  # before anything keys on the sources' templates
        timings: dict[str, float] = {}
        clock = [time.perf_counter()]

        def lap(stage: str) -> None:
            now = time.perf_counter()
            timings[stage] = timings.get(stage, 0.0) + now - clock[0]
            clock[0] = now

        epochs = plan.recipe.output.epochs
        if store is None and epochs > 1:
            # Without a token store, the build's own in the spill folder: a source every
            # epoch shares (one without templates to draw) is tokenized once.
            store = TokenStore(Path(spill) / "store")
            store.prepare()
            use = _StoreUse(store, plan, hashes, tokenizer_engine, retry_failed, private=True)
        else:
            use = _StoreUse(store, plan, hashes, tokenizer_engine, retry_failed)
        remote = None
        if engine == "ray":
            from .engines.ray import Cluster

            lap("read")
            cluster = on_cluster.enter_context(closing(Cluster(ray_address, progress, ray_task_timeout)))
            entries = Path(spill) / "entries" if ray_staging is None else Path(
                on_cluster.enter_context(tempfile.TemporaryDirectory(dir=ray_staging, prefix=f".{out.name}.entries-{os.getpid()}-")))
            entries.mkdir(exist_ok=True)
            cluster.check_shared(entries)  # before any work: a node that cannot see it fails now, named
            remote = _OnCluster(cluster, entries, threads, tokenizer_engine, ray_unit_bytes or DEFAULT_UNIT_BYTES)
            lap("connect")  # to the cluster
        parts: list[EpochPart] = []
        for epoch in range(epochs):
            use.epoch = epoch
            # Each epoch's compiler spills into a folder of its own (one at a time): on a
            # cluster, in the shared folder, where the tasks writing shards read it.
            epoch_spill = (Path(spill) if remote is None else remote.folder) / f"epoch-{epoch}"
            epoch_spill.mkdir()
            compiler = make_compiler(plan, threads, epoch_spill, tokenizer_engine, epoch)
            if epoch == 0:
                tk_engine, engine_reason = compiler.tokenizer_engine()
                pad = plan.model.pad_token or plan.model.eos_token
                pad_id = compiler.token_id(pad) if pad else None
                if pad_id is None:
                    raise TokenizerError(f"model.tokenizer: pad token {pad!r} is not in the vocabulary")
                image = image_rule(plan, compiler)
                audio_info = audio_rule(plan, compiler)
                video_info = video_rule(plan, compiler)
            label = "" if epochs == 1 else f" (epoch {epoch}, {epoch + 1}/{epochs})"
            notes = _tokenize(plan, stages, compiler, lap, progress, use, remote, label)
            summary = msgspec.json.decode(compiler.finish())
            for stats, source in zip(summary["sources"], plan.sources):
                # e.g. rows a join left out under on_error = "skip", answers an LLM lengthened
                stats["notes"] = stages.pool_note(source) + notes[source.index] + stages.notes(source.name)
            lap("pack")
            with _progress(summary["sequences"], "write" + label, "seq", progress) as wbar:
                parts.append(_write_epoch(tmp, epoch, compiler, summary, plan.recipe.output.shard_sequences, wbar, audio, video, remote))
            if remote is not None:
                remote.finish_epoch(compiler, use)  # its entries into the store, or removed
            del compiler  # its spill goes before the next epoch's
            shutil.rmtree(epoch_spill, ignore_errors=True)
            if epoch == 0:
                first = summary
            lap("write")
        on_cluster.close()  # the cluster's work is done (and the staged entries loaded)
        if remote is not None:
            lap("connect")  # and disconnect
        manifest = _manifest(plan, int(pad_id), parts, first, image, hashes, audio_info, video_info)
        manifest.tokenizer_engine = {"engine": tk_engine, "reason": engine_reason}
        write_json(tmp / MANIFEST, manifest)
        lap("write")
    use.prune()
    return BuildResult(path=out, summary=first, manifest=manifest, timings=timings, llm=stages.summary(), store=use.report(),
                       epochs=[p.totals for p in parts] if epochs > 1 else [], tasks=remote.tasks if remote else {})


ENGINES = ("local", "ray")


def _write_epoch(tmp: Path, epoch: int, compiler: Any, summary: dict[str, Any], per_shard: int, bar: Any,
                 audio: bool = False, video: bool = False, remote: _OnCluster | None = None) -> EpochPart:
    """Epoch `epoch`'s shards (with the audio columns when `audio`, the video columns when
    `video`) and stats.json, in its folder of the staged release (the shards written by
    cluster tasks with `remote`)."""
    prefix = epoch_folder(epoch)
    folder = tmp / prefix
    folder.mkdir(exist_ok=True)
    if remote is None:
        shards = write_shards(folder, compiler.emit, summary["sequences"], per_shard, bar, audio, video)
    else:
        shards = remote.write_shards(folder, epoch, compiler, summary["sequences"], per_shard, bar, audio, video)
    if prefix:
        shards = [msgspec.structs.replace(sh, path=f"{prefix}/{sh.path}") for sh in shards]
    stats = f"{prefix}/{STATS}" if prefix else STATS
    write_json(tmp / stats, summary)
    totals = {k: v for k, v in summary.items() if k != "sources"}
    return EpochPart(epoch=epoch, shards=shards, totals=totals, stats=stats, stats_sha256=file_sha256(tmp / stats))


def _open_store(cache: str | os.PathLike[str] | bool | None) -> TokenStore | None:
    """The token store `cache` names, its folder created; None when off or unusable (with
    a warning: the build goes on without it)."""
    if cache is False:
        return None
    folder = cache_dir(None if cache is None or cache is True else cache)
    store = TokenStore(folder)
    try:
        store.prepare()
    except OSError as e:
        _warn(f"token store {folder} cannot be used ({e}); building without it")
        return None
    return store


def _warn(message: str) -> None:
    warnings.warn(message, TokenStoreWarning, stacklevel=3)


class _StoreUse:
    """One build's use of the token store: entries loaded, sources saved, what to report."""

    def __init__(self, store: TokenStore | None, plan: Plan, hashes: Hashes, engine: str | None, retry_failed: bool,
                 private: bool = False) -> None:
        self.store, self.plan, self.hashes, self.engine = store, plan, hashes, engine
        self.retry_failed = retry_failed
        self.private = private  # a store of this build alone (in its spill folder): not reported, not pruned
        self.epoch = 0  # the epoch being built
        self.reused: list[str] = []
        self.tokenized: list[str] = []
        self.misses: dict[str, str] = {}
        self.saved = 0
        self.warnings: list[str] = []

    def key(self, source: SourcePlan) -> str:
        return source_key(self.plan, source, self.hashes, self.engine, self.epoch)

    def named(self, source: SourcePlan) -> str:
        """The source as the report names it: with its epoch past the first."""
        return source.name if self.epoch == 0 else f"{source.name} (epoch {self.epoch})"

    def load(self, compiler: Any, source: SourcePlan) -> list[str] | None:
        """The source's notes when it was loaded from its entry, else None."""
        if self.store is None:
            return None
        if self.retry_failed and (source.lengthen is not None or source.generate is not None):
            self.misses[self.named(source)] = "--retry-failed asks its LLM table again"
            return None
        key, seq_len = self.key(source), self.plan.recipe.output.seq_len
        whys = []
        # An entry made at this seq_len, then one valid at any seq_len its samples fit.
        for path in (self.store.path(key, seq_len), self.store.path(key)):
            meta, why = compiler.load_source(source.index, key, str(path))
            if meta is not None:
                self.store.touch(path)
                self.reused.append(self.named(source))
                return list(msgspec.json.decode(meta)["notes"])
            whys.append(why)
        self.misses[self.named(source)] = whys[-1] if whys[0].startswith("open:") else whys[0]
        return None

    def save(self, compiler: Any, source: SourcePlan, notes: list[str]) -> None:
        """Saves the source just tokenized (its key taken again: an LLM stage may have
        added calls to its cache meanwhile)."""
        self.tokenized.append(self.named(source))
        if self.store is None:
            return
        try:
            key = self.key(source)
            path = self.entry_path(compiler, source, key)
            size = compiler.save_source(source.index, key, entry_meta(notes), str(path))
            self.store.describe(path, source.name, self.plan.recipe.recipe.name, size)
            self.saved += size
        except (MMRecipeError, OSError) as e:
            self.warning(f"token store: source '{source.name}' not saved ({e}); the build goes on")

    def entry_path(self, compiler: Any, source: SourcePlan, key: str) -> Path:
        """Where the entry of `source` (in `compiler`) goes in the store: valid at any
        seq_len its samples fit unless the overlong policy changed one."""
        assert self.store is not None
        seq_len = self.plan.recipe.output.seq_len
        return self.store.path(key) if compiler.source_max_len(source.index) <= seq_len else self.store.path(key, seq_len)

    def stored(self, source: SourcePlan) -> bool:
        """Whether the store has a file where the entry of `source` would be (to be
        loaded, not tokenized elsewhere; `load` then tells whether it is valid)."""
        if self.store is None or (self.retry_failed and (source.lengthen is not None or source.generate is not None)):
            return False
        key = self.key(source)
        return self.store.path(key, self.plan.recipe.output.seq_len).is_file() or self.store.path(key).is_file()

    def adopt(self, compiler: Any, source: SourcePlan, staged: Path) -> None:
        """Takes the entry a cluster task saved for `source` (already loaded into
        `compiler`) into the store: moved when it can be, else copied and renamed."""
        if self.store is None:
            return
        try:
            size = staged.stat().st_size
            path = self.entry_path(compiler, source, self.key(source))
            try:
                os.replace(staged, path)
            except OSError:  # another file system
                part = path.with_name(f".{path.name}.tmp-{os.getpid()}-adopt")
                shutil.copyfile(staged, part)
                os.replace(part, path)
            self.store.describe(path, source.name, self.plan.recipe.recipe.name, size)
            self.saved += size
        except (MMRecipeError, OSError) as e:
            self.warning(f"token store: source '{source.name}' not saved ({e}); the build goes on")

    def warning(self, message: str) -> None:
        self.warnings.append(message)
        _warn(message)

    def prune(self) -> None:
        if self.store is None or self.private:
            return
        try:
            self.store.prune(size_cap())
        except (OSError, ValueError) as e:
            self.warning(f"token store: not pruned ({e})")

    def report(self) -> dict[str, Any]:
        return {
            "folder": str(self.store.folder) if self.store and not self.private else None,
            "reused": self.reused,
            "tokenized": self.tokenized,
            "misses": self.misses,
            "saved_bytes": self.saved,
            "warnings": self.warnings,
        }


def entry_meta(notes: list[str]) -> bytes:
    """The meta a token store entry holds: the source's notes."""
    return msgspec.json.encode({"notes": notes})


def tokenize_entry(plan: Plan, index: int, key: str, path: str, threads: int, tokenizer_engine: str | None,
                   epoch: int = 0, unit: Unit | None = None, batch_rows: int = BATCH_ROWS) -> dict[str, Any]:
    """Reads and tokenizes source `index` of `plan` (one without LLM stages; at `epoch`),
    or only its work `unit` (read `batch_rows` records a slice, as the driver's build reads
    them), with a compiler of its own, and saves its token store entry at `path` (written
    beside it and renamed into place: running it again gives the same file). What a cluster
    task runs; returns small metadata only. A unit's entry holds its notes and the fields
    that resolved on its rows (whether each resolves somewhere is the whole source's check)."""
    source = plan.sources[index]
    with tempfile.TemporaryDirectory(prefix="mmrecipe-task-") as spill, LLMStages(plan, mode="offline", progress=False) as stages:
        compiler = make_compiler(plan, threads, Path(spill), tokenizer_engine, epoch)
        found: list[str] = []
        resolved: set[str] = set()
        rows = samples = 0
        norms = (normalized(source, stages, batch_rows) if unit is None
                 else normalize_slices(source, stages, read_unit(source, unit, batch_rows), unit.row, resolved))
        for norm in norms:
            rows += len(norm)
            for start in range(0, len(norm), batch_rows):
                samples += compiler.add_batch(index, batch_columns(norm, start, batch_rows))
            found += norm.notes
        meta = (entry_meta(found + stages.notes(source.name)) if unit is None
                else msgspec.json.encode({"notes": found, "resolved": sorted(resolved)}))
        size = compiler.save_source(index, key, meta, path)
        max_len = compiler.source_max_len(index)
        del compiler
    return {"path": path, "rows": rows, "samples": samples, "bytes": size, "max_len": max_len}


def join_units(plan: Plan, index: int, key: str, paths: list[str], meta: bytes, path: str, tokenizer_engine: str | None,
               epoch: int = 0) -> int:
    """Saves at `path` the token store entry of source `index` whose work units' entries
    are `paths` (in row order): the entry a local build saves for it, byte for byte (what
    a cluster task runs; the units' records are read where they lie). Returns its size."""
    with tempfile.TemporaryDirectory(prefix="mmrecipe-task-") as spill:
        compiler = make_compiler(plan, 1, Path(spill), tokenizer_engine, epoch)
        for n, unit in enumerate(paths):
            found, why = compiler.load_unit(index, f"{key}/{n}", unit, attach=True)
            if found is None:
                raise ReleaseError(f"source '{plan.sources[index].name}': the entry of work unit {n} at {unit} cannot be loaded ({why})")
        size = compiler.save_source(index, key, meta, path)
        del compiler
    return int(size)


#: Shards planned and not yet written by their cluster tasks, at most, per CPU of the
#: cluster: enough to keep every CPU busy while the driver plans the next (a plan is small:
#: its rows' segments, never their tokens).
SHARDS_IN_FLIGHT = 2


class _OnCluster:
    """The sources a build tokenizes on a Ray cluster, each saving token store entries
    under `folder`: a JSON Lines or JSON array source cut into work units of at most `unit_bytes` of its
    files (`sources.units`), one task each; any other source one task."""

    def __init__(self, cluster: Any, folder: Path, threads: int, tokenizer_engine: str | None,
                 unit_bytes: int = DEFAULT_UNIT_BYTES) -> None:
        self.cluster, self.folder, self.threads, self.engine = cluster, folder, threads, tokenizer_engine
        self.unit_bytes = unit_bytes
        self.sent: dict[int, tuple[str, list[Unit] | None]] = {}  # source index → its key and units
        self.cuts: dict[int, list[Unit]] = {}  # each source's units, cut once for every epoch
        #: Per source tokenized on the cluster (by name, epoch included): its tasks' rows and bytes.
        self.tasks: dict[str, list[dict[str, int]]] = {}
        #: The epoch's entries the driver's compiler reads in place (until its shards are
        #: written), and those to go into the token store then: (source, entry, the task joining it).
        self.held: list[Path] = []
        self.to_store: list[tuple[SourcePlan, Path, str | None]] = []

    def submit(self, plan: Plan, use: _StoreUse) -> None:
        """The tasks for each source without LLM stages (those run here) that the store lacks
        (at the epoch `use` is at: a build submits once per epoch); a source's units each
        submitted as soon as it is cut, so that the cluster works while the driver cuts."""
        self.sent, self.plan = {}, plan
        for source in plan.sources:
            if source.lengthen is not None or source.generate is not None or use.stored(source):
                continue
            key, named = use.key(source), use.named(source)
            units: list[Unit] = []
            if cuttable(source):
                cut = self.cuts.get(source.index)
                for n, unit in enumerate(cut_units(source, BATCH_ROWS, self.unit_bytes) if cut is None else cut):
                    name = f"{key}/{n}"
                    path = self.folder / f"{key}-{source.index}-{n}.tok"
                    self.cluster.submit(name, tokenize_entry, plan, source.index, name, str(path), self.threads, self.engine,
                                        use.epoch, unit, BATCH_ROWS, label=f"source '{named}' (work unit {n + 1}, rows {unit.row}..)")
                    units.append(unit)
                self.cuts[source.index] = units
            if not units:  # read whole: not cut, or no records (the whole read's error)
                path = self.folder / f"{key}-{source.index}.tok"
                self.cluster.submit(key, tokenize_entry, plan, source.index, key, str(path), self.threads, self.engine,
                                    use.epoch, None, BATCH_ROWS, label=f"source '{named}'")
            self.sent[source.index] = (key, units or None)
        self.cluster.start_bar()

    def load(self, compiler: Any, source: SourcePlan, use: _StoreUse, stages: LLMStages) -> list[str]:
        """Waits for the tasks of `source` and loads the entries they saved (a source's units
        in order, each appended to what came before), their token records attached where
        they lie: the driver reads only the samples' lengths and media, never their tokens
        (the tasks writing shards read those). Returns the source's notes. An error of the
        source is the one the local build gives: the first unit's that fails, in row order.
        The source goes into the token store after the epoch's shards (`finish_epoch`)."""
        key, units = self.sent[source.index]
        use.tokenized.append(use.named(source))
        if units is None:
            info = self.cluster.result(key)
            meta, why = compiler.load_source(source.index, key, info["path"], attach=True)
            if meta is None:
                raise ReleaseError(f"source '{source.name}': the entry its cluster task saved at {info['path']} cannot be loaded ({why})")
            self.held.append(Path(info["path"]))
            self.to_store.append((source, Path(info["path"]), None))
            read = sum(f.stat().st_size for f in source.all_files if f.is_file())
            self.tasks[use.named(source)] = [{"rows": int(info["rows"]), "bytes": read}]
            return list(msgspec.json.decode(meta)["notes"])
        notes: list[str] = []
        resolved: set[str] = set()
        done = []
        paths = []
        for n, unit in enumerate(units):
            name = f"{key}/{n}"
            info = self.cluster.result(name)
            meta, why = compiler.load_unit(source.index, name, info["path"], attach=True)
            if meta is None:
                raise ReleaseError(f"source '{source.name}': the entry its cluster task {n} saved at {info['path']} "
                                   f"cannot be loaded ({why})")
            paths.append(info["path"])
            found = msgspec.json.decode(meta)
            notes += found["notes"]
            resolved |= set(found["resolved"])
            done.append({"rows": unit.records, "bytes": unit.bytes})
        self.held += map(Path, paths)
        check_resolved(source, resolved)
        self.tasks[use.named(source)] = done
        if use.store is not None:
            # Saved whole, as a local build saves it (a later build, on either engine, loads
            # it), by a task that joins the units' entries: the driver never reads them.
            merged = self.folder / f"{key}-{source.index}.tok"
            self.cluster.submit(f"{key}/whole", join_units, self.plan, source.index, key, paths,
                                entry_meta(notes + stages.notes(source.name)), str(merged), self.engine, use.epoch,
                                label=f"source '{use.named(source)}' (its token store entry)", counted=False)
            self.to_store.append((source, merged, f"{key}/whole"))
        return notes

    def finish_epoch(self, compiler: Any, use: _StoreUse) -> None:
        """After the epoch's shards: its sources' entries into the token store (moved, or
        copied where the store is on another file system), the rest removed."""
        for source, path, task in self.to_store:
            try:
                if task is not None:
                    self.cluster.result(task)
            except MMRecipeError as e:
                use.warning(f"token store: source '{source.name}' not saved ({e}); the build goes on")
                continue
            use.adopt(compiler, source, path)
        for path in self.held:
            path.unlink(missing_ok=True)
        for _, path, _ in self.to_store:
            path.unlink(missing_ok=True)
        self.held, self.to_store = [], []

    def write_shards(self, folder: Path, epoch: int, compiler: Any, rows: int, per_shard: int, bar: Any,
                     audio: bool, video: bool) -> list[Shard]:
        """The shards `write_shards` writes, byte for byte: the driver plans each shard's
        rows (`Compiler.shard_plan`: their segments and the files holding their records),
        and a task per shard emits, encodes, compresses, hashes and writes it into the
        staging folder, from where it is moved into `folder`. The driver never reads a
        token; at most SHARDS_IN_FLIGHT plans per CPU wait in Ray's object store."""
        (folder / DATA).mkdir()
        ranges = shard_ranges(rows, per_shard)
        shards: list[Shard] = []
        bar.set_postfix_str(f"shards written by the cluster's {self.cluster.cpus} CPUs")

        def staged(k: int) -> Path:
            return self.folder / f"shard-{epoch}-{k}.parquet"

        def finish(k: int) -> None:
            name, lo, hi = ranges[k]
            sha256, tokens = self.cluster.result(f"shard/{epoch}/{k}")
            shutil.move(staged(k), folder / name)
            shards.append(Shard(path=name, sha256=sha256, sequences=hi - lo, tokens=int(tokens)))
            bar.update(hi - lo)

        limit = max(1, self.cluster.cpus * SHARDS_IN_FLIGHT)
        for k, (name, lo, hi) in enumerate(ranges):
            if k >= limit:
                finish(k - limit)
            self.cluster.submit(f"shard/{epoch}/{k}", write_planned_shard, str(staged(k)), compiler.shard_plan(lo, hi), audio, video,
                                label=f"shard {'/'.join(filter(None, (epoch_folder(epoch), name)))}", counted=False)
        for k in range(max(0, len(ranges) - limit), len(ranges)):
            finish(k)
        return shards


def _tokenize(plan: Plan, stages: LLMStages, compiler: Any, lap: Any, progress: bool, use: _StoreUse,
              remote: _OnCluster | None = None, label: str = "") -> list[list[str]]:
    """Loads each source from the token store, or reads and tokenizes it (its tokens wait
    in the spill) and saves it there; returns each source's notes. With `remote`, the
    sources it takes are tokenized on the cluster meanwhile, and loaded in their turn."""
    notes: list[list[str]] = []
    if remote is not None:
        remote.submit(plan, use)
        lap("read")
    with _progress(0, "tokenize" + label, "sample", progress) as bar:
        for source in plan.sources:
            bar.set_postfix_str(f"{source.name} ({source.index + 1}/{len(plan.sources)} sources)")
            if remote is not None and source.index in remote.sent:
                lap("read")
                notes.append(remote.load(compiler, source, use, stages))
                lap("tokenize")  # the wait for the cluster, and the entry loaded
                continue
            stored = None
            if use.store is not None:
                lap("read")  # what came before (as without a store)
                stored = use.load(compiler, source)
                lap("store")
            if stored is not None:
                notes.append(stored)
                continue
            found: list[str] = []
            for norm in normalized(source, stages, BATCH_ROWS):
                bar.total += len(norm)  # known as the source is read
                bar.refresh()
                lap("read")
                for start in range(0, len(norm), BATCH_ROWS):
                    columns = batch_columns(norm, start, BATCH_ROWS)
                    lap("read")
                    compiler.add_batch(source.index, columns)
                    lap("tokenize")
                    bar.update(min(BATCH_ROWS, len(norm) - start))
                found += norm.notes
            # The stats' notes: the reading's, then the LLM stages' (stored as one list).
            use.save(compiler, source, found + stages.notes(source.name))
            if use.store is not None:
                lap("store")
            notes.append(found)
    return notes


def image_rule(plan: Plan, compiler: Any) -> dict[str, Any] | None:
    """The recipe's image rule with the ids of its tokens, for the loader."""
    return _rule_with_ids(plan.recipe.model.image, compiler, ("patch", "merge", "min_pixels", "max_pixels"))


def audio_rule(plan: Plan, compiler: Any) -> dict[str, Any] | None:
    """The recipe's audio rule with the ids of its tokens, for the loader."""
    return _rule_with_ids(plan.recipe.model.audio, compiler, ("rule", "chunk_seconds", "hop_length", "pool", "long"))


def video_rule(plan: Plan, compiler: Any) -> dict[str, Any] | None:
    """The recipe's video rule with the ids of its tokens, for the loader."""
    keys = ("rule", "fps", "min_frames", "max_frames", "min_pixels", "max_pixels", "patch", "merge", "temporal_patch",
            "cap_pixels_per_frame", "max_video_tokens")
    return _rule_with_ids(plan.recipe.model.video, compiler, keys)


def _rule_with_ids(spec: Any, compiler: Any, rule_keys: tuple[str, ...]) -> dict[str, Any] | None:
    """A media rule ([model] image or audio) as set, without the keys of the computed rule
    when it is a fixed count, with the ids of its token and wrappers."""
    if spec is None:
        return None
    rule = {k: v for k, v in msgspec.to_builtins(spec).items() if v is not None}
    if spec.count is not None:
        for key in rule_keys:
            rule.pop(key, None)
    for key in ("token", "start", "end"):
        if rule.get(key) is not None:
            rule[f"{key}_id"] = compiler.token_id(rule[key])
    return rule


def audio_roots(plan: Plan) -> dict[str, str]:
    """Each audio source's audio root relative to the recipe's folder."""
    base = plan.folder.resolve()
    return {s.name: os.path.relpath(s.audio_root.resolve(), base) for s in plan.sources
            if s.audio_root is not None and ("audio" in s.spec.fields or "audios" in s.spec.fields)}


def video_roots(plan: Plan) -> dict[str, str]:
    """Each video source's video root relative to the recipe's folder."""
    base = plan.folder.resolve()
    return {s.name: os.path.relpath(s.video_root.resolve(), base) for s in plan.sources
            if s.video_root is not None and ("video" in s.spec.fields or "videos" in s.spec.fields)}


def image_roots(plan: Plan) -> dict[str, str]:
    """Each source's image root relative to the recipe's folder (never this machine's path)."""
    base = plan.folder.resolve()
    return {s.name: os.path.relpath(s.image_root.resolve(), base) for s in plan.sources if s.image_root is not None}


def _manifest(
    plan: Plan, pad_id: int, parts: list[EpochPart], summary: dict[str, Any], image: dict[str, Any] | None, hashes: Hashes,
    audio: dict[str, Any] | None = None, video: dict[str, Any] | None = None,
) -> Manifest:
    """The manifest: epoch 0 at the top level (what a one-epoch build writes), and every
    epoch listed when there are more."""
    recipe = plan.recipe
    manifest = Manifest(
        format=FORMAT,
        mmrecipe_version=__version__,
        name=recipe.recipe.name,
        version=recipe.recipe.version,
        seed=recipe.recipe.seed,
        recipe=recipe_data(recipe),
        inputs=input_files(plan, hashes),
        sources=[s.name for s in plan.sources],
        chat_template=plan.model.chat_template,
        seq_len=recipe.output.seq_len,
        pad_token_id=pad_id,
        shards=parts[0].shards,
        totals=parts[0].totals,
        image_roots=image_roots(plan),
        image=image,
        stats_sha256=parts[0].stats_sha256,
        epochs=parts if len(parts) > 1 else msgspec.UNSET,
    )
    if audio is not None:
        manifest.audio, manifest.audio_roots = audio, audio_roots(plan)
    if video is not None:
        manifest.video, manifest.video_roots = video, video_roots(plan)
    manifest.release_id = release_id_of(msgspec.json.encode(manifest))
    return manifest
