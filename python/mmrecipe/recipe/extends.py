"""`extends = "base.toml"`: a recipe derived from another.

A recipe with `extends` is the base recipe with the extending file merged on top: tables
merge key by key, any other value (lists included) is replaced, and `[[source]]` entries
match by name: a known name merges into the base entry, a new one is appended, and
`{ name = "x", remove = true }` drops the base's source "x" (a later entry named "x" in the
same file then defines it anew, nothing of the base kept). `mixture.total` and `model.image`
are one value each: they are replaced whole. Relative paths written in a base are
relative to the base's folder; they are rewritten relative to the extending file's folder
before the merge, so every path of the merged recipe resolves against `recipe.path`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import recipe_error
from .tomlfile import read_toml

# Values replaced whole, never merged key by key: a total is one choice, and an image rule
# is either a fixed count or a grid rule (a child's `patch` merged under a base's `count`
# would silently keep the count).
_REPLACED_WHOLE = {("mixture", "total"), ("model", "image")}


def expand_extends(data: dict[str, Any], folder: Path, chain: list[Path], problems: list[str]) -> tuple[dict[str, Any], list[Path]]:
    """`data` merged over the recipe it extends (recursively), and the base files,
    nearest first. Merge problems are appended to `problems`; a missing or cyclic
    base raises RecipeError at once."""
    ref = data.pop("extends")
    if not isinstance(ref, str) or not ref.strip():
        raise recipe_error(f"extends: expected the path of a recipe file, got {ref!r}", key="extends")
    try:
        base_path = (folder / Path(ref).expanduser()).resolve()
    except (RuntimeError, ValueError, OSError) as e:  # ~nosuchuser, a NUL byte, a name too long
        raise recipe_error(f"extends: {ref[:200]!r} is not a usable path ({e})", key="extends") from None
    if base_path in chain:
        cycle = " -> ".join(str(p) for p in [*chain[chain.index(base_path):], base_path])
        raise recipe_error(f"extends: the recipes extend each other in a cycle: {cycle}; remove one `extends`", key="extends")
    try:
        text = base_path.read_text("utf-8")
    except FileNotFoundError:
        raise recipe_error(f"extends: base recipe not found: {base_path} (relative paths start at {folder})", key="extends") from None
    except UnicodeDecodeError as e:
        raise recipe_error(f"extends: {base_path} is not UTF-8 text ({e})", key="extends") from None
    except IsADirectoryError:
        raise recipe_error(f"extends: {base_path} is a folder, not a recipe file", key="extends") from None
    except OSError as e:
        raise recipe_error(f"extends: cannot read {base_path}: {e.strerror or e}", key="extends") from None
    base = read_toml(text, str(base_path))
    bases = [base_path]
    if "extends" in base:
        base, further = expand_extends(base, base_path.parent, [*chain, base_path], problems)
        bases += further
    else:
        reject_remove(base, problems)
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
    position = {s["name"]: i for i, s in enumerate(merged) if isinstance(s, dict) and isinstance(s.get("name"), str)}
    removed: set[int] = set()
    for i, entry in enumerate(over):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            merged.append(entry)  # not a source table with a name: the type check reports it
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


def reject_remove(data: dict[str, Any], problems: list[str]) -> None:
    """`remove = true` only means something in a recipe that extends another."""
    sources = data.get("source")
    for i, entry in enumerate(sources if isinstance(sources, list) else []):
        if isinstance(entry, dict) and "remove" in entry:
            problems.append(f"source[{i}].remove: only a recipe with `extends` can remove a source")
            del entry["remove"]


