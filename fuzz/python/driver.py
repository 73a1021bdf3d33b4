"""The atheris driver both fuzz_*.py scripts share: runs a harness under libFuzzer, and with
--keep-going records each distinct finding (its input under findings/, one line per kind)
instead of stopping at the first, then prints the executions and findings counts."""

from __future__ import annotations

import atexit
import hashlib
import random
import re
import sys
from pathlib import Path
from typing import Callable

import atheris

HERE = Path(__file__).resolve().parent


def run(name: str, harness: Callable[[bytes], None], mutate: Callable[[bytes, random.Random, Callable[[bytes], bytes]], bytes] | None = None) -> None:
    from harness import Finding  # imported after instrumentation began

    keep_going = "--keep-going" in sys.argv
    argv = [a for a in sys.argv if a != "--keep-going"]
    seen: dict[str, int] = {}
    runs = [0]
    findings_dir = HERE / "findings" / name

    def one(data: bytes) -> None:
        runs[0] += 1
        try:
            harness(data)
        except Finding as f:
            if not keep_going:
                raise
            seen[f.signature] = seen.get(f.signature, 0) + 1
            if seen[f.signature] == 1:
                findings_dir.mkdir(parents=True, exist_ok=True)
                slug = re.sub(r"[^A-Za-z0-9]+", "-", f.signature).strip("-")[:60]
                (findings_dir / f"{slug}-{hashlib.sha1(data).hexdigest()[:10]}").write_bytes(data)
                print(f"\n[finding] {f}\n", file=sys.stderr, flush=True)

    def report() -> None:
        total = sum(seen.values())
        print(f"\n[{name}] {runs[0]} executions, {total} failing inputs, {len(seen)} distinct findings", file=sys.stderr)
        for sig, n in sorted(seen.items(), key=lambda kv: -kv[1]):
            print(f"  {n:8d}  {sig}", file=sys.stderr)

    atexit.register(report)
    kwargs = {}
    if mutate is not None:

        def custom(data: bytes, max_size: int, seed: int) -> bytes:
            out = mutate(data, random.Random(seed), lambda d: atheris.Mutate(d, max_size))
            return out[:max_size]

        kwargs["custom_mutator"] = custom
    atheris.Setup(argv, one, **kwargs)
    atheris.Fuzz()
