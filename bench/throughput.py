#!/usr/bin/env python3
"""Render + tokenize + mask throughput of the core against the bare HF `tokenizers`
`encode_batch` over the same rendered texts, in one script.

    python bench/throughput.py [--n 20000] [--data DIR]

Uses bench/run.py's generated LLaVA-style data (generated if missing). The core runs with 1
thread and with every core, to show how it scales; `encode_batch` uses its own thread pool.
Each measurement is the best of two runs.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402


def best_of_two(fn) -> float:
    best = float("inf")
    for _ in range(2):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "mmrecipe-bench")
    args = ap.parse_args()
    data = args.data / f"n{args.n}"
    run.generate(data, args.n)
    recipe = data / "bench.toml"
    recipe.write_text(run.RECIPE.format(tokenizer=run.TOKENIZER, data=data))

    from mmrecipe.builder import normalize_source
    from mmrecipe.compile import batch_columns, make_compiler
    from mmrecipe.recipe import load_recipe, resolve

    r = resolve(load_recipe(recipe))
    sources = [normalize_source(r, s.index) for s in r.sources]
    batches = [(i, batch_columns(norm, lo, 8192)) for i, norm in enumerate(sources) for lo in range(0, len(norm), 8192)]
    samples = sum(len(s) for s in sources)

    def core(threads: int) -> float:
        def once() -> None:
            comp = make_compiler(r, threads=threads)
            for i, b in batches:
                comp.add_batch(i, b)

        return best_of_two(once)

    # The reference runs in a fresh process (as in run.py): encode_batch is markedly slower
    # in a process that has already done other work, and it gets the benefit of the doubt.
    texts_file = data / "rendered.pkl"
    with open(texts_file, "wb") as f:
        pickle.dump(run.reference_texts(recipe), f)
    proc = subprocess.run([sys.executable, run.__file__, "--reference", str(texts_file)], capture_output=True, text=True, check=True)
    ref = json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]
    texts_file.unlink()
    one = core(1)
    all_cores = core(0)
    print(f"{samples:,} samples (LLaVA-style conversations + ShareGPT chats), {os.cpu_count()} cores")
    print(f"  encode_batch (rendered text only)   {ref:7.2f} s  {samples / ref:9,.0f} samples/s")
    print(f"  core, 1 thread (render+tok+mask)    {one:7.2f} s  {samples / one:9,.0f} samples/s  {ref / one:.2f}x")
    print(f"  core, all cores                     {all_cores:7.2f} s  {samples / all_cores:9,.0f} samples/s  {ref / all_cores:.2f}x")


if __name__ == "__main__":
    main()
