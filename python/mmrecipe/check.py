"""`recipe check`: everything a build would reject, found without building."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .builder import make_compiler
from .model import ModelFiles, resolve_model
from .recipe import Recipe, load_recipe
from .sources import Normalized, normalize


@dataclass
class CheckReport:
    recipe: Recipe
    model: ModelFiles
    sources: list[Normalized]


def check(recipe: str | Path | Recipe) -> CheckReport:
    """Validates the recipe, reads and normalizes every source (resolving every field
    path), loads the tokenizer and compiles the chat template and instruction templates.
    Raises the first `MMRecipeError` found; recipe-level problems are reported together."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    model = resolve_model(recipe)
    sources = [normalize(recipe, i) for i in range(len(recipe.source))]
    make_compiler(recipe, model, sources, threads=1)
    return CheckReport(recipe, model, sources)
