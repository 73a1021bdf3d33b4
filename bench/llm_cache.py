#!/usr/bin/env python3
"""LLM stages served from their caches: what a rebuild pays for lengthening and generation.

    python bench/llm_cache.py [--n 200000]

Writes N VQA-style rows and a cache that answers each of them (as a build against an
endpoint would have left it), then times, in this process:

  lengthen   normalizing the qa source with [lengthen.r] served from the cache (prompts
             filled and hashed in the core, cache joined as columns) against normalizing
             the same source without lengthening: the ratio is the stage's overhead.
  generate   parsing N generated "Question:/Answer:" replies into conversations with the
             core's column parser against a pure-Python line parser of the same format
             (the reference: one Python call per reply).

No endpoint is called: every prompt is in the cache (the run fails otherwise).
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import msgspec
import numpy as np
import polars as pl

from mmrecipe import load_recipe, resolve
from mmrecipe.builder import normalize_source
from mmrecipe.llm import replies
from mmrecipe.llm.cache import Record
from mmrecipe.llm.stages import LLMStages

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "recipes" / "models" / "smollm2"


def write_data(folder: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    objects = ["dog", "cat", "bus", "tree", "person", "car", "kite", "pizza"]
    with open(folder / "vqa.jsonl", "w") as f:
        for i in range(n):
            thing = objects[rng.integers(len(objects))]
            f.write(json.dumps({"question": f"What is next to the {thing} in picture {i}?", "answer": objects[i % 8]}) + "\n")


def recipe_text(lengthen: bool) -> str:
    source = 'name = "vqa"\npath = "vqa.jsonl"\nlayout = "qa"\nfields = { question = "question", answer = "answer" }\n'
    if lengthen:
        source += 'lengthen = "r"\n[lengthen.r]\nmodel = "m"\nprompt = "Question: {question}\\nShort answer: {answer}\\nOne sentence."\n'
    return f'[recipe]\nname = "b"\n[model]\ntokenizer = "{MODEL}"\n[[source]]\n{source}'


def fill_cache(folder: Path) -> None:
    """Runs the stage once in "cache" mode, watching which calls it asks for, then writes
    a cache that answers all of them."""
    recipe = resolve(load_recipe(folder / "len.toml"))
    asked: list[pl.DataFrame] = []
    real_ask = LLMStages._ask

    def watch(self: LLMStages, *args: Any) -> pl.DataFrame:
        asked.append(real_ask(self, *args))
        return asked[-1]

    with mock.patch.object(LLMStages, "_ask", watch), LLMStages(recipe, mode="cache", progress=False) as stages:
        normalize_source(recipe, 0, stages)
    (folder / "cache").mkdir(exist_ok=True)
    encoder = msgspec.json.Encoder()
    with open(folder / "cache" / "lengthen.r.jsonl", "wb") as f:
        for key, text in asked[0].select("key", "text").unique("key", maintain_order=True).iter_rows():
            answer = text.split("Short answer: ", 1)[1].split("\n", 1)[0]
            response = f"The object next to it is a {answer}."
            f.write(encoder.encode(Record(key=key, table="lengthen.r", model="m", prompt=text, response=response, finish="stop")) + b"\n")


def best_of(runs: int, fn) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


# The reference for "generate": one Python call per reply, a line parser of the same format.
_MARK = re.compile(r"^\s*(?:\*\*|##\s*)?(question|answer|q|a|user|human|assistant|gpt)\s*(?:\*\*)?\s*:\s*(?:\*\*)?\s?(.*)$", re.I)


def python_parse(text: str) -> list[tuple[str, str]] | None:
    turns: list[list[str]] = []
    for line in text.split("\n"):
        m = _MARK.match(line)
        if m:
            turns.append(["user" if m.group(1).lower() in ("question", "q", "user", "human") else "assistant", m.group(2)])
        elif turns:
            turns[-1][1] += "\n" + line
    out = [(r, c.strip()) for r, c in turns]
    if out and out[-1][0] == "user":
        out.pop()
    ok = out and all(r == ("user" if i % 2 == 0 else "assistant") and c for i, (r, c) in enumerate(out))
    return out if ok else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_data(folder, args.n)
        (folder / "plain.toml").write_text(recipe_text(False))
        (folder / "len.toml").write_text(recipe_text(True))
        fill_cache(folder)
        plain, lengthened = resolve(load_recipe(folder / "plain.toml")), resolve(load_recipe(folder / "len.toml"))

        def offline() -> None:
            with LLMStages(lengthened, mode="offline", progress=False) as stages:
                normalize_source(lengthened, 0, stages)
            assert stages.counts["lengthen.r"].cached == args.n

        base = best_of(args.runs, lambda: normalize_source(plain, 0))
        served = best_of(args.runs, offline)
        print(f"lengthen, {args.n:,} rows served from the cache:")
        print(f"  normalize without lengthening  {base:7.3f} s")
        print(f"  normalize with lengthening     {served:7.3f} s   ({served / base:.2f}x, {(served - base) / args.n * 1e6:.2f} µs per row more)")

    rng = np.random.default_rng(1)
    texts = [
        "Sure! Here is a conversation.\n"
        + "\n".join(f"Question: What is thing {k} in image {i}?\nAnswer: It is a {'very ' * int(rng.integers(5))}nice thing,\nnumber {k}." for k in range(1 + i % 4))
        for i in range(args.n)
    ]
    column = pl.Series(texts)
    states = np.zeros(args.n, np.uint8)
    core = best_of(args.runs, lambda: replies.parse_column(column, states, "qa", 1))
    python = best_of(args.runs, lambda: [python_parse(t) for t in texts])
    convs, _ = replies.parse_column(column, states, "qa", 1)
    for text, conv in zip(texts[:1000], convs.head(1000).to_list()):  # both read the same turns
        assert python_parse(text) == [("user" if t["from"] == "human" else "assistant", t["value"]) for t in conv]
    print(f"generate, {args.n:,} replies parsed into conversations:")
    print(f"  Python line parser (reference) {python:7.3f} s")
    print(f"  core column parser             {core:7.3f} s   ({python / core:.1f}x faster)")


if __name__ == "__main__":
    main()
