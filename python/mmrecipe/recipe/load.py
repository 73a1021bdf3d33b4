"""Recipe files to checked `Recipe` structs: TOML parsed, `extends` merged, every problem
reported at once with its key path."""

from __future__ import annotations

from pathlib import Path

import msgspec

from ..errors import RecipeError, recipe_error
from .extends import HalfMerge, expand_extends, name_half_merges, reject_remove, source_indices
from .limits import limit_problems
from .schema import Recipe
from .tomlfile import read_toml
from .validate import msgspec_path, name_merged_sources, name_table_key, report, semantic_problems, unknown_keys


def parse_recipe(text: str, path: Path | None = None) -> Recipe:
    """Parses recipe TOML; raises RecipeError listing every problem found. `extends` is
    resolved relative to the folder of `path` (the working directory without one)."""
    where = str(path) if path else "recipe"
    data = read_toml(text, where)
    problems: list[str] = []
    bases: list[Path] = []
    merges: list[HalfMerge] = []
    if "extends" in data:
        folder = path.parent if path else Path.cwd()
        data, bases = expand_extends(data, folder, [path.resolve()] if path else [], problems, merges)
        merges = source_indices(merges, data)
        if bases:
            where += " (extends " + " -> ".join(str(b) for b in bases) + ")"
    else:
        reject_remove(data, problems)
    merge_problems = len(problems)
    unknown_keys(data, Recipe, "", problems)
    out_of_range = limit_problems(data)
    if out_of_range:  # checked before the types: msgspec would stop at the first
        problems += out_of_range
        name_merged_sources(problems, merge_problems, data, bases)
        name_half_merges(problems, merges)
        raise recipe_error(report(where, problems), key=problems[0].split(":")[0], problems=problems)
    try:
        recipe = msgspec.convert(data, Recipe)
    except msgspec.ValidationError as e:
        key, message = msgspec_path(e)
        key = name_table_key(key, data)
        problems.append(f"{key or '(top level)'}: {message}")
        name_merged_sources(problems, merge_problems, data, bases)
        name_half_merges(problems, merges)
        raise recipe_error(report(where, problems), key=problems[0].split(":")[0], problems=problems) from None
    problems += semantic_problems(recipe)
    name_merged_sources(problems, merge_problems, data, bases)
    name_half_merges(problems, merges)
    if problems:
        raise recipe_error(report(where, problems), key=problems[0].split(":")[0], problems=problems)
    recipe.path = path
    recipe.bases = bases
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe file not found: {path}") from None
    except IsADirectoryError:
        raise RecipeError(f"{path} is a folder, not a recipe file") from None
    except OSError as e:
        raise RecipeError(f"cannot read the recipe {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text ({e})") from None
    return parse_recipe(text, path.resolve())

