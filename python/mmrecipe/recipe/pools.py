"""Instruction-template pools: the built-ins shipped with mmrecipe (`pools/*.toml`) and
those a recipe defines under `[pool.NAME]`."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec

from ..errors import recipe_error
from .schema import PoolSpec
from .tomlfile import TOMLDecodeError, read_toml


# How a manifest names a built-in pool file: "mmrecipe:pools/vqa-short.toml".
BUILTIN_PREFIX = "mmrecipe:pools/"


def pools_dir() -> Path:
    """The built-in template pools shipped with mmrecipe."""
    return Path(__file__).resolve().parent.parent / "pools"


def builtin_pools() -> list[str]:
    return sorted(p.stem for p in pools_dir().glob("*.toml"))


def builtin_pool_path(name: str) -> Path | None:
    """The built-in pool file of that name; None for any name that is not one (a path, a
    name too long for the file system)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,100}", name):
        return None
    path = pools_dir() / f"{name}.toml"
    return path if path.is_file() else None


def load_pool(name: str, defined: dict[str, PoolSpec]) -> PoolSpec:
    """A pool the recipe defines (`defined`), else a built-in one."""
    if name in defined:
        return defined[name]
    path = builtin_pool_path(name)
    if path is None:
        raise recipe_error(f"no template pool named '{name}'", key="pool")
    try:
        return msgspec.convert(read_toml(path.read_text("utf-8"), f"built-in pool {path}"), PoolSpec)
    except (msgspec.ValidationError, TOMLDecodeError) as e:
        raise recipe_error(f"built-in pool {path}: {e}", key=f"pool.{name}") from None
