"""A checked recipe resolved once into an immutable `Plan`: every path absolute, source
files found (globs expanded) with their formats, pools loaded into each source's
templates, [[generate]] tables materialized as sources, image roots decided, LLM tables
resolved (cache file, seed, templates), the model's files and chat template loaded, and
the list of inputs whose content the release records.

    Recipe ──resolve()──▶ Plan
                            ├─ model: ModelFiles (tokenizer.json, chat template, tokens)
                            ├─ sources: [SourcePlan] (written sources, then generated ones)
                            │     files, formats, join, templates, image_root,
                            │     lengthen: LengthenPlan | None, generate: GeneratePlan | None
                            ├─ pools: [PoolPlan] (pools an LLM expands from seeds; until the
                            │     LLM stage fills them in, sources hold their fixed part)
                            └─ inputs: [InputRef] (role, file): hashed into the manifest

Everything after this module reads the plan and never goes back to the recipe."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import msgspec

from ..errors import SourceError
from .model import ModelFiles, load_model
from .pools import builtin_pool_path, load_pool
from .schema import LAYOUT_FIELDS, RESERVED_FIELDS, GenerateSpec, LengthenSpec, PoolGenerateSpec, PoolSpec, Recipe, SourceSpec
from .validate import is_glob, lengthen_fields

# LLaVA-1.5's wording for short-answer data, appended to the instruction.
SHORT_ANSWER = {
    "word": "\nAnswer the question using a single word or phrase.",
    "sentence": "\nAnswer the question using a single sentence.",
}
# The role prefix of a call cache among the inputs: hashed by content, not by bytes.
CACHE_ROLE = "cache:"
FORMATS = ("jsonl", "json", "parquet", "csv", "tsv", "webdataset")
# The pool a source of these layouts draws its instructions from when it names none.
DEFAULT_POOLS = {"caption": "caption-brief", "asr": "asr"}
# Where a source keeps its images inside its files (sources/containers.py).
WEBDATASET, PARQUET_IMAGES = "webdataset", "parquet"


class InputRef(msgspec.Struct, frozen=True):
    """A file the release depends on; `role` says how (recipe, tokenizer, source:NAME …)."""

    role: str
    path: Path


class JoinPlan(msgspec.Struct, frozen=True):
    file: Path
    format: str
    json_key: str | None
    left_on: str
    right_on: str


class LengthenPlan(msgspec.Struct, frozen=True):
    """A [lengthen.NAME] table as one source uses it."""

    table: str  # "lengthen.NAME": the name in counts, caches and notes
    spec: LengthenSpec
    seed: int
    fields: list[str]  # placeholders the prompt or templates may use
    templates: list[str]  # method "template": the sentence templates
    cache: Path | None  # method "llm": the call cache


class GeneratePlan(msgspec.Struct, frozen=True):
    """A [[generate]] table: the LLM writes its source's conversations."""

    table: str  # "generate.NAME"
    key: str  # "generate[j]", for messages
    spec: GenerateSpec
    seed: int
    seeds: Path | None
    cache: Path


class PoolPlan(msgspec.Struct, frozen=True):
    """A [pool.NAME] whose instructions an LLM writes from seeds."""

    name: str
    table: str  # "pool.NAME": the name in counts, caches and notes
    spec: PoolGenerateSpec
    fixed: list[str]  # the pool's own templates, then the seeds (each once)
    task: str  # the pool's task or description, for the prompt
    seed: int
    cache: Path


class SourcePlan(msgspec.Struct, frozen=True):
    index: int
    name: str
    key: str  # the recipe key for messages: "source[i]" or "generate[j]"
    spec: SourceSpec
    files: list[Path]
    formats: list[str]  # per file
    join: JoinPlan | None
    templates: list[str]  # instruction templates, short-answer wording included
    template_fields: list[str]  # mapped fields templates may use
    image_root: Path | None
    lengthen: LengthenPlan | None = None
    # The folder audio paths are relative to: audio_root, else the first file's folder.
    audio_root: Path | None = None
    # The folder video paths are relative to: video_root, else the first file's folder.
    video_root: Path | None = None
    generate: GeneratePlan | None = None
    # Images inside the source's files, read in place: "webdataset" (tar shards) or
    # "parquet" (an image column of bytes, `image_column`); None: loose image files.
    container: str | None = None
    image_column: str | None = None

    @property
    def streamable(self) -> bool:
        """Whether the source can be read a slice at a time: JSON Lines, JSON arrays or
        parquet, with no step that needs all rows at once (joins, group_by, a list under a key)."""
        spec = self.spec
        if spec.group_by is not None or spec.join is not None or spec.json_key:
            return False
        if self.generate is not None:  # context fields are checked on every row before any call
            return False
        if self.container is not None:  # a shard or a row group at a time
            return True
        return all(f in ("jsonl", "json", "parquet") for f in self.formats)

    @property
    def all_files(self) -> list[Path]:
        """The source's files and the file it joins, each once."""
        if self.join is None or self.join.file in self.files:
            return list(self.files)
        return [*self.files, self.join.file]


class Plan(msgspec.Struct, frozen=True):
    recipe: Recipe
    folder: Path  # the recipe's folder: relative paths start here
    model: ModelFiles
    sources: list[SourcePlan]
    inputs: list[InputRef]
    pools: list[PoolPlan] = []

    @property
    def seed(self) -> int:
        return self.recipe.recipe.seed

    def with_pools(self, generated: dict[str, list[str]]) -> Plan:
        """The plan with each generated pool's instructions (`generated[name]`, the whole
        pool) in the sources and template lengthening that use it."""
        sources = []
        for s in self.sources:
            pool = pool_of(s.spec)
            if pool in generated:
                s = msgspec.structs.replace(s, templates=source_templates(generated[pool], s.spec))
            if s.lengthen is not None and s.lengthen.spec.method == "template" and not s.lengthen.spec.templates and s.lengthen.spec.pool in generated:
                s = msgspec.structs.replace(s, lengthen=msgspec.structs.replace(s.lengthen, templates=list(generated[s.lengthen.spec.pool])))
            sources.append(s)
        return msgspec.structs.replace(self, sources=sources)

    def source(self, name: str) -> SourcePlan:
        return next(s for s in self.sources if s.name == name)


def resolve(recipe: Recipe) -> Plan:
    """The plan of a checked recipe. Raises SourceError for a source file that is missing
    and TokenizerError for an unusable tokenizer folder."""
    folder = recipe.path.parent if recipe.path is not None else Path.cwd()
    model = load_model(path_in(folder, recipe.model.tokenizer), recipe.model.chat_template, tuple(recipe.model.added_tokens))
    written = [_source(recipe, folder, i, spec, f"source[{i}]") for i, spec in enumerate(recipe.source)]
    generated = [
        _generated(recipe, folder, len(written) + j, j, g) for j, g in enumerate(recipe.generate)
    ]
    sources = written + generated
    used = {pool_of(s.spec) for s in sources} | {s.lengthen.spec.pool for s in sources if s.lengthen is not None}
    pools = [_pool(recipe, folder, name, p) for name, p in recipe.pool.items() if p.generate is not None and name in used]
    return Plan(recipe=recipe, folder=folder, model=model, sources=sources, inputs=_inputs(recipe, model, sources, pools), pools=pools)


def _pool(recipe: Recipe, folder: Path, name: str, pool: PoolSpec) -> PoolPlan:
    g = pool.generate
    assert g is not None
    table = f"pool.{name}"
    fixed = fixed_templates(pool)
    cache = path_in(folder, g.cache or f"cache/{table}.jsonl").resolve()
    return PoolPlan(name=name, table=table, spec=g, fixed=fixed, task=pool.task or pool.description, seed=_seed(recipe, g), cache=cache)


def pool_templates(recipe: Recipe, name: str) -> list[str]:
    """A pool's templates as the recipe writes them: a generated pool's fixed part (its
    templates and seeds) until the LLM stage adds what it writes."""
    return fixed_templates(load_pool(name, recipe.pool))


def fixed_templates(pool: PoolSpec) -> list[str]:
    """A pool's own templates, then a generated pool's seeds (each once)."""
    return list(dict.fromkeys([*pool.templates, *(pool.generate.seeds if pool.generate is not None else [])]))


def path_in(folder: Path, value: str) -> Path:
    """A path written in the recipe, relative to the recipe's folder."""
    try:
        p = Path(value).expanduser()
    except RuntimeError:  # ~nosuchuser: no home to expand
        p = Path(value)
    return p if p.is_absolute() else folder / p


def _files(spec: SourceSpec, key: str, folder: Path) -> list[Path]:
    patterns = [spec.path] if isinstance(spec.path, str) else list(spec.path)
    files: list[Path] = []
    for pat in patterns:
        full = path_in(folder, pat)
        if is_glob(pat):
            found = sorted(Path(p) for p in glob.glob(str(full), recursive=True))
            matches = [p for p in found if not p.is_dir()]  # a folder a pattern also names holds no rows
            if not matches:
                raise SourceError(f"source '{spec.name}' ({key}.path): no file matches '{pat}'")
            for p in matches:
                if not p.is_file():  # a FIFO or a device would hang the read or never end
                    raise SourceError(f"source '{spec.name}' ({key}.path): {p} (matched by '{pat}') is not a regular file")
            files.extend(matches)
        elif not full.is_file():
            raise SourceError(f"source '{spec.name}' ({key}.path): file not found: {full}")
        else:
            files.append(full)
    return files


def format_of(name: str, declared: str | None, path: Path) -> str:
    if declared:
        return declared
    ext = path.suffix.lower().lstrip(".")
    if ext in ("jsonl", "ndjson"):
        return "jsonl"
    if ext == "tar":
        return WEBDATASET
    if ext in FORMATS:
        return ext
    raise SourceError(
        f"source '{name}': cannot tell the format of {path.name}; set format = \"jsonl\" | \"json\" | \"parquet\" | \"csv\" | \"tsv\" | \"webdataset\""
    )


def _join(spec: SourceSpec, key: str, folder: Path, files: list[Path]) -> JoinPlan | None:
    join = spec.join
    if join is None:
        return None
    if join.path is None:
        file = files[0]
    else:
        file = path_in(folder, join.path)
        if not file.is_file():
            raise SourceError(f"source '{spec.name}' ({key}.join.path): file not found: {file}")
    fmt = format_of(spec.name, join.format, file)
    return JoinPlan(file=file, format=fmt, json_key=join.json_key, left_on=join.left_on, right_on=join.right_on)


def pool_of(spec: SourceSpec) -> str | None:
    """The pool a source's instructions come from (a caption source has a default)."""
    if isinstance(spec.instructions, str):
        return spec.instructions
    if not spec.instructions and spec.layout in DEFAULT_POOLS:
        return DEFAULT_POOLS[spec.layout]
    return None


def _templates(recipe: Recipe, spec: SourceSpec) -> list[str]:
    pool = pool_of(spec)
    return source_templates(pool_templates(recipe, pool) if pool else list(spec.instructions or []), spec)


def source_templates(templates: list[str], spec: SourceSpec) -> list[str]:
    """A source's instruction templates from its pool's: the short-answer wording added."""
    if spec.short_answer:
        return [t + SHORT_ANSWER[spec.short_answer] for t in (templates or ["{question}"])]
    return list(templates)


def _source(recipe: Recipe, folder: Path, index: int, spec: SourceSpec, key: str, generate: GeneratePlan | None = None) -> SourcePlan:
    files = _files(spec, key, folder)
    formats = [format_of(spec.name, spec.format, f) for f in files]
    container, image_column = _container(spec, key, files, formats)
    if spec.image_root:
        root: Path | None = path_in(folder, spec.image_root)
    elif container is not None:  # every shard's path is relative to their common folder
        root = Path(os.path.commonpath([f.parent for f in files]))
    else:
        root = files[0].parent if files else None
    return SourcePlan(
        container=container,
        image_column=image_column,
        index=index,
        name=spec.name,
        key=key,
        spec=spec,
        files=files,
        formats=formats,
        join=_join(spec, key, folder, files),
        templates=_templates(recipe, spec),
        template_fields=[k for k in spec.fields if k not in RESERVED_FIELDS | LAYOUT_FIELDS.get(spec.layout, frozenset())],
        image_root=root,
        audio_root=path_in(folder, spec.audio_root) if spec.audio_root else (files[0].parent if files else None),
        video_root=path_in(folder, spec.video_root) if spec.video_root else (files[0].parent if files else None),
        lengthen=_lengthen(recipe, folder, spec),
        generate=generate,
    )


def _container(spec: SourceSpec, key: str, files: list[Path], formats: list[str]) -> tuple[str | None, str | None]:
    """Whether the source's images live inside its files: WebDataset shards, or parquet
    files whose image column (fields.image or fields.images when it names a whole
    column, else `image`) holds bytes (binary, or the Hugging Face `Image` struct {bytes, path})."""
    kinds = set(formats)
    if WEBDATASET in kinds:
        if kinds != {WEBDATASET}:
            raise SourceError(f"source '{spec.name}' ({key}.path): WebDataset shards cannot be mixed with other formats in one source")
        for bad in ("join", "json_key", "group_by"):
            if getattr(spec, bad):
                raise SourceError(f"source '{spec.name}' ({key}.{bad}): not available for WebDataset shards")
        return WEBDATASET, None
    if kinds != {"parquet"} or spec.join is not None or spec.group_by is not None:
        return None, None
    mapped = spec.fields.get("image") or spec.fields.get("images") or "image"
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(files[0])
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for unreadable files
        raise SourceError(f"source '{spec.name}': cannot read {files[0]} as parquet: {e}") from None
    name = mapped  # a path into the column ("image.path") reads it as a loose path
    if name not in schema.names:
        return None, None
    t = schema.field(name).type
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        t = t.value_type
    if pa.types.is_struct(t):
        t = t.field("bytes").type if t.get_field_index("bytes") >= 0 else None
    if t is not None and (pa.types.is_binary(t) or pa.types.is_large_binary(t)):
        return PARQUET_IMAGES, name
    return None, None


def _seed(recipe: Recipe, spec: LengthenSpec | GenerateSpec) -> int:
    return spec.seed if spec.seed is not None else recipe.recipe.seed


def _lengthen(recipe: Recipe, folder: Path, spec: SourceSpec) -> LengthenPlan | None:
    if spec.lengthen is None:
        return None
    table, t = f"lengthen.{spec.lengthen}", recipe.lengthen[spec.lengthen]
    if t.method == "template":
        templates = t.templates or pool_templates(recipe, t.pool or "")
        return LengthenPlan(table=table, spec=t, seed=_seed(recipe, t), fields=lengthen_fields(spec), templates=templates, cache=None)
    cache = path_in(folder, t.cache or f"cache/{table}.jsonl").resolve()
    return LengthenPlan(table=table, spec=t, seed=_seed(recipe, t), fields=lengthen_fields(spec), templates=[], cache=cache)


def _generated(recipe: Recipe, folder: Path, index: int, j: int, g: GenerateSpec) -> SourcePlan:
    """The conversation source a [[generate]] table becomes."""
    table = f"generate.{g.name}"
    plan = GeneratePlan(
        table=table,
        key=f"generate[{j}]",
        spec=g,
        seed=_seed(recipe, g),
        seeds=path_in(folder, g.seeds) if g.seeds else None,
        cache=path_in(folder, g.cache or f"cache/{table}.jsonl").resolve(),
    )
    image = {k: v for k, v in g.fields.items() if k in ("image", "images")}
    spec = SourceSpec(
        name=g.name, path=g.path, layout="conversation", format=g.format, json_key=g.json_key, fields=image,
        image_root=g.image_root, weight=g.weight, max_epochs=g.max_epochs,
    )
    return _source(recipe, folder, index, spec, plan.key, generate=plan)


def _inputs(recipe: Recipe, model: ModelFiles, sources: list[SourcePlan], generated: list[PoolPlan]) -> list[InputRef]:
    """The files whose content the release records, in manifest order."""
    items: list[InputRef] = []
    if recipe.path:
        items.append(InputRef("recipe", recipe.path))
    items += [InputRef("recipe-base", base) for base in recipe.bases]
    items += [InputRef("tokenizer", f) for f in model.files]
    for s in sources:
        items += [InputRef(f"source:{s.name}", f) for f in s.all_files]
    pools = {pool_of(s.spec) for s in sources} - {None} - set(recipe.pool)
    lengthen_pools = {s.lengthen.spec.pool for s in sources if s.lengthen is not None} - {None} - set(recipe.pool)
    for name in [*sorted(pools), *sorted(lengthen_pools - pools)]:
        path = builtin_pool_path(name)
        if path:
            items.append(InputRef(f"pool:{name}", path))
    # The call caches (a release rebuilds from them without the endpoint) and seed examples.
    llm: dict[str, Path] = {}
    for s in sources:
        if s.lengthen is not None and s.lengthen.cache is not None:
            llm[f"{CACHE_ROLE}{s.lengthen.table}"] = s.lengthen.cache
        if s.generate is not None:
            llm[f"{CACHE_ROLE}{s.generate.table}"] = s.generate.cache
            if s.generate.seeds is not None:
                llm[f"seeds:{s.generate.table}"] = s.generate.seeds
    for pool in generated:
        llm[f"{CACHE_ROLE}{pool.table}"] = pool.cache
    items += [InputRef(role, path) for role, path in sorted(llm.items())]
    return items
