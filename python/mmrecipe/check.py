"""`recipe check`: everything a build would reject, found without building."""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import polars as pl

from . import imageref
from .builder import normalize_source
from .compile import make_compiler
from .errors import DataError
from .llm.pools import PoolResult, expand_pools
from .llm.stages import LLMStages
from .recipe import Plan, Recipe, load_recipe, resolve
from .recipe.model import ModelFiles
from .sources.columns import IMAGES, ROW, Normalized

ImageMode = Literal["all", "sample", "none"]

#: Images opened per source with images="sample".
SAMPLE_IMAGES = 200
#: Unusable images listed per source in a report.
SHOWN_PROBLEMS = 5


@dataclass
class ImageProblem:
    row: int
    path: str
    why: str


@dataclass
class ImageCheck:
    """The images of one source that were opened, and those that could not be."""

    source: str
    on_error: str
    total: int
    checked: int
    problems: list[ImageProblem] = field(default_factory=list)

    def describe(self) -> str:
        head = f"source '{self.source}': {len(self.problems)} of {self.checked} checked images are unusable"
        lines = [f"    row {p.row}, field 'image': {p.path}: {p.why}" for p in self.problems[:SHOWN_PROBLEMS]]
        more = len(self.problems) - SHOWN_PROBLEMS
        return "\n".join([head, *lines] + ([f"    ... and {more} more"] if more > 0 else []))


@dataclass
class CheckReport:
    plan: Plan
    model: ModelFiles
    sources: list[Normalized]
    images: list[ImageCheck] = field(default_factory=list)
    #: Problems the build would skip rather than fail on (on_error = "skip").
    warnings: list[str] = field(default_factory=list)
    #: Per LLM table: rows, served from the cache, missing (a build would call for those).
    llm: dict[str, dict[str, int]] = field(default_factory=dict)
    #: The engine a build will tokenize with ("fast" or "hf") and why.
    tokenizer_engine: tuple[str, str] = ("hf", "")
    #: Generated pools as the call cache holds them: templates and what was left out.
    pools: dict[str, PoolResult] = field(default_factory=dict)


def check(recipe: str | Path | Recipe | Plan, images: ImageMode = "sample") -> CheckReport:
    """Validates the recipe, reads and normalizes every source (resolving every field
    path), loads the tokenizer and compiles the chat template and instruction templates,
    then opens the sources' image files (`images`: "all", "sample" — up to
    SAMPLE_IMAGES per source, evenly spread over the rows — or "none").
    LLM stages make no calls: the report counts what their caches hold and lack.
    Raises the first `MMRecipeError` found; recipe-level problems are reported together,
    and so are unusable images of every source with on_error = "fail"."""
    plan = recipe if isinstance(recipe, Plan) else resolve(recipe if isinstance(recipe, Recipe) else load_recipe(recipe))
    with LLMStages(plan, mode="cache", progress=False) as stages:  # no calls: what the caches hold
        plan, pools = expand_pools(plan, stages)
        sources = [normalize_source(plan, source.index, stages) for source in plan.sources]
    engine = make_compiler(plan, threads=1).tokenizer_engine()
    report = CheckReport(plan, plan.model, sources, warnings=[n for s in sources for n in s.notes], llm=stages.summary(), tokenizer_engine=engine, pools=pools)
    if images != "none":
        report.images = [_check_images(norm, images) for norm in sources]
        _raise_or_warn(report)
    return report


def _check_images(norm: Normalized, mode: ImageMode) -> ImageCheck:
    paths = norm.frame.select(ROW, IMAGES).explode(IMAGES).drop_nulls(IMAGES)
    total = paths.height
    if mode == "sample" and total > SAMPLE_IMAGES:
        # Evenly spread over the rows, so the same recipe always checks the same images.
        picks = pl.int_range(SAMPLE_IMAGES, eager=True, dtype=pl.Int64) * total // SAMPLE_IMAGES
        paths = paths[picks.to_list()]
    root = norm.source.image_root or Path()
    rows_and_paths = paths.rows()
    with ThreadPoolExecutor(max_workers=min(32, (os.cpu_count() or 1) * 4)) as pool:
        found = list(pool.map(lambda rp: _image_problem(root, *rp), rows_and_paths))
    return ImageCheck(norm.source.name, norm.source.spec.on_error, total, len(rows_and_paths), [p for p in found if p])


def _image_problem(root: Path, row: int, rel: str) -> ImageProblem | None:
    """Opens one image and reads its header only (no pixel decoding)."""
    from PIL import Image, UnidentifiedImageError

    path = root / rel
    container = imageref.parse(str(path))
    if not Path(container.container if container else path).is_file():
        return ImageProblem(row, rel, f"file not found ({container.container if container else path})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with imageref.opened(str(path), header_only=True) as src, Image.open(src) as im:
                width, height = im.size
    except Image.DecompressionBombError:
        return None  # very large, but a readable image: the model's processor decides
    except UnidentifiedImageError:
        return ImageProblem(row, rel, f"not an image PIL can read ({path})")
    except OSError as e:
        return ImageProblem(row, rel, f"cannot read {path}: {e}")
    if width == 0 or height == 0:
        return ImageProblem(row, rel, f"zero-size image ({path})")
    return None


def _raise_or_warn(report: CheckReport) -> None:
    failing = [c for c in report.images if c.problems and c.on_error == "fail"]
    report.warnings += [
        c.describe() + "\n    (on_error = \"skip\": the build skips these rows)" for c in report.images if c.problems and c.on_error == "skip"
    ]
    if not failing:
        return
    err = DataError(
        "\n".join(c.describe() for c in failing)
        + "\nfix the image files or the sources' image_root, or set on_error = \"skip\" to skip rows with unusable images"
    )
    first = failing[0]
    err.source, err.row, err.field = first.source, first.problems[0].row, "image"
    raise err

