"""The recipe language: TOML parsed into msgspec structs, every problem reported at once
with its key path (``source[1].fields.answer``), every path resolved against the recipe's
own folder."""

from __future__ import annotations

import difflib
import sys
import typing
from pathlib import Path
from typing import Any, Literal

import msgspec

from .errors import RecipeError

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


class SourceSpec(_Spec, kw_only=True, forbid_unknown_fields=True):
    name: str
    path: str | list[str]
    layout: Layout
    format: Literal["jsonl", "json", "parquet", "csv"] | None = None
    json_key: str | None = None
    fields: dict[str, str] = {}
    roles: dict[str, str] = {}
    instructions: str | list[str] | None = None
    image_root: str | None = None
    weight: float = 1.0
    max_epochs: float | None = None
    short_answer: Literal["word", "sentence"] | None = None
    on_error: Literal["fail", "skip"] = "fail"


class PoolSpec(_Spec, kw_only=True, forbid_unknown_fields=True):
    templates: list[str]
    description: str = ""
    task: str = ""


class Recipe(_Spec, kw_only=True, forbid_unknown_fields=True):
    recipe: RecipeMeta
    model: ModelSpec
    output: OutputSpec = msgspec.field(default_factory=OutputSpec)
    mixture: MixtureSpec = msgspec.field(default_factory=MixtureSpec)
    source: list[SourceSpec]
    pool: dict[str, PoolSpec] = {}
    # Set by `load_recipe`, not by the TOML file.
    path: Path | None = None


def _struct_fields(tp: Any) -> dict[str, Any] | None:
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        hints = typing.get_type_hints(tp)
        return {f: hints[f] for f in tp.__struct_fields__ if not (tp is Recipe and f == "path")}
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
    return p


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
        raise RecipeError(f"no template pool named '{name}'", key="pool")
    try:
        return msgspec.convert(tomllib.loads(path.read_text("utf-8")), PoolSpec)
    except (msgspec.ValidationError, tomllib.TOMLDecodeError) as e:
        raise RecipeError(f"built-in pool {path}: {e}", key=f"pool.{name}") from None


def parse_recipe(text: str, path: Path | None = None) -> Recipe:
    """Parses recipe TOML; raises RecipeError listing every problem found."""
    where = str(path) if path else "recipe"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{where}: not valid TOML: {e}") from None
    problems: list[str] = []
    _unknown_keys(data, Recipe, "", problems)
    try:
        recipe = msgspec.convert(data, Recipe)
    except msgspec.ValidationError as e:
        key, message = _msgspec_path(e)
        problems.append(f"{key or '(top level)'}: {message}")
        raise RecipeError(_report(where, problems), key=problems[0].split(":")[0], problems=problems) from None
    problems += _semantic_problems(recipe)
    if problems:
        raise RecipeError(_report(where, problems), key=problems[0].split(":")[0], problems=problems)
    recipe.path = path
    return recipe


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
    """The recipe as plain data (for manifests), without the file path."""
    d = msgspec.to_builtins(msgspec.structs.replace(recipe, path=None))
    d.pop("path", None)
    return d
