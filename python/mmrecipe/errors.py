"""The exceptions mmrecipe raises. Every one is an `MMRecipeError`; its message names the
recipe key, or the source, row and field, and says what to do about it.

The classes are defined by the Rust core (`mmrecipe._core`), which raises them itself;
this module is their public name, and gives them their documentation and the defaults
of their attributes."""

from __future__ import annotations

from ._core import (
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

__all__ = [
    "DataError",
    "InternalError",
    "LLMError",
    "MMRecipeError",
    "RecipeError",
    "ReleaseError",
    "SourceError",
    "StorageError",
    "TemplateError",
    "TokenizerError",
    "recipe_error",
]

MMRecipeError.__doc__ = """Base class of every error mmrecipe raises on purpose."""
RecipeError.__doc__ = """The recipe is invalid. `key` is the recipe key path (e.g. ``source[2].weight``);
`problems` lists every problem found (the message alone when there is one)."""
SourceError.__doc__ = """A source file cannot be read, or a field path does not resolve on it."""
DataError.__doc__ = """One data row is unusable. `source`, `row` and `field` say where."""
TokenizerError.__doc__ = """The tokenizer cannot be loaded or lacks a token the recipe needs."""
TemplateError.__doc__ = """The chat template does not compile or does not render a conversation."""
ReleaseError.__doc__ = """A release directory is missing, incomplete, or would be overwritten."""
LLMError.__doc__ = """An LLM stage cannot go on: the endpoint is unreachable or refuses the request, a
call failed under on_error = "fail", or an --offline build needs a call that is not
in the cache."""
StorageError.__doc__ = """A file mmrecipe writes or reads back for itself (the temporary token file of a
build) could not be written or read: `path` names it. Check free space and permissions."""
InternalError.__doc__ = """A bug in mmrecipe (its core was called out of order or with malformed buffers);
please report it with the message."""


def _problems(exc: BaseException) -> list[str]:
    # Without problems of its own (set by `recipe_error`), the error's own message.
    own: list[str] | None = exc.__dict__.get("problems")
    return [str(exc)] if own is None else own


def _set_problems(exc: BaseException, problems: list[str]) -> None:
    exc.__dict__["problems"] = problems


RecipeError.key = None
setattr(RecipeError, "problems", property(_problems, _set_problems, doc="Every problem found, as `key: message` lines."))
DataError.source = None
DataError.row = None
DataError.field = None
StorageError.path = None


def recipe_error(message: str, key: str | None = None, problems: list[str] | None = None) -> RecipeError:
    """A RecipeError with its `key` and `problems` (the classes the core defines take the
    message only)."""
    err = RecipeError(message)
    err.key = key
    err.problems = problems or [message]
    return err
