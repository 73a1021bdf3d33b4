"""`extends = "base.toml"`: a recipe derived from another.

A recipe with `extends` is the base recipe with the extending file merged on top: tables
merge key by key, any other value (lists included) is replaced, and `[[source]]` entries
match by name: a known name merges into the base entry, a new one is appended, and
`{ name = "x", remove = true }` drops the base's source "x" (a later entry named "x" in the
same file then defines it anew, nothing of the base kept). `mixture.total` and `model.image`
are one value each: they are replaced whole. Relative paths written in a base are
relative to the base's folder; they are rewritten relative to the extending file's folder
before the merge, so every path of the merged recipe resolves against `recipe.path`.

A table the extending file sets only some keys of keeps the base's other keys; when the
merged table is then inconsistent (a prompt kept from the base beside the child's
`method = "template"`), the problem says which keys came from which file (`HalfMerge`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

from ..errors import recipe_error
from .tomlfile import read_toml

# Values replaced whole, never merged key by key: a total is one choice, and an image rule
# is either a fixed count or a grid rule (a child's `patch` merged under a base's `count`
# would silently keep the count).
_REPLACED_WHOLE = {("mixture", "total"), ("model", "image")}


class HalfMerge(NamedTuple):
    """A table whose keys come from two files: `kept` from `base`, `set` by `child`.
    `at` is its key path; a source's entry is named `("source", NAME, ...)` until
    `source_indices` turns the name into the merged recipe's index."""

    at: tuple[str, ...]
    kept: tuple[str, ...]
    set: tuple[str, ...]
    base: str
    child: str

    def key(self) -> str:
        return "".join(part if i == 0 else (part if part.startswith("[") else "." + part) for i, part in enumerate(self.at))

    def describe(self) -> str:
        return (f"{self.key()} merges keys of two files: {', '.join(self.kept)} from {self.base}, "
                f"{', '.join(self.set)} from {self.child}; a table set in part keeps the base's other keys")


def expand_extends(data: dict[str, Any], folder: Path, chain: list[Path], problems: list[str],
                   merges: list[HalfMerge] | None = None) -> tuple[dict[str, Any], list[Path]]:
    """`data` merged over the recipe it extends (recursively), and the base files,
    nearest first. Merge problems are appended to `problems`, tables merged from keys of
    two files to `merges`; a missing or cyclic base raises RecipeError at once."""
    merges = [] if merges is None else merges
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
        base, further = expand_extends(base, base_path.parent, [*chain, base_path], problems, merges)
        bases += further
    else:
        reject_remove(base, problems)
    _rebase_paths(base, base_path.parent, folder)
    extending = chain[-1].name if chain else "the recipe"
    merger = _Merger(base_path.name, extending, merges)
    return merger.recipe(base, data, problems), bases


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


class _Merger:
    """Merges one extending file over its base, noting each table set in part."""

    def __init__(self, base: str, child: str, merges: list[HalfMerge]):
        self.base, self.child, self.merges = base, child, merges

    def tables(self, base: dict[str, Any], over: dict[str, Any], at: tuple[str, ...] = ()) -> dict[str, Any]:
        out = dict(base)
        for key, value in over.items():
            here = (*at, key)
            if isinstance(value, dict) and isinstance(out.get(key), dict) and here not in _REPLACED_WHOLE:
                out[key] = self.tables(out[key], value, here)
            else:
                out[key] = value
        kept = tuple(k for k in base if k not in over)
        if at and kept and over:
            self.merges.append(HalfMerge(at, kept, tuple(over), self.base, self.child))
        return out

    def recipe(self, base: dict[str, Any], over: dict[str, Any], problems: list[str]) -> dict[str, Any]:
        sources_over = over.pop("source", None)
        merged = self.tables(base, over)
        if sources_over is not None:
            merged["source"] = self.sources(base.get("source", []), sources_over, problems)
        return merged

    def sources(self, base: Any, over: Any, problems: list[str]) -> Any:
        if not isinstance(base, list) or not isinstance(over, list):
            return over  # not [[source]] tables: the type check reports it
        names = f"{self.base}, extended in {self.child}"
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
                merged[position[name]] = self.tables(merged[position[name]], entry, ("source", name))
            else:
                merged.append({k: v for k, v in entry.items() if k != "remove"})
        return [s for i, s in enumerate(merged) if i not in removed]


def source_indices(merges: list[HalfMerge], data: dict[str, Any]) -> list[HalfMerge]:
    """The merges with a source's name replaced by its index in the merged recipe
    (`source[2].fields`), as problems name it; merges of a source since removed dropped."""
    sources = data.get("source") if isinstance(data.get("source"), list) else []
    index = {s["name"]: i for i, s in enumerate(sources) if isinstance(s, dict) and isinstance(s.get("name"), str)}
    out = []
    for m in merges:
        if m.at[0] != "source":
            out.append(m)
        elif len(m.at) >= 2 and m.at[1] in index and sources[index[m.at[1]]].get("name") == m.at[1]:
            out.append(m._replace(at=(f"source[{index[m.at[1]]}]", *m.at[2:])))
    return out


def name_half_merges(problems: list[str], merges: list[HalfMerge]) -> None:
    """A problem about a key inside a table set in part names which keys came from which
    file: the deepest such table around the problem's key."""
    for k, problem in enumerate(problems):
        key = problem.split(":", 1)[0]
        around = [m for m in merges if key == m.key() or key.startswith(m.key() + ".") or key.startswith(m.key() + "[")]
        if around:
            problems[k] += f" ({max(around, key=lambda m: len(m.at)).describe()})"


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


