"""The recipe language: TOML parsed into msgspec structs, every problem reported at once
with its key path (``source[1].fields.answer``), every path resolved against the recipe's
own folder. A recipe may derive from another with ``extends = "base.toml"`` (see
`expand_extends`)."""

from __future__ import annotations

import difflib
import os
import re
import sys
import typing
from pathlib import Path
from typing import Any, Literal

import msgspec

from .errors import RecipeError, recipe_error

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class _Spec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pass


class RecipeMeta(_Spec, kw_only=True, forbid_unknown_fields=True):
    name: str
    version: str = "0.0.0"
    seed: int = 0
    description: str = ""


class ImageSpec(_Spec, kw_only=True, forbid_unknown_fields=True):
    """How images become tokens: `count` per image, or computed from the image size."""

    placeholder: str = "<image>"
    token: str = "<image>"
    count: int | None = None
    patch: int = 14
    merge: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    start: str | None = None
    end: str | None = None


class ModelSpec(_Spec, kw_only=True, forbid_unknown_fields=True):
    tokenizer: str
    chat_template: str = "model"
    image: ImageSpec | None = None


class OutputSpec(_Spec, kw_only=True, forbid_unknown_fields=True):
    seq_len: int = 4096
    packing: Literal["bfd", "none"] = "bfd"
    train_on: Literal["assistant", "last_assistant", "all"] = "assistant"
    train_on_eos: bool = True
    overlong: Literal["drop", "truncate", "split_turns"] = "drop"
    shuffle: bool = True
    shard_sequences: int = 4096


class MixtureSpec(_Spec, kw_only=True, forbid_unknown_fields=True):
    """`total`: "natural" (every usable row once), { samples = N } or { tokens = N }.
    `alpha`: temperature sampling, a source's share ∝ weight × rows^alpha."""

    total: str | dict[str, int] = "natural"
    alpha: float = 0.0


Layout = Literal["qa", "caption", "conversation", "alpaca"]
Format = Literal["jsonl", "json", "parquet", "csv"]

# Fields a layout consumes itself; any other mapped field is available to templates.
RESERVED_FIELDS = frozenset(
    {"image", "images", "question", "answer", "caption", "conversations", "instruction", "input", "output"}
)


class JoinSpec(_Spec, kw_only=True, forbid_unknown_fields=True):
    """A second table joined to the source's rows: each row gets the columns of the one
    record whose `right_on` equals the row's `left_on` (VQAv2 annotations by
    question_id, COCO images by image_id = id). `path` defaults to the source's file."""

    left_on: str
    right_on: str
    path: str | None = None
    format: Format | None = None
    json_key: str | None = None


class SourceSpec(_Spec, kw_only=True, forbid_unknown_fields=True):
    name: str
    path: str | list[str]
    layout: Layout
    format: Format | None = None
    json_key: str | None = None
    join: JoinSpec | None = None
    # "image": all questions about one image become one multi-turn conversation (qa only).
    group_by: Literal["image"] | None = None
    fields: dict[str, str] = {}
    roles: dict[str, str] = {}
    instructions: str | list[str] | None = None
    image_root: str | None = None
    weight: float = 1.0
    max_epochs: float | None = None
    short_answer: Literal["word", "sentence"] | None = None
    # A [lengthen.NAME] table that rewrites this source's answers (qa only).
    lengthen: str | None = None
    on_error: Literal["fail", "skip"] = "fail"


class PoolSpec(_Spec, kw_only=True, forbid_unknown_fields=True):
    templates: list[str]
    description: str = ""
    task: str = ""


class LLMSpec(_Spec, kw_only=True, forbid_unknown_fields=True):
    """An OpenAI-compatible chat endpoint and how to call it. Everything that shapes a
    reply (model, system prompt, sampling parameters) is part of each call's cache key;
    how it is called (endpoint, concurrency, timeout, retries) is not."""

    endpoint: str = "http://127.0.0.1:8080/v1"
    model: str | None = None
    # The name of an environment variable holding the API key (never the key itself).
    api_key_env: str | None = None
    system: str | None = None
    temperature: float = 0.7
    top_p: float | None = None
    max_tokens: int = 256
    # Sent with each call; default: the recipe seed.
    seed: int | None = None
    concurrency: int = 4
    timeout: float = 120.0
    retries: int = 3
    backoff: float = 1.0
    # JSON Lines of finished calls, relative to the recipe; default cache/<table>.jsonl.
    cache: str | None = None


class LengthenSpec(LLMSpec, kw_only=True, forbid_unknown_fields=True):
    """`[lengthen.NAME]`: rewrite a qa source's short answers. method "llm" asks the
    endpoint with `prompt` filled from the row's fields; method "template" restates the
    answer with a sentence template from `templates` or `pool`, chosen per row."""

    method: Literal["llm", "template"] = "llm"
    prompt: str | None = None
    templates: list[str] | None = None
    pool: str | None = None
    # A failed call: keep the original answer, drop the sample, or stop the build.
    on_error: Literal["keep", "drop", "fail"] = "keep"


class GenerateSpec(LLMSpec, kw_only=True, forbid_unknown_fields=True):
    """`[[generate]]`: conversations written by an LLM from symbolic image context
    (captions, boxes) and hand-written seed examples, LLaVA-style; the result is a
    conversation source named `name`, mixed like any other."""

    name: str
    path: str | list[str]
    format: Format | None = None
    # For a JSON file whose records are a list under a key.
    json_key: str | None = None
    fields: dict[str, str] = {}
    # The user turn of each call: a template over `fields`.
    context: str
    # JSON Lines of examples: {"context": ..., "conversation": [{from, value}, ...]}.
    seeds: str | None = None
    reply: Literal["qa", "json"] = "qa"
    min_turns: int = 1
    conversations: int = 1
    image_root: str | None = None
    weight: float = 1.0
    max_epochs: float | None = None
    on_error: Literal["drop", "fail"] = "drop"


class Recipe(_Spec, kw_only=True, forbid_unknown_fields=True):
    recipe: RecipeMeta
    model: ModelSpec
    output: OutputSpec = msgspec.field(default_factory=OutputSpec)
    mixture: MixtureSpec = msgspec.field(default_factory=MixtureSpec)
    source: list[SourceSpec]
    pool: dict[str, PoolSpec] = {}
    lengthen: dict[str, LengthenSpec] = {}
    generate: list[GenerateSpec] = []
    # Set by `load_recipe`, not by the TOML file: the recipe file, and the files it
    # extends (nearest first).
    path: Path | None = None
    bases: list[Path] = []


_NOT_FROM_TOML = ("path", "bases")


def _struct_fields(tp: Any) -> dict[str, Any] | None:
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        hints = typing.get_type_hints(tp)
        return {f: hints[f] for f in tp.__struct_fields__ if not (tp is Recipe and f in _NOT_FROM_TOML)}
    return None


def _unknown_keys(data: Any, tp: Any, where: str, out: list[str]) -> None:
    """Collects every unknown key under `data`, with a suggestion for likely typos."""
    fields = _struct_fields(tp)
    if fields is not None and isinstance(data, dict):
        for key, value in list(data.items()):
            if key not in fields:
                close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
                hint = f" (did you mean '{close[0]}'?)" if close else f" (expected one of: {', '.join(fields)})"
                out.append(f"{where + '.' if where else ''}{key}: unknown key{hint}")
                del data[key]  # so the remaining checks can still run
            else:
                _unknown_keys(value, fields[key], f"{where + '.' if where else ''}{key}", out)
        return
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is list and isinstance(data, list):
        for i, item in enumerate(data):
            _unknown_keys(item, args[0], f"{where}[{i}]", out)
    elif origin is dict and isinstance(data, dict) and len(args) == 2:
        for k, v in data.items():
            _unknown_keys(v, args[1], f"{where}.{k}", out)
    elif args:  # unions: check against the struct member, if any
        for a in args:
            if _struct_fields(a) is not None and isinstance(data, dict):
                _unknown_keys(data, a, where, out)


def _msgspec_path(err: msgspec.ValidationError) -> tuple[str, str]:
    text = str(err)
    message, _, at = text.partition(" - at `")
    key = at.rstrip("`").removeprefix("$").lstrip(".")
    return key, message


def _name_table_key(key: str, data: dict[str, Any]) -> str:
    """msgspec writes a key of a top-level table of tables as `[...]`
    (`lengthen[...].on_error`): name the entry that fails (`lengthen.rephrase.on_error`)."""
    head, sep, rest = key.partition("[...]")
    hint = typing.get_type_hints(Recipe).get(head) if sep else None
    tables = data.get(head)
    if hint is None or typing.get_origin(hint) is not dict or not isinstance(tables, dict):
        return key
    value_type = typing.get_args(hint)[1]
    for name, value in tables.items():
        try:
            msgspec.convert(value, value_type)
        except msgspec.ValidationError:
            return f"{head}.{name}{rest}"
    return key


def _semantic_problems(r: Recipe) -> list[str]:
    p: list[str] = []
    if r.output.seq_len < 16:
        p.append(f"output.seq_len: {r.output.seq_len} is too short (at least 16)")
    if r.output.shard_sequences < 1:
        p.append("output.shard_sequences: must be at least 1")
    total = r.mixture.total
    if isinstance(total, str):
        if total != "natural":
            p.append(f"mixture.total: '{total}' is not a mixture total (expected \"natural\" or {{ samples = N }})")
    else:
        keys = set(total)
        if len(keys) != 1 or not keys <= {"samples", "tokens"}:
            p.append(f"mixture.total: expected {{ samples = N }} or {{ tokens = N }}, got keys {sorted(keys)}")
        elif next(iter(total.values())) < 1:
            p.append(f"mixture.total.{next(iter(keys))}: must be at least 1")
    if r.mixture.alpha < 0:
        p.append(f"mixture.alpha: must be >= 0, got {r.mixture.alpha}")
    if not r.source:
        p.append("source: the recipe has no [[source]]")
    seen: dict[str, int] = {}
    for i, s in enumerate(r.source):
        if s.name in seen:
            p.append(f"source[{i}].name: duplicate source name '{s.name}' (also source[{seen[s.name]}])")
        seen.setdefault(s.name, i)
        if not s.name.strip():
            p.append(f"source[{i}].name: must not be empty")
        if not (s.weight > 0):
            p.append(f"source[{i}].weight: must be > 0, got {s.weight}")
        if s.max_epochs is not None and not (s.max_epochs > 0):
            p.append(f"source[{i}].max_epochs: must be > 0, got {s.max_epochs}")
        if s.short_answer and s.layout != "qa":
            p.append(f"source[{i}].short_answer: only applies to the 'qa' layout")
        p += _group_by_problems(s, i)
        if s.join is not None and s.join.path is None and (isinstance(s.path, list) or _is_glob(s.path)):
            p.append(f"source[{i}].join.path: source '{s.name}' reads several files; name the one file to join")
        required = {"qa": ("question", "answer"), "caption": ("caption",), "alpaca": (), "conversation": ()}[s.layout]
        for f in required:
            if f not in s.fields:
                p.append(f"source[{i}].fields.{f}: the '{s.layout}' layout needs a '{f}' field path")
        if isinstance(s.instructions, str) and s.instructions not in r.pool and _builtin_pool_path(s.instructions) is None:
            names = sorted(set(r.pool) | set(builtin_pools()))
            close = difflib.get_close_matches(s.instructions, names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known pools: {', '.join(names)})"
            p.append(f"source[{i}].instructions: no pool named '{s.instructions}'{hint}")
    if r.model.image is not None:
        img = r.model.image
        if img.count is not None and img.count < 1:
            p.append("model.image.count: must be at least 1")
        if img.count is None and (img.patch < 1 or img.merge < 1):
            p.append("model.image: patch and merge must be at least 1")
    for name, pool in r.pool.items():
        if not pool.templates:
            p.append(f"pool.{name}.templates: the pool is empty")
    p += _lengthen_problems(r)
    p += _generate_problems(r, seen)
    return p


_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")


def placeholders(template: str) -> list[str]:
    """The `{field}` names of a template (`{{` and `}}` are literal braces)."""
    return [m.group(1).strip() for m in _PLACEHOLDER.finditer(template) if m.group(1) is not None]


def _llm_problems(spec: LLMSpec, where: str) -> list[str]:
    p = []
    if not spec.model:
        p.append(f"{where}.model: name the model the endpoint serves")
    if not re.match(r"https?://", spec.endpoint):
        p.append(f"{where}.endpoint: expected an http:// or https:// URL, got {spec.endpoint!r}")
    for key, low in (("concurrency", 1), ("max_tokens", 1), ("retries", 0)):
        if getattr(spec, key) < low:
            p.append(f"{where}.{key}: must be at least {low}, got {getattr(spec, key)}")
    if not spec.timeout > 0:  # `not >` also catches NaN
        p.append(f"{where}.timeout: must be > 0, got {spec.timeout}")
    if not spec.backoff >= 0:
        p.append(f"{where}.backoff: must be >= 0, got {spec.backoff}")
    if spec.temperature < 0:
        p.append(f"{where}.temperature: must be >= 0, got {spec.temperature}")
    return p


def lengthen_fields(spec: SourceSpec) -> list[str]:
    """The placeholders a lengthening prompt or template may use on a qa source."""
    return ["question", "answer", *[k for k in spec.fields if k not in ("question", "answer")]]


def _lengthen_problems(r: Recipe) -> list[str]:
    p: list[str] = []
    for name, spec in r.lengthen.items():
        where = f"lengthen.{name}"
        if spec.method == "llm":
            if not spec.prompt:
                p.append(f"{where}.prompt: method \"llm\" needs a prompt, e.g. \"Question: {{question}}\\nAnswer: {{answer}}\\nRewrite the answer as one sentence.\"")
            if spec.templates is not None or spec.pool is not None:
                p.append(f"{where}: templates and pool belong to method \"template\"")
            p += _llm_problems(spec, where)
        else:
            if spec.prompt is not None:
                p.append(f"{where}.prompt: method \"template\" takes templates or pool, not a prompt")
            if (spec.templates is None) == (spec.pool is None):
                p.append(f"{where}: method \"template\" needs one of templates = [...] or pool = \"answer-sentence\"")
            elif spec.templates is not None and not spec.templates:
                p.append(f"{where}.templates: the list is empty")
            elif spec.pool is not None and spec.pool not in r.pool and _builtin_pool_path(spec.pool) is None:
                p.append(f"{where}.pool: no pool named '{spec.pool}' (built-in: {', '.join(builtin_pools())})")
            if spec.on_error == "drop":
                p.append(f"{where}.on_error: a template cannot fail; on_error applies to method \"llm\"")
    for i, s in enumerate(r.source):
        if s.lengthen is None:
            continue
        where = f"source[{i}].lengthen"
        if s.lengthen not in r.lengthen:
            close = difflib.get_close_matches(s.lengthen, list(r.lengthen), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (tables: {', '.join(r.lengthen) or 'none; add [lengthen.NAME]'})"
            p.append(f"{where}: no [lengthen.{s.lengthen}] table{hint}")
            continue
        if s.layout != "qa":
            p.append(f"{where}: only a 'qa' source has short answers to lengthen (source '{s.name}' is '{s.layout}')")
            continue
        if s.short_answer:
            p.append(f"{where}: a lengthened answer is not short; remove short_answer from source '{s.name}'")
        spec = r.lengthen[s.lengthen]
        texts = [spec.prompt or ""] if spec.method == "llm" else list(spec.templates or [])
        known = lengthen_fields(s)
        for t in texts:
            for f in placeholders(t):
                if f not in known:
                    p.append(f"{where}: lengthen.{s.lengthen} uses {{{f}}}, which source '{s.name}' does not map (fields: {', '.join(known)})")
    return p


def _generate_problems(r: Recipe, names: dict[str, int]) -> list[str]:
    p: list[str] = []
    for j, g in enumerate(r.generate):
        where = f"generate[{j}]"
        if g.name in names:
            p.append(f"{where}.name: '{g.name}' is already the name of a source")
        names.setdefault(g.name, j)
        if not g.name.strip():
            p.append(f"{where}.name: must not be empty")
        p += _llm_problems(g, where)
        for f in placeholders(g.context):
            if f not in g.fields:
                p.append(f"{where}.context: uses {{{f}}}, which fields does not map (fields: {', '.join(g.fields) or 'none'})")
        if not placeholders(g.context):
            p.append(f"{where}.context: the template uses no field, so every call would be the same")
        for key in ("min_turns", "conversations"):
            if getattr(g, key) < 1:
                p.append(f"{where}.{key}: must be at least 1, got {getattr(g, key)}")
        if not (g.weight > 0):
            p.append(f"{where}.weight: must be > 0, got {g.weight}")
        if g.max_epochs is not None and not (g.max_epochs > 0):
            p.append(f"{where}.max_epochs: must be > 0, got {g.max_epochs}")
    return p


def generated_source(g: GenerateSpec) -> SourceSpec:
    """The conversation source a [[generate]] table becomes."""
    image = {k: v for k, v in g.fields.items() if k in ("image", "images")}
    return SourceSpec(
        name=g.name, path=g.path, layout="conversation", format=g.format, json_key=g.json_key, fields=image,
        image_root=g.image_root, weight=g.weight, max_epochs=g.max_epochs,
    )


def generator_of(recipe: Recipe, index: int) -> tuple[int, GenerateSpec] | None:
    """(j, generate[j]) when source `index` is written by [[generate]] j."""
    j = index - (len(recipe.source) - len(recipe.generate))
    return (j, recipe.generate[j]) if 0 <= j < len(recipe.generate) else None


def source_key(recipe: Recipe, index: int) -> str:
    """The recipe key of source `index`, for messages: source[i] or generate[j]."""
    gen = generator_of(recipe, index)
    return f"generate[{gen[0]}]" if gen else f"source[{index}]"


def _is_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


def _group_by_problems(s: SourceSpec, i: int) -> list[str]:
    if s.group_by is None:
        return []
    where = f"source[{i}].group_by"
    if s.layout != "qa":
        return [f"{where}: only applies to the 'qa' layout (questions about one image become one conversation)"]
    if "image" not in s.fields:
        return [f"{where}: grouping by image needs fields.image"]
    per_question = sorted(k for k in s.fields if k not in RESERVED_FIELDS)
    if per_question:
        # One conversation holds many questions, but a template field has one value per sample.
        return [f"{where}: template fields ({', '.join(per_question)}) cannot be combined with group_by; "
                "use templates with {question} only, or remove group_by"]
    return []


def pools_dir() -> Path:
    """The built-in template pools shipped with mmrecipe."""
    return Path(__file__).parent / "pools"


def builtin_pools() -> list[str]:
    return sorted(p.stem for p in pools_dir().glob("*.toml"))


def _builtin_pool_path(name: str) -> Path | None:
    path = pools_dir() / f"{name}.toml"
    return path if path.is_file() else None


def load_pool(name: str, recipe: Recipe) -> PoolSpec:
    """A pool defined in the recipe, else a built-in one."""
    if name in recipe.pool:
        return recipe.pool[name]
    path = _builtin_pool_path(name)
    if path is None:
        raise recipe_error(f"no template pool named '{name}'", key="pool")
    try:
        return msgspec.convert(tomllib.loads(path.read_text("utf-8")), PoolSpec)
    except (msgspec.ValidationError, tomllib.TOMLDecodeError) as e:
        raise recipe_error(f"built-in pool {path}: {e}", key=f"pool.{name}") from None


def _read_toml(text: str, where: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{where}: not valid TOML: {e}") from None


def parse_recipe(text: str, path: Path | None = None) -> Recipe:
    """Parses recipe TOML; raises RecipeError listing every problem found. `extends` is
    resolved relative to the folder of `path` (the working directory without one)."""
    where = str(path) if path else "recipe"
    data = _read_toml(text, where)
    problems: list[str] = []
    bases: list[Path] = []
    if "extends" in data:
        folder = path.parent if path else Path.cwd()
        data, bases = expand_extends(data, folder, [path.resolve()] if path else [], problems)
        if bases:
            where += " (extends " + " -> ".join(str(b) for b in bases) + ")"
    else:
        _reject_remove(data, problems)
    merge_problems = len(problems)
    _unknown_keys(data, Recipe, "", problems)
    try:
        recipe = msgspec.convert(data, Recipe)
    except msgspec.ValidationError as e:
        key, message = _msgspec_path(e)
        key = _name_table_key(key, data)
        problems.append(f"{key or '(top level)'}: {message}")
        _name_merged_sources(problems, merge_problems, data, bases)
        raise recipe_error(_report(where, problems), key=problems[0].split(":")[0], problems=problems) from None
    problems += _semantic_problems(recipe)
    _name_merged_sources(problems, merge_problems, data, bases)
    if problems:
        raise recipe_error(_report(where, problems), key=problems[0].split(":")[0], problems=problems)
    recipe.path = path
    recipe.bases = bases
    # [[generate]] tables become conversation sources after the written ones.
    recipe.source = [*recipe.source, *(generated_source(g) for g in recipe.generate)]
    return recipe


def _name_merged_sources(problems: list[str], start: int, data: dict[str, Any], bases: list[Path]) -> None:
    """In a merged recipe, source[i] counts the merged sources: name the source, too."""
    sources = data.get("source")
    if not bases or not isinstance(sources, list):
        return
    for k in range(start, len(problems)):
        m = re.match(r"source\[(\d+)\]", problems[k])
        entry = sources[int(m.group(1))] if m and int(m.group(1)) < len(sources) else None
        if isinstance(entry, dict):
            problems[k] += f" (source {entry.get('name')!r} of the merged recipe)"


# --- extends --------------------------------------------------------------------------
#
# A recipe with `extends = "base.toml"` is the base recipe with the extending file merged
# on top: tables merge key by key, any other value (lists included) is replaced, and
# `[[source]]` entries match by name: a known name merges into the base entry, a new one
# is appended, and `{ name = "x", remove = true }` drops the base's source "x" (a later
# entry named "x" in the same file then defines it anew, nothing of the base kept).
# `mixture.total` is one value ("natural" or { samples = N }): it is replaced whole.
# Relative paths written in a base are relative to the base's folder; they are rewritten
# relative to the extending file's folder before the merge, so every path of the merged
# recipe resolves against `recipe.path` as usual.

_REPLACED_WHOLE = {("mixture", "total")}


def expand_extends(data: dict[str, Any], folder: Path, chain: list[Path], problems: list[str]) -> tuple[dict[str, Any], list[Path]]:
    """`data` merged over the recipe it extends (recursively), and the base files,
    nearest first. Merge problems are appended to `problems`; a missing or cyclic
    base raises RecipeError at once."""
    ref = data.pop("extends")
    if not isinstance(ref, str) or not ref.strip():
        raise recipe_error(f"extends: expected the path of a recipe file, got {ref!r}", key="extends")
    base_path = (folder / Path(ref).expanduser()).resolve()
    if base_path in chain:
        cycle = " -> ".join(str(p) for p in [*chain[chain.index(base_path):], base_path])
        raise recipe_error(f"extends: the recipes extend each other in a cycle: {cycle}; remove one `extends`", key="extends")
    try:
        text = base_path.read_text("utf-8")
    except FileNotFoundError:
        raise recipe_error(f"extends: base recipe not found: {base_path} (relative paths start at {folder})", key="extends") from None
    except UnicodeDecodeError as e:
        raise recipe_error(f"extends: {base_path} is not UTF-8 text ({e})", key="extends") from None
    base = _read_toml(text, str(base_path))
    bases = [base_path]
    if "extends" in base:
        base, further = expand_extends(base, base_path.parent, [*chain, base_path], problems)
        bases += further
    else:
        _reject_remove(base, problems)
    _rebase_paths(base, base_path.parent, folder)
    extending = chain[-1].name if chain else "the recipe"
    return _merge_recipe(base, data, f"{base_path.name}, extended in {extending}", problems), bases


def _rebase(value: Any, old: Path, new: Path) -> Any:
    """A relative path written in folder `old`, rewritten for folder `new`."""
    if not isinstance(value, str) or not value or Path(value).expanduser().is_absolute():
        return value
    try:
        return os.path.relpath(old / value, new)
    except ValueError:  # no relative path between them (another drive on Windows)
        return str(old / value)


def _rebase_paths(data: dict[str, Any], old: Path, new: Path) -> None:
    """Rewrites the path-like keys of a base recipe (model.tokenizer, source paths,
    image roots, join paths) from the base's folder to the extending file's folder."""
    if old == new:
        return
    model = data.get("model")
    if isinstance(model, dict) and "tokenizer" in model:
        model["tokenizer"] = _rebase(model["tokenizer"], old, new)
    for source in data.get("source", []) if isinstance(data.get("source"), list) else []:
        if not isinstance(source, dict):
            continue
        path = source.get("path")
        source["path"] = [_rebase(p, old, new) for p in path] if isinstance(path, list) else _rebase(path, old, new)
        if "image_root" in source:
            source["image_root"] = _rebase(source["image_root"], old, new)
        join = source.get("join")
        if isinstance(join, dict) and "path" in join:
            join["path"] = _rebase(join["path"], old, new)
    for spec in (data.get("lengthen") or {}).values() if isinstance(data.get("lengthen"), dict) else []:
        if isinstance(spec, dict) and "cache" in spec:
            spec["cache"] = _rebase(spec["cache"], old, new)
    for spec in data.get("generate", []) if isinstance(data.get("generate"), list) else []:
        if not isinstance(spec, dict):
            continue
        for key in ("cache", "seeds", "image_root"):
            if key in spec:
                spec[key] = _rebase(spec[key], old, new)
        if "path" in spec:
            path = spec["path"]
            spec["path"] = [_rebase(p, old, new) for p in path] if isinstance(path, list) else _rebase(path, old, new)


def _merge_tables(base: dict[str, Any], over: dict[str, Any], at: tuple[str, ...] = ()) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        here = (*at, key)
        if isinstance(value, dict) and isinstance(out.get(key), dict) and here not in _REPLACED_WHOLE:
            out[key] = _merge_tables(out[key], value, here)
        else:
            out[key] = value
    return out


def _merge_recipe(base: dict[str, Any], over: dict[str, Any], names: str, problems: list[str]) -> dict[str, Any]:
    sources_over = over.pop("source", None)
    merged = _merge_tables(base, over)
    if sources_over is not None:
        merged["source"] = _merge_sources(base.get("source", []), sources_over, names, problems)
    return merged


def _merge_sources(base: Any, over: Any, names: str, problems: list[str]) -> Any:
    """`names`: "base.toml, extended in derived.toml", for messages."""
    if not isinstance(base, list) or not isinstance(over, list):
        return over  # not [[source]] tables: the type check reports it
    merged = list(base)
    position = {s.get("name"): i for i, s in enumerate(merged) if isinstance(s, dict)}
    removed: set[int] = set()
    for i, entry in enumerate(over):
        if not isinstance(entry, dict):
            merged.append(entry)
            continue
        name = entry.get("name")
        if entry.get("remove") is True:
            problems += _removal_problems(entry, i, name in position, names)
            if name in position:
                removed.add(position[name])
        elif name in position and position[name] not in removed:
            entry = {k: v for k, v in entry.items() if k != "remove"}
            merged[position[name]] = _merge_tables(merged[position[name]], entry)
        else:
            merged.append({k: v for k, v in entry.items() if k != "remove"})
    return [s for i, s in enumerate(merged) if i not in removed]


def _removal_problems(entry: dict[str, Any], i: int, known: bool, names: str) -> list[str]:
    base, _, extending = names.partition(", extended in ")
    where = f"source[{i}]"
    if not known:
        return [f"{where}.remove: {base} has no source named {entry.get('name')!r} to remove (in {extending})"]
    extra = sorted(k for k in entry if k not in ("name", "remove"))
    if extra:
        return [f"{where}: a removed source takes only name and remove (also has: {', '.join(extra)}; in {extending})"]
    return []


def _reject_remove(data: dict[str, Any], problems: list[str]) -> None:
    """`remove = true` only means something in a recipe that extends another."""
    sources = data.get("source")
    for i, entry in enumerate(sources if isinstance(sources, list) else []):
        if isinstance(entry, dict) and "remove" in entry:
            problems.append(f"source[{i}].remove: only a recipe with `extends` can remove a source")
            del entry["remove"]


def _report(where: str, problems: list[str]) -> str:
    head = f"{where}: {len(problems)} problem{'s' if len(problems) > 1 else ''} in the recipe"
    return head + "\n" + "\n".join(f"  - {p}" for p in problems)


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text ({e})") from None
    return parse_recipe(text, path.resolve())


def resolve_path(recipe: Recipe, value: str) -> Path:
    """A path from the recipe, relative to the recipe file's folder."""
    p = Path(value).expanduser()
    if not p.is_absolute() and recipe.path is not None:
        p = recipe.path.parent / p
    return p


def to_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain data (for manifests), without the file paths; an extending
    recipe gives its merged form."""
    written = recipe.source[: len(recipe.source) - len(recipe.generate)]
    d = msgspec.to_builtins(msgspec.structs.replace(recipe, path=None, bases=[], source=written))
    for key in _NOT_FROM_TOML:
        d.pop(key, None)
    return d
