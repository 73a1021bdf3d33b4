"""The recipe: its language (`schema`), checks (`validate`), derivation (`extends`),
template pools (`pools`), loading (`load`), the model files (`model`), and the `Plan` it
resolves to once (`plan`)."""

from .load import load_recipe, parse_recipe
from .plan import Plan, SourcePlan, resolve
from .schema import ImageSpec, Recipe

__all__ = ["ImageSpec", "Plan", "Recipe", "SourcePlan", "load_recipe", "parse_recipe", "resolve"]
