"""TOML text to plain data, with the file named in the error."""

from __future__ import annotations

import sys
from typing import Any

from ..errors import RecipeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TOMLDecodeError = tomllib.TOMLDecodeError


def read_toml(text: str, where: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{where}: not valid TOML: {e}") from None
    except RecursionError:  # the parser recurses once per level of nesting
        raise RecipeError(f"{where}: not valid TOML: values nested too deeply") from None
    except ValueError as e:  # an integer of thousands of digits
        raise RecipeError(f"{where}: not valid TOML: {e}") from None
