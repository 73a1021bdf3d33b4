#!/usr/bin/env python3
"""Loader throughput: packed sequences per second from a release into torch tensors.

    python bench/loader.py RELEASE [--batch-size 8] [--workers 0 2] [--flatten]

Reads every row of the release once through `mmrecipe.torch.dataloader` per worker setting
and prints sequences/s and tokens/s.
"""

from __future__ import annotations

import argparse
import time

from mmrecipe.torch import dataloader


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("release")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--flatten", action="store_true")
    args = ap.parse_args()
    for workers in args.workers:
        loader = dataloader(args.release, batch_size=args.batch_size, num_workers=workers, flatten=args.flatten)
        t = time.perf_counter()
        rows = tokens = 0
        for batch in loader:
            rows += len(batch["images"]) if not args.flatten else int(batch["cu_seqlens"].numel() > 0)
            tokens += int(batch["input_ids"].numel())
        seconds = time.perf_counter() - t
        print(f"workers={workers}: {len(loader.dataset):,} sequences in {seconds:.2f} s = {len(loader.dataset) / seconds:,.0f} seq/s, {tokens / seconds / 1e6:.1f} M tokens/s")


if __name__ == "__main__":
    main()
