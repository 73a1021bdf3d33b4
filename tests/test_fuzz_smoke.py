"""Short deterministic runs of the Python-side fuzz harnesses (fuzz/python/harness.py): the
seed corpus, then fixed-seed mutants of it. The long atheris runs are in fuzz/README.md."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parent.parent / "fuzz" / "python"
sys.path.insert(0, str(FUZZ))
import harness  # noqa: E402

# Contract breaks the fuzzers found, by signature (exception and where it rose). Each was
# fixed; the inputs stay below as regression tests. A new finding goes here while it is
# open, with a strict-xfail test of its input.
KNOWN: set[str] = set()


@pytest.mark.parametrize(
    "text",
    [
        'extends = "dir"\n',
        'extends = "%s"\n' % ("x" * 3000),
        'extends = "a\\u0000b"\n',
        'extends = "~nosuchuser/r.toml"\n',
        "a = " + "[" * 1000 + "]" * 1000 + "\n",
        (FUZZ / "corpus" / "recipe" / "demo.toml").read_text().replace('"vqa-short"', '"%s"' % ("x" * 300)),
        'extends = "base.toml"\n[[source]]\nname = { a = 1 }\n',
    ],
    ids=["folder", "long-name", "nul", "unknown-user", "deep-nesting", "long-pool-name", "table-as-name"],
)
def test_fixed_recipe_findings(recipe_home, text):
    harness.recipe_one(text.encode())


@pytest.mark.parametrize("text", ["a[" + "9" * 5000 + "]", "{a:0" + "9" * 5000 + "}"], ids=["index", "pad"])
def test_fixed_field_findings(text):
    harness.field_one(text.encode())


def _byte_mutator(rng: random.Random):
    def mutate(data: bytes) -> bytes:
        b = bytearray(data)
        for _ in range(1 + rng.randrange(4)):
            at = rng.randrange(len(b) + 1)
            op = rng.randrange(4)
            if op == 0 and b:
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            elif op == 1:
                b[at:at] = rng.choice([b"{", b"}", b"[", b"]", b"=", b'"', b"\n", b".", b"[[source]]\n", b"\\u0000"])
            elif op == 2:
                del b[at : at + rng.randrange(1, 16)]
            else:
                b[at:at] = bytes([rng.randrange(256)])
        return bytes(b)

    return mutate


def _corpus(name: str) -> list[bytes]:
    files = sorted((FUZZ / "corpus" / name).iterdir())
    assert files, f"no seeds in fuzz/python/corpus/{name}"
    return [f.read_bytes() for f in files]


def _run(harness_fn, inputs) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    for data in inputs:
        try:
            harness_fn(data)
        except harness.Finding as f:
            found.setdefault(f.signature, data)
    return found


@pytest.fixture
def recipe_home(tmp_path, monkeypatch):
    """The working directory the recipe fuzzer uses: `extends` finds a base and a folder."""
    (tmp_path / "base.toml").write_bytes((FUZZ / "corpus" / "recipe" / "demo.toml").read_bytes())
    (tmp_path / "dir").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_recipe_parser_raises_only_its_own_errors(recipe_home):
    rng = random.Random(20240601)
    seeds = _corpus("recipe")
    byte_mutate = _byte_mutator(rng)

    def inputs():
        yield from seeds
        for i in range(200):
            data = seeds[i % len(seeds)]
            for _ in range(1 + rng.randrange(3)):
                data = harness.mutate_recipe(data, rng, byte_mutate)
            yield data

    found = _run(harness.recipe_one, inputs())
    unexpected = {sig: data[:300] for sig, data in found.items() if sig not in KNOWN}
    assert not unexpected, unexpected


def test_field_parser_raises_only_its_own_errors_and_round_trips():
    rng = random.Random(7)
    seeds = _corpus("fieldpath")
    byte_mutate = _byte_mutator(rng)
    tokens = [line.strip().strip('"').encode() for line in (FUZZ / "fieldpath.dict").read_text().splitlines() if line.strip()]

    def inputs():
        yield from seeds
        for i in range(3000):
            data = seeds[i % len(seeds)]
            for _ in range(1 + rng.randrange(3)):
                if rng.random() < 0.5:
                    at = rng.randrange(len(data) + 1)
                    data = data[:at] + rng.choice(tokens) + data[at:]
                else:
                    data = byte_mutate(data)
            yield data

    found = _run(harness.field_one, inputs())
    unexpected = {sig: data[:300] for sig, data in found.items() if sig not in KNOWN}
    assert not unexpected, unexpected


def test_harness_reports_a_broken_contract(monkeypatch):
    """The harness itself: an exception that is not mmrecipe's is a finding."""

    def broken(text: str):
        raise KeyError("x")

    monkeypatch.setattr(harness, "parse_recipe", broken)
    with pytest.raises(harness.Finding, match="KeyError"):
        harness.recipe_one(b"[recipe]\n")
    monkeypatch.setattr(harness, "parse_field", broken)
    with pytest.raises(harness.Finding, match="KeyError"):
        harness.field_one(b"a.b")
