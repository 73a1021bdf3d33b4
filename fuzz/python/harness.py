"""Fuzz harnesses for the Python-side parsers, shared by the atheris drivers in this folder
and by tests/test_fuzz_smoke.py.

* `recipe_one(data)`: `parse_recipe` on the bytes as text; it must return a recipe or raise
  an `MMRecipeError`, never anything else.
* `field_one(data)`: `parse_field` on the bytes as text; it must return a field or raise a
  `FieldPathError`, and a parsed field written back (`str`) parses to itself.

Each raises `Finding` for a broken contract. `mutate_recipe` is a structure-aware mutator:
it parses a recipe, changes one value to a hostile one (huge, negative, NaN, empty, a
folder, brace soup, ...) or drops, copies or adds a key, and writes it back; random
byte-level mutation covers what TOML cannot express."""

from __future__ import annotations

import copy
import math
import random
import tomllib
import traceback
from typing import Any, Callable

import tomli_w

from mmrecipe import MMRecipeError, parse_recipe  # noqa: E402  (the only mmrecipe imports)
from mmrecipe.sources.fieldpath import FieldPathError, parse_field  # noqa: E402


class Finding(Exception):
    """A parser broke its contract: `signature` names the exception and where it rose."""

    def __init__(self, signature: str, detail: str):
        super().__init__(f"{signature}\n{detail}")
        self.signature = signature


def _signature(e: BaseException) -> str:
    frames = traceback.extract_tb(e.__traceback__)
    inner = next((f for f in reversed(frames) if "mmrecipe" in f.filename), frames[-1] if frames else None)
    where = f"{inner.filename.rsplit('/', 1)[-1]}:{inner.name}" if inner else "?"
    return f"{type(e).__name__} in {where}"


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def _skipped(text: str) -> bool:
    # Device files and FIFOs as `extends` would block the fuzzer itself (a known finding,
    # reported separately); so would megabyte-long inputs to the TOML parser.
    return "/dev/" in text or "/proc/" in text or "/sys/" in text or len(text) > 1 << 16


def recipe_one(data: bytes) -> None:
    text = _text(data)
    if _skipped(text):
        return
    try:
        parse_recipe(text)
    except MMRecipeError:
        pass
    except Exception as e:  # noqa: BLE001  (anything else is the finding)
        raise Finding(_signature(e), "".join(traceback.format_exception(e))[-2000:]) from None


def field_one(data: bytes) -> None:
    text = _text(data)
    if len(text) > 1 << 16:
        return
    try:
        field = parse_field(text)
    except FieldPathError:
        return
    except Exception as e:  # noqa: BLE001
        raise Finding(_signature(e), "".join(traceback.format_exception(e))[-2000:]) from None
    written = str(field)
    try:
        again = parse_field(written)
    except Exception as e:  # noqa: BLE001
        raise Finding(f"written-back field does not parse ({type(e).__name__})", f"{text!r} -> {written!r}: {e}") from None
    if again != field:
        raise Finding("written-back field differs", f"{text!r} -> {written!r}: {field!r} != {again!r}")


HOSTILE: list[Any] = [
    0, -1, 1, 2, 15, 16, 2**31, 2**32, 2**63, 2**64, 2**70, -(2**70), 10**12, 10**9,
    0.0, -0.0, 1e-300, 1e308, math.inf, -math.inf, math.nan, 0.5,
    True, False, "", " ", "x" * 3000, "x" * 300, "../../esc", ".", "..", "/", "~", "~nosuchuser/r.toml", "dir",
    "base.toml", "\x00", "a\x00b", "\ud7ff", "é",
    "{", "}", "{x}", "{{", "{question}", "{image_id:012}", "a[0].b", "a[*].b", "most_common(a)", "options(x)",
    "letter(x)", "x(", "*.json", "**/*.jsonl", "[", "natural", "drop", "truncate", "split_turns", "assistant",
    "all", "model", "chatml", "fail", "skip", "qa", "caption", "conversation", "alpaca", "demo", "recipe.toml",
    [], [1], ["a", "b"], [{}], {}, {"samples": 1}, {"tokens": 10**15}, {"samples": -1}, {"k": 1},
    "a[" + "9" * 5000 + "]", "{a:0" + "9" * 12 + "}",
]


def _deep(n: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(n):
        value = [value]
    return value


HOSTILE.append(_deep(900))
KEYS = [
    "recipe", "model", "output", "mixture", "source", "pool", "extends", "remove", "name", "version", "seed",
    "tokenizer", "chat_template", "image", "placeholder", "token", "count", "patch", "merge", "min_pixels",
    "max_pixels", "seq_len", "packing", "train_on", "overlong", "shard_sequences", "total", "alpha", "path",
    "layout", "fields", "instructions", "image_root", "weight", "max_epochs", "join", "json_key", "group_by",
    "on_error", "lengthen", "generate", "templates", "roles", "short_answer", "question", "answer", "caption",
]


def _nodes(value: Any, out: list[tuple[Any, Any]]) -> None:
    """Every (container, key) pair in the document, for picking what to change."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in list(items):
        out.append((value, k))
        _nodes(v, out)


def mutate_doc(doc: dict[str, Any], rng: random.Random) -> None:
    nodes: list[tuple[Any, Any]] = []
    _nodes(doc, nodes)
    containers = [doc] + [c[k] for c, k in nodes if isinstance(c[k], (dict, list))]
    for _ in range(1 + rng.randrange(3)):
        op = rng.randrange(6)
        if nodes and op <= 2:
            c, k = rng.choice(nodes)
            if isinstance(c, dict) and k not in c or isinstance(c, list) and k >= len(c):
                continue
            if op == 0:
                c[k] = rng.choice(HOSTILE)
            elif op == 1 and isinstance(c, dict):
                del c[k]
            else:
                other, j = rng.choice(nodes)
                if (isinstance(other, dict) and j in other) or (isinstance(other, list) and j < len(other)):
                    c[k] = copy.deepcopy(other[j])  # a copy: never a cycle
        elif op == 3:
            target = rng.choice(containers)
            value = rng.choice(HOSTILE)
            if isinstance(target, dict):
                target[rng.choice(KEYS)] = value
            else:
                target.append(value)
        elif op == 4 and isinstance(doc.get("source"), list) and doc["source"]:
            doc["source"].append(copy.deepcopy(rng.choice(doc["source"])) if isinstance(doc["source"][0], dict) else {})
        elif nodes:
            c, k = rng.choice(nodes)
            if isinstance(c, dict) and isinstance(c.get(k), str):
                s = c[k]
                i = rng.randrange(len(s) + 1)
                c[k] = s[:i] + rng.choice(["{", "}", "{{", "[", "]", "(", ")", ".", "*", "\\", "\n", "\x00", "é"]) + s[i:]


def mutate_recipe(data: bytes, rng: random.Random, byte_mutate: Callable[[bytes], bytes] | None = None) -> bytes:
    """One structure-aware mutation of a recipe (or a byte-level one when it does not parse
    as TOML, or now and then)."""
    if byte_mutate is not None and rng.random() < 0.25:
        return byte_mutate(data)
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        return byte_mutate(data) if byte_mutate is not None else data
    mutate_doc(doc, rng)
    try:
        return tomli_w.dumps(doc).encode("utf-8")
    except (TypeError, ValueError, RecursionError):
        return data
