"""mmrecipe: a declarative dataset-recipe compiler for multimodal instruction tuning.

A versioned TOML recipe becomes a reproducible release of packed, loss-masked token
sequences; `mmrecipe.torch` feeds it to a PyTorch training loop. The names below are
imported on first use, so that `import mmrecipe.torch` in a training worker loads the
reader only, not the compiler (polars, httpx)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    DataError,
    InternalError,
    LLMError,
    MMRecipeError,
    RecipeError,
    ReleaseError,
    SourceError,
    StorageError,
    TemplateError,
    TokenizerError,
)

if TYPE_CHECKING:
    from .builder import BuildResult, build
    from .recipe import Plan, Recipe, load_recipe, parse_recipe, resolve

_LAZY = {
    "BuildResult": "builder",
    "build": "builder",
    "Plan": "recipe",
    "Recipe": "recipe",
    "load_recipe": "recipe",
    "parse_recipe": "recipe",
    "resolve": "recipe",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mmrecipe' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


__all__ = [
    "BuildResult",
    "DataError",
    "InternalError",
    "LLMError",
    "MMRecipeError",
    "Plan",
    "Recipe",
    "RecipeError",
    "ReleaseError",
    "SourceError",
    "StorageError",
    "TemplateError",
    "TokenizerError",
    "__version__",
    "build",
    "load_recipe",
    "parse_recipe",
    "resolve",
]
