"""atheris: `parse_recipe` raises only mmrecipe's own exceptions (see harness.py and
fuzz/README.md). Run from the repository root:

    python fuzz/python/fuzz_recipe.py fuzz/python/work/recipe fuzz/python/corpus/recipe -runs=1000000 --keep-going
"""

import os
import sys
import tempfile
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))
with atheris.instrument_imports(include=["mmrecipe", "harness", "tomllib"]):
    import harness

import driver  # noqa: E402

try:
    # Speed only: the recipe check looks up each struct's type hints on every call (80% of a
    # parse); caching the pure lookup gives the same results ~5x faster. A no-op once the
    # parser caches it itself; remove then.
    import functools

    import mmrecipe.recipe as _recipe

    _recipe._struct_fields = functools.cache(_recipe._struct_fields)
except (ImportError, AttributeError):
    pass

if __name__ == "__main__":
    # `extends` resolves against the working directory: give it a base recipe and a folder.
    home = Path(tempfile.mkdtemp(prefix="mmrecipe-fuzz-"))
    corpus = Path(__file__).resolve().parent / "corpus" / "recipe"
    (home / "base.toml").write_bytes((corpus / "demo.toml").read_bytes())
    (home / "dir").mkdir()
    for arg in sys.argv[1:]:
        if not arg.startswith("-"):
            Path(arg).mkdir(parents=True, exist_ok=True)
    sys.argv = [sys.argv[0], *(str(Path(a).resolve()) if not a.startswith("-") else a for a in sys.argv[1:])]
    os.chdir(home)
    driver.run("recipe", harness.recipe_one, harness.mutate_recipe)
