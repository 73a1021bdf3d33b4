#!/usr/bin/env python3
"""The tokenizer engines alone, one thread, on the same pre-rendered text: the core's fast
byte-level BPE engine against HF `tokenizers` (the Rust crate in-process, and the Python
package's `encode_batch` with its parallelism off), per tokenizer shape.

    python bench/bpe.py [--n 20000] [--data DIR] [--json]

The texts are the bench mix of bench/run.py (LLaVA conversations and ShareGPT chats,
rendered with the SmolLM2 chat template). The shapes are the bundled SmolLM2 BPE model
behind each family's pre-tokenizer (GPT-2 / SmolLM2, Llama-3, Qwen2 with NFC), as the Rust
differential tests build them. Every engine's ids are compared (they must be equal); the
fast engine runs without the build's word cache, so this is the encoder itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread for the Python package too

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import RECIPE, TOKENIZER, generate, reference_texts  # noqa: E402

LLAMA3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def byte_level(use_regex: bool) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


def split(pattern: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}


def shapes(folder: Path) -> dict[str, Path]:
    base = json.loads((TOKENIZER / "tokenizer.json").read_text("utf-8"))
    variants = {
        "smollm2 (digits + GPT-2)": (base["normalizer"], base["pre_tokenizer"], False),
        "gpt2": (None, byte_level(True), False),
        "llama3": (None, {"type": "Sequence", "pretokenizers": [split(LLAMA3), byte_level(False)]}, True),
        "qwen2 (NFC)": ({"type": "NFC"}, {"type": "Sequence", "pretokenizers": [split(QWEN2), byte_level(False)]}, False),
    }
    out = {}
    for name, (normalizer, pre, ignore_merges) in variants.items():
        tok = dict(base, normalizer=normalizer, pre_tokenizer=pre)
        tok["model"] = dict(base["model"], ignore_merges=ignore_merges)
        path = folder / f"{name.split()[0]}.json"
        path.write_text(json.dumps(tok), "utf-8")
        out[name] = path
    return out


def best_of(runs: int, fn):
    best, result = float("inf"), None
    for _ in range(runs):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return best, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000, help="samples of the bench mix to render (default 20000)")
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "mmrecipe-bench", help="where generated data is cached")
    ap.add_argument("--runs", type=int, default=2, help="best of this many runs (default 2)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import numpy as np
    from tokenizers import Tokenizer

    from mmrecipe import _core

    data = args.data / f"n{args.n}"
    generate(data, args.n)
    recipe = data / "bench.toml"
    recipe.write_text(RECIPE.format(tokenizer=TOKENIZER, data=data))
    texts = reference_texts(recipe)
    mb = sum(len(t.encode()) for t in texts) / 1e6
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in shapes(Path(tmp)).items():
            fast_s, (fast_off, fast_ids) = best_of(args.runs, lambda: _core.encode_texts(str(path), texts, "fast"))
            crate_s, (crate_off, crate_ids) = best_of(args.runs, lambda: _core.encode_texts(str(path), texts, "hf"))
            py = Tokenizer.from_file(str(path))
            py.encode_special_tokens = True
            py_s, encoded = best_of(args.runs, lambda: py.encode_batch(texts, add_special_tokens=False))
            py_ids = np.fromiter((i for e in encoded for i in e.ids), dtype=np.uint32)
            if not (np.array_equal(fast_ids, crate_ids) and np.array_equal(fast_off, crate_off) and np.array_equal(fast_ids, py_ids)):
                sys.exit(f"{name}: the engines' ids differ")
            tokens = len(fast_ids)
            figures[name] = {
                "texts": len(texts), "mb": round(mb, 2), "tokens": tokens,
                "fast_s": round(fast_s, 3), "hf_crate_s": round(crate_s, 3), "hf_python_s": round(py_s, 3),
                "fast_mb_per_s": round(mb / fast_s, 1), "fast_tokens_per_s": round(tokens / fast_s),
                "hf_crate_mb_per_s": round(mb / crate_s, 1), "hf_python_mb_per_s": round(mb / py_s, 1),
                "speedup_vs_hf_crate": round(crate_s / fast_s, 2), "speedup_vs_hf_python": round(py_s / fast_s, 2),
            }
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    print(f"{len(texts):,} rendered texts, {mb:.1f} MB, one thread; ids equal across engines on every shape")
    print(f"{'shape':26} {'fast MB/s':>10} {'tokens/s':>12} {'HF crate MB/s':>14} {'HF py MB/s':>11} {'vs crate':>9} {'vs py':>7}")
    for name, f in figures.items():
        print(f"{name:26} {f['fast_mb_per_s']:>10.1f} {f['fast_tokens_per_s']:>12,} {f['hf_crate_mb_per_s']:>14.1f} "
              f"{f['hf_python_mb_per_s']:>11.1f} {f['speedup_vs_hf_crate']:>8.2f}x {f['speedup_vs_hf_python']:>6.2f}x")


if __name__ == "__main__":
    main()
