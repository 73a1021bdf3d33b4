"""atheris: `parse_field` raises only FieldPathError, and a parsed field written back parses
to itself (see harness.py and fuzz/README.md). Run from the repository root:

    python fuzz/python/fuzz_fieldpath.py fuzz/python/work/fieldpath fuzz/python/corpus/fieldpath \
        -dict=fuzz/python/fieldpath.dict -runs=1000000 --keep-going
"""

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))
with atheris.instrument_imports(include=["mmrecipe", "harness"]):
    import harness

import driver  # noqa: E402

if __name__ == "__main__":
    for arg in sys.argv[1:]:
        if not arg.startswith("-"):
            Path(arg).mkdir(parents=True, exist_ok=True)
    driver.run("fieldpath", harness.field_one)
