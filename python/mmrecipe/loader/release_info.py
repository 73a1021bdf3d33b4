"""What a release says about its images: the image rule of its recipe, the image token id
and each source's image root. Newer releases record the token id and the roots in the
manifest; for older ones the roots come from the recipe the manifest embeds (resolved
against the recipe's folder, given as `recipe_dir`), and the token id from the rows."""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..errors import ReleaseError
from ..release.format import MANIFEST

# Manifest fields a newer build writes; read from the raw JSON so that a release written
# before them (or a reader older than them) still loads.
TOKEN_ID_FIELD = "image_token_id"
ROOTS_FIELD = "image_roots"


@dataclass(frozen=True)
class ImageRule:
    """`model.image` of the recipe: a fixed `count` per image, or the Qwen2-VL grid rule."""

    token: str
    count: int | None
    patch: int
    merge: int
    min_pixels: int
    max_pixels: int

    @property
    def grid(self) -> bool:
        return self.count is None

    def describe(self) -> str:
        if not self.grid:
            return f"model.image.count = {self.count}"
        return (f"model.image: patch = {self.patch}, merge = {self.merge}, "
                f"min_pixels = {self.min_pixels}, max_pixels = {self.max_pixels}")


def raw_manifest(release: Path) -> dict[str, Any]:
    return json.loads((Path(release) / MANIFEST).read_text("utf-8"))


def image_rule(raw: Mapping[str, Any]) -> ImageRule | None:
    image = (raw.get("recipe") or {}).get("model", {}).get("image")
    if not image:
        return None
    return ImageRule(
        token=image.get("token", "<image>"),
        count=image.get("count"),
        patch=int(image.get("patch", 14)),
        merge=int(image.get("merge", 2)),
        min_pixels=int(image.get("min_pixels", 56 * 56)),
        max_pixels=int(image.get("max_pixels", 28 * 28 * 1280)),
    )


def recorded_token_id(raw: Mapping[str, Any]) -> int | None:
    """The image token id the build recorded (manifest `image.token_id`), if any."""
    value = (raw.get("image") or {}).get("token_id", raw.get(TOKEN_ID_FIELD))
    return int(value) if value is not None else None


def _source_specs(recipe: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    specs = {s["name"]: s for s in recipe.get("generate", []) if "name" in s}
    specs.update({s["name"]: s for s in recipe.get("source", []) if "name" in s})
    return specs


def _resolved(value: str, base: Path | None) -> Path | None:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p if base is not None else None)


def _default_root(path: Any, base: Path | None) -> Path | None:
    """The folder of a source's first file, as the build takes it."""
    first = path[0] if isinstance(path, list) and path else path
    full = _resolved(first, base) if isinstance(first, str) else None
    if full is None:
        return None
    if any(c in first for c in "*?["):
        matches = sorted(glob.glob(str(full), recursive=True))
        return Path(matches[0]).parent if matches else None
    return full.parent


def image_roots(
    raw: Mapping[str, Any],
    sources: list[str],
    given: Mapping[str, str | Path] | None = None,
    recipe_dir: str | Path | None = None,
) -> dict[str, Path | None]:
    """Each source's image root: `given` first (to move a release between machines), then
    the manifest's recorded roots, then the embedded recipe's `image_root` (or the folder
    of the source's file); the last two are relative to `recipe_dir` (unless absolute).
    None where unknown."""
    return media_roots("image", raw, sources, given, recipe_dir)


def media_roots(
    medium: str,
    raw: Mapping[str, Any],
    sources: list[str],
    given: Mapping[str, str | Path] | None = None,
    recipe_dir: str | Path | None = None,
) -> dict[str, Path | None]:
    """As `image_roots`, for the files of `medium` ("image" or "audio"): the manifest's
    `{medium}_roots` and the recipe's `{medium}_root`."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(sources))
    if unknown:
        raise ValueError(f"{medium}_roots names {unknown}, which are not sources of this release ({sources})")
    recorded = raw.get(f"{medium}_roots") or {}
    specs = _source_specs(raw.get("recipe") or {})
    base = Path(recipe_dir).expanduser() if recipe_dir is not None else None
    roots: dict[str, Path | None] = {}
    for name in sources:
        spec = specs.get(name, {})
        if name in given:
            roots[name] = Path(given[name]).expanduser()
        elif recorded.get(name) is not None and (base is not None or Path(recorded[name]).is_absolute()):
            roots[name] = _resolved(recorded[name], base)
        elif spec.get(f"{medium}_root"):
            roots[name] = _resolved(spec[f"{medium}_root"], base)
        else:
            roots[name] = _default_root(spec.get("path"), base)
    return roots


def missing_roots_error(release: Path, names: list[str], raw: Mapping[str, Any]) -> ReleaseError:
    where = ("the manifest records them relative to the recipe: pass recipe_dir=THE_RECIPE_FOLDER"
             if raw.get(ROOTS_FIELD) else
             "this release's manifest does not record image roots: pass recipe_dir=THE_RECIPE_FOLDER "
             "(roots are then taken from the recipe it embeds)")
    example = ", ".join(f'"{n}": "/path/to/images"' for n in names[:2])
    return ReleaseError(f"{release}: cannot tell where the images of source(s) {names} are; {where}, "
                        f"or image_roots={{{example}}}")
