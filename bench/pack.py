#!/usr/bin/env python3
"""Packing benchmark: BFD, the tight packer and the lower bounds, per mix.

    python bench/pack.py [--n 10000000] [--seq-len 4096] [--mix NAME ...]

Mixes of sample lengths (images count 576 tokens each, one per multimodal sample):

    llava      70 % image + a 30-1500-token conversation, 30 % text chats (the build bench's mix)
    vqa        40 % LLaVA conversations, 25 % VQA and 15 % captions (one image, short text), 20 % text
    alignment  captions only: 576 + 10-40 tokens
    text       90 % text chats, 10 % LLaVA conversations
    llava15    LLaVA-1.5-like: 24 % conversations, 70 % short multi-question VQA, 6 % long ShareGPT

Per mix: the bounds (L1, Martello-Toth L2, counting, Fekete-Schepers DFF), rows and
efficiency (best bound / rows) of BFD and of `packing = "tight"` with their times, and
images per row of the tight packing against `balance = "images"`.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from mmrecipe import _core

MIXES = ("llava", "vqa", "alignment", "text", "llava15")


def mix(name: str, n: int, seq_len: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(lengths, images) of `n` samples of mix `name`."""
    rng = np.random.default_rng(seed)
    u = rng.random(n)

    def conv(mu: float, sigma: float) -> np.ndarray:
        return 576 + rng.lognormal(mu, sigma, n)

    text = rng.lognormal(5.8, 1.0, n)
    short = 576 + rng.integers(10, 61, n).astype(np.float64)
    if name == "llava":
        lengths, image = np.where(u < 0.7, conv(5.3, 0.8), text), u < 0.7
    elif name == "vqa":
        lengths, image = np.select([u < 0.4, u < 0.8], [conv(5.3, 0.8), short], text), u < 0.8
    elif name == "alignment":
        lengths, image = 576 + rng.integers(10, 41, n).astype(np.float64), np.ones(n, bool)
    elif name == "text":
        lengths, image = np.where(u < 0.1, conv(5.3, 0.8), text), u < 0.1
    elif name == "llava15":
        lengths = np.select([u < 0.24, u < 0.6, u < 0.72, u < 0.94], [conv(5.6, 0.7), conv(4.7, 0.5), conv(4.4, 0.4), conv(4.8, 0.5)], rng.lognormal(6.6, 0.9, n))
        image = u < 0.94
    else:
        raise SystemExit(f"unknown mix {name!r}; choose from {', '.join(MIXES)}")
    return np.clip(lengths, 20, seq_len).astype(np.uint32), image.astype(np.uint32)


def timed(lengths: np.ndarray, seq_len: int, packer: str, images: np.ndarray | None = None) -> tuple[int, float, tuple[np.ndarray, np.ndarray]]:
    t = time.perf_counter()
    packed = _core.pack_lengths(lengths, seq_len, packer, images)
    return len(packed[0]) - 1, time.perf_counter() - t, packed


def images_per_row(packed: tuple[np.ndarray, np.ndarray], images: np.ndarray) -> str:
    offsets, items = packed
    per_row = np.add.reduceat(images[items].astype(np.int64), offsets[:-1])
    return f"{per_row.min()}/{int(np.median(per_row))}/{per_row.max()} (sd {per_row.std():.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--mix", nargs="+", default=list(MIXES), choices=MIXES)
    args = ap.parse_args()
    print(f"{args.n:,} lengths per mix, rows of {args.seq_len} tokens; efficiency = best bound / rows")
    print("| mix | L1 | L2 | counting | DFF | BFD rows | BFD | time | tight rows | tight | time | images/row tight: min/median/max | balanced |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.mix:
        lengths, images = mix(name, args.n, args.seq_len)
        b = _core.pack_bounds(lengths, args.seq_len)
        bfd, t_bfd, _ = timed(lengths, args.seq_len, "bfd")
        tight, t_tight, packed = timed(lengths, args.seq_len, "tight")
        balanced = _core.pack_lengths(lengths, args.seq_len, "balanced", images)
        print(
            f"| {name} | {b['l1']:,} | {b['l2']:,} | {b['count']:,} | {b['dff']:,} "
            f"| {bfd:,} | {b['best'] / bfd:.3%} | {t_bfd:.2f} s | {tight:,} | {b['best'] / tight:.3%} | {t_tight:.2f} s "
            f"| {images_per_row(packed, images)} | {images_per_row(balanced, images)}, {len(balanced[0]) - 1:,} rows |"
        )


if __name__ == "__main__":
    main()
