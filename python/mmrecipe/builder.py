"""`recipe build`: recipe → normalized sources → Rust core (render, tokenize, mask, mix,
pack) → release directory. Python orchestrates whole batches; no loop runs per sample."""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from . import __version__, _core
from .buffers import batch_arguments
from .callcache import CACHE_ROLE, cache_digest
from .errors import TokenizerError
from .hashing import bytes_sha256, file_sha256
from .model import ModelFiles, resolve_model
from .recipe import Recipe, _builtin_pool_path, load_pool, load_recipe, to_dict
from .release import FORMAT, MANIFEST, STATS, InputFile, Manifest, spill_prefix, staging, write_json, write_shards
from .sources import Normalized, iter_normalized, source_files, template_fields
from .stages import LLMStages

BATCH_ROWS = 8192

# LLaVA-1.5's wording for short-answer data, appended to the instruction.
SHORT_ANSWER = {
    "word": "\nAnswer the question using a single word or phrase.",
    "sentence": "\nAnswer the question using a single sentence.",
}


@dataclass
class BuildResult:
    path: Path
    summary: dict[str, Any]
    manifest: Manifest
    #: Seconds per stage: read (sources → normalized columns), tokenize (render, tokenize,
    #: mask), pack (mixture + packing), write (shards, hashes, manifest).
    timings: dict[str, float] = field(default_factory=dict)
    #: Per LLM table: rows, served from the cache, calls made, failed, missing.
    llm: dict[str, dict[str, int]] = field(default_factory=dict)


def _progress(total: int, desc: str, unit: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr, dynamic_ncols=True, leave=False)


def make_plan(recipe: Recipe, model: ModelFiles) -> dict[str, Any]:
    """The resolved build plan the Rust core executes (needs no source data)."""
    from .recipe import resolve_path

    total = recipe.mixture.total
    mixture: Any = "natural" if isinstance(total, str) else dict(total)
    plan_sources = []
    for i, spec in enumerate(recipe.source):
        if spec.instructions is None:
            templates: list[str] = []
        elif isinstance(spec.instructions, list):
            templates = list(spec.instructions)
        else:
            templates = load_pool(spec.instructions, recipe).templates
        if spec.layout == "caption" and not templates:
            templates = load_pool("caption-brief", recipe).templates
        if spec.short_answer:
            templates = [t + SHORT_ANSWER[spec.short_answer] for t in (templates or ["{question}"])]
        if spec.image_root:
            root: Path | None = resolve_path(recipe, spec.image_root)
        else:
            files = source_files(recipe, i)
            root = files[0].parent if files else None
        plan_sources.append(
            {
                "name": spec.name,
                "templates": templates,
                "fields": template_fields(spec),
                "image_root": str(root) if root else None,
                "weight": spec.weight,
                "on_error": spec.on_error,
                "max_epochs": spec.max_epochs,
            }
        )
    image = msgspec.to_builtins(recipe.model.image) if recipe.model.image else None
    return {
        "seed": recipe.recipe.seed,
        "chat_template": model.chat_template,
        "bos_token": model.bos_token,
        "eos_token": model.eos_token,
        "image": image,
        "seq_len": recipe.output.seq_len,
        "train_on": recipe.output.train_on,
        "train_on_eos": recipe.output.train_on_eos,
        "overlong": recipe.output.overlong,
        "packing": recipe.output.packing,
        "shuffle": recipe.output.shuffle,
        "mixture": mixture,
        "alpha": recipe.mixture.alpha,
        "sources": plan_sources,
    }


def make_compiler(recipe: Recipe, model: ModelFiles, threads: int = 0, spill_dir: Path | None = None) -> Any:
    plan = make_plan(recipe, model)
    return _core.Compiler(msgspec.json.encode(plan), str(model.tokenizer_json), threads, str(spill_dir) if spill_dir else None)


def _inputs(recipe: Recipe, model: ModelFiles, sources: list[Normalized], stages: LLMStages) -> list[InputFile]:
    base = recipe.path.parent if recipe.path else Path.cwd()

    def entry(role: str, path: Path) -> InputFile:
        try:
            shown = str(path.resolve().relative_to(base.resolve()))
        except ValueError:
            shown = str(path)
        if role.startswith(CACHE_ROLE):  # its content, not the order calls finished in
            sha256, size = cache_digest(path)
            return InputFile(role=role, path=shown, sha256=sha256, bytes=size)
        return InputFile(role=role, path=shown, sha256=file_sha256(path), bytes=path.stat().st_size)

    items = []
    if recipe.path:
        items.append(entry("recipe", recipe.path))
    items += [entry("recipe-base", base_file) for base_file in recipe.bases]
    items += [entry("tokenizer", f) for f in model.files]
    for norm in sources:
        items += [entry(f"source:{norm.spec.name}", f) for f in norm.files]
    pools = {s.instructions for s in recipe.source if isinstance(s.instructions, str) and s.instructions not in recipe.pool}
    if any(s.layout == "caption" and s.instructions is None for s in recipe.source):
        pools.add("caption-brief")
    for name in sorted(pools):
        path = _builtin_pool_path(name)
        if path:
            items.append(entry(f"pool:{name}", path))
    used = {s.lengthen for s in recipe.source if s.lengthen}
    lengthen_pools = {t.pool for name, t in recipe.lengthen.items() if t.pool and t.pool not in recipe.pool and name in used}
    for name in sorted(lengthen_pools - pools):
        path = _builtin_pool_path(name)
        if path:
            items.append(entry(f"pool:{name}", path))
    # The call caches (a release rebuilds from them without the endpoint) and seed examples.
    items += [entry(role, path) for role, path in sorted(stages.used.items()) if path.is_file()]
    return items


def build(
    recipe: str | Path | Recipe,
    out: str | Path,
    *,
    threads: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    offline: bool = False,
    retry_failed: bool = False,
) -> BuildResult:
    """Builds the release of `recipe` into the folder `out`. LLM stages call their
    endpoints only for what their caches lack; `offline` makes no call at all (and fails
    naming what is missing), `retry_failed` asks again for calls recorded as failed."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    out = Path(out)
    stages = LLMStages(recipe, mode="offline" if offline else "online", retry_failed=retry_failed, progress=progress)
    with stages, staging(out, overwrite) as tmp, tempfile.TemporaryDirectory(dir=tmp.parent, prefix=spill_prefix(out)) as spill:
        clock = time.perf_counter()
        timings: dict[str, float] = {}

        def lap(stage: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            timings[stage] = timings.get(stage, 0.0) + now - clock
            clock = now

        model = resolve_model(recipe)
        compiler = make_compiler(recipe, model, threads, Path(spill))
        pad = model.pad_token or model.eos_token
        pad_id = compiler.token_id(pad) if pad else None
        if pad_id is None:
            raise TokenizerError(f"model.tokenizer: pad token {pad!r} is not in the vocabulary")

        # One source at a time: read, tokenize, let go; its tokens wait in the spill.
        sources: list[Normalized] = []
        bar = _progress(0, "tokenize", "sample", progress)
        with bar:
            for i, spec in enumerate(recipe.source):
                bar.set_postfix_str(f"{spec.name} ({i + 1}/{len(recipe.source)} sources)")
                notes: list[str] = []
                for norm in iter_normalized(recipe, i, BATCH_ROWS, stages):
                    bar.total += len(norm)  # known as the source is read
                    bar.refresh()
                    lap("read")
                    for start in range(0, len(norm), BATCH_ROWS):
                        args = batch_arguments(norm, start, BATCH_ROWS)
                        lap("read")
                        compiler.add_batch(i, args)
                        lap("tokenize")
                        bar.update(min(BATCH_ROWS, len(norm) - start))
                    notes += norm.notes
                    norm.frame = norm.frame.clear()
                norm.notes = notes
                sources.append(norm)
        summary = msgspec.json.decode(compiler.finish())
        for stats, norm in zip(summary["sources"], sources):
            # e.g. rows a join left out under on_error = "skip", answers an LLM lengthened
            stats["notes"] = list(norm.notes) + stages.notes(norm.spec.name)
        lap("pack")

        rows = summary["sequences"]
        with _progress(rows, "write", "seq", progress) as wbar:
            shards = write_shards(tmp, compiler.emit, rows, recipe.output.shard_sequences, wbar)
        del compiler

        recipe_dict = to_dict(recipe)
        manifest = Manifest(
            format=FORMAT,
            mmrecipe_version=__version__,
            name=recipe.recipe.name,
            version=recipe.recipe.version,
            seed=recipe.recipe.seed,
            recipe=recipe_dict,
            inputs=_inputs(recipe, model, sources, stages),
            sources=[s.name for s in recipe.source],
            chat_template=model.chat_template,
            seq_len=recipe.output.seq_len,
            pad_token_id=int(pad_id),
            shards=shards,
            totals={k: v for k, v in summary.items() if k != "sources"},
        )
        manifest.release_id = bytes_sha256(msgspec.json.encode(manifest))
        write_json(tmp / STATS, summary)
        write_json(tmp / MANIFEST, manifest)
        lap("write")
    return BuildResult(path=out, summary=summary, manifest=manifest, timings=timings, llm=stages.summary())
