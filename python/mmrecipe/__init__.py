"""mmrecipe: a declarative dataset-recipe compiler for multimodal instruction tuning.

A versioned TOML recipe becomes a reproducible release of packed, loss-masked token
sequences; `mmrecipe.torch` feeds it to a PyTorch training loop."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    DataError,
    LLMError,
    MMRecipeError,
    RecipeError,
    ReleaseError,
    SourceError,
    TemplateError,
    TokenizerError,
)
from .recipe import Recipe, load_recipe, parse_recipe  # noqa: E402
from .builder import BuildResult, build  # noqa: E402


__all__ = [
    "BuildResult",
    "DataError",
    "LLMError",
    "MMRecipeError",
    "Recipe",
    "RecipeError",
    "ReleaseError",
    "SourceError",
    "TemplateError",
    "TokenizerError",
    "__version__",
    "build",
    "load_recipe",
    "parse_recipe",
]
