"""The exceptions mmrecipe raises. Every one is an `MMRecipeError`; its message names the
recipe key, or the source, row and field, and says what to do about it."""

from __future__ import annotations


class MMRecipeError(Exception):
    """Base class of every error mmrecipe raises on purpose."""


class RecipeError(MMRecipeError):
    """The recipe is invalid. `key` is the recipe key path (e.g. ``source[2].weight``)."""

    key: str | None = None

    def __init__(self, message: str, key: str | None = None, problems: list[str] | None = None):
        super().__init__(message)
        if key is not None:
            self.key = key
        self.problems = problems or [message]


class SourceError(MMRecipeError):
    """A source file cannot be read, or a field path does not resolve on it."""


class DataError(MMRecipeError):
    """One data row is unusable. `source`, `row` and `field` say where."""

    source: str | None = None
    row: int | None = None
    field: str | None = None


class TokenizerError(MMRecipeError):
    """The tokenizer cannot be loaded or lacks a token the recipe needs."""


class TemplateError(MMRecipeError):
    """The chat template does not compile or does not render a conversation."""


class ReleaseError(MMRecipeError):
    """A release directory is missing, incomplete, or would be overwritten."""


class LLMError(MMRecipeError):
    """An LLM stage cannot go on: the endpoint is unreachable or refuses the request, a
    call failed under on_error = "fail", or an --offline build needs a call that is not
    in the cache."""


def recipe_error(message: str, key: str | None = None, problems: list[str] | None = None) -> RecipeError:
    """A RecipeError naming the recipe key `key` (and every problem found, if several)."""
    return RecipeError(message, key=key, problems=problems)
