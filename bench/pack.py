#!/usr/bin/env python3
"""Packing benchmark: best-fit-decreasing over the whole build.

    python bench/pack.py [--n 10000000] [--seq-len 4096]

Packs N sample lengths drawn like a LLaVA-style mix (multimodal samples: 576 image tokens
plus a 30-1500-token conversation; text-only samples: 20-3500 tokens) and prints the time,
the efficiency against the lower bound ⌈Σ lengths / seq_len⌉, and, for comparison, the
efficiency of the same packer run on consecutive 1,000-sample chunks (how peers pack).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from mmrecipe import _core


def lengths(n: int, seq_len: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    multimodal = rng.random(n) < 0.7
    text = np.where(multimodal, rng.lognormal(5.3, 0.8, n), rng.lognormal(5.8, 1.0, n))
    out = np.where(multimodal, 576 + text, text)
    return np.clip(out, 20, seq_len).astype(np.uint32)


def efficiency(l: np.ndarray, seq_len: int, bins: int) -> float:
    return -(-int(l.sum()) // seq_len) / bins


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--seq-len", type=int, default=4096)
    args = ap.parse_args()
    l = lengths(args.n, args.seq_len)
    t = time.perf_counter()
    offsets, _ = _core.pack_lengths(l, args.seq_len)
    seconds = time.perf_counter() - t
    bins = len(offsets) - 1
    chunked = 0
    sample = l[: min(len(l), 1_000_000)]
    for lo in range(0, len(sample), 1000):
        chunked += len(_core.pack_lengths(sample[lo : lo + 1000], args.seq_len)[0]) - 1
    print(f"{args.n:,} lengths packed into {bins:,} rows of {args.seq_len} in {seconds:.2f} s")
    print(f"  whole-build BFD:        {efficiency(l, args.seq_len, bins):.4%} of the lower bound")
    print(f"  BFD per 1,000 samples:  {efficiency(sample, args.seq_len, chunked):.4%} (first {len(sample):,} lengths)")


if __name__ == "__main__":
    main()
