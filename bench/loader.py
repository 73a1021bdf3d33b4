#!/usr/bin/env python3
"""Loader throughput, with and without pixels, against a plain PIL + processor loop.

    python bench/loader.py RELEASE --recipe-dir recipes [--batch-size 8] [--workers 0 2] [--epochs 3] [--flatten]

For each worker setting, a persistent DataLoader reads the whole release once to warm up
(workers started, files cached) and then `--epochs` more times, timed: rows/s and
images/s for token batches and for batches with pixels (the built-in CLIP pixels sized to
the release's count rule, or transformers' Qwen2-VL image processor for the grid rule).
The reference opens the same images in the same order with PIL (RGB, EXIF orientation)
and runs the same processor once per batch in the main process; the ratio is loader
images/s over reference images/s.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from mmrecipe.loader.pixels import Pixels, open_image
from mmrecipe.torch import PackedDataset, dataloader


def timed(loader: Any, epochs: int) -> tuple[float, int, int]:
    for _ in loader:  # warm-up
        pass
    rows = images = 0
    t = time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            rows += len(batch.rows)
            images += sum(len(r) for r in batch.images) if not loader.collate_fn.flatten else len(batch.images)
    return time.perf_counter() - t, rows, images


def reference(loader: Any, processor: Any, epochs: int) -> tuple[float, int]:
    """The same images, batch by batch, opened and processed in a plain loop."""
    batches = [[rec["path"] for row in b.images for rec in (row if isinstance(row, list) else [row])] for b in loader]
    pixels = Pixels(processor, loader.dataset.rule)
    n = 0
    t = time.perf_counter()
    for _ in range(epochs):
        for paths in batches:
            if paths:
                pixels([open_image(p) for p in paths])
                n += len(paths)
    return time.perf_counter() - t, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("release")
    ap.add_argument("--recipe-dir", required=True, help="the folder of the release's recipe (for image roots)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--flatten", action="store_true")
    args = ap.parse_args()
    rule = PackedDataset(args.release).rule
    processor = "qwen2-vl" if rule is not None and rule.grid else "clip"
    common = dict(batch_size=args.batch_size, flatten=args.flatten, recipe_dir=args.recipe_dir)
    for workers in args.workers:
        extra = dict(num_workers=workers, persistent_workers=workers > 0)
        tokens = dataloader(args.release, **common, **extra)
        seconds, rows, _ = timed(tokens, args.epochs)
        print(f"workers={workers} tokens only: {rows / seconds:9,.0f} rows/s")
        if rule is None:
            continue
        with_pixels = dataloader(args.release, image_processor=processor, **common, **extra)
        seconds, rows, images = timed(with_pixels, args.epochs)
        ref_seconds, ref_images = reference(with_pixels, processor, args.epochs)
        ratio = (images / seconds) / (ref_images / ref_seconds)
        print(f"workers={workers} with pixels: {rows / seconds:9,.0f} rows/s  {images / seconds:9,.0f} images/s   "
              f"plain PIL + {processor} loop: {ref_images / ref_seconds:9,.0f} images/s   ratio {ratio:.2f}")


if __name__ == "__main__":
    main()
