#!/usr/bin/env python3
"""End-to-end benchmark: a LLaVA-style mix built by `recipe build`, against the bare HF
`tokenizers` `encode_batch` over the same rendered texts, in one script.

    python bench/run.py [--n 200000] [--threads 0] [--tokenizer-engine auto|hf|fast] [--data DIR] [--json]
    python bench/run.py --rebuild [--n 100000]

--rebuild measures the token store instead: a clean build without it, a clean build that
fills it, then rebuilds after a weight change and after a seq_len change (every build in
a child process, each release checked byte-identical to a clean build of its recipe), and
the store's size on disk per million tokens.

Generates the sources with bench/gen.py (cached under --data), builds a release in a child
process (its peak RSS is measured there), then encodes the release's rendered texts with
`tokenizers.Tokenizer.encode_batch` (what every Python peer sits on) and prints samples/s,
tokens/s, the ratio, peak RSS, packing efficiency and per-stage times.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "recipes" / "models" / "smollm2"

RECIPE = """
[recipe]
name = "bench-llava-mix"
version = "1.0.0"
seed = 0

[model]
tokenizer = "{tokenizer}"
image = {{ placeholder = "<image>", token = "<image>", count = 576 }}

[output]
seq_len = 4096
overlong = "drop"

[mixture]
total = "natural"

[[source]]
name = "llava"
path = "{data}/llava_instruct.json"
layout = "conversation"
image_root = "{data}"

[[source]]
name = "sharegpt"
path = "{data}/sharegpt.jsonl"
layout = "conversation"
"""


def generate(data: Path, n: int) -> None:
    marker = data / f".complete-{n}"
    if marker.exists():
        return
    data.mkdir(parents=True, exist_ok=True)
    # LLaVA conversations and ShareGPT chats in LLaVA-1.5-like proportions.
    subprocess.run([sys.executable, str(ROOT / "bench" / "gen.py"), str(data), "--n", str(n), "--split", "llava=0.73,sharegpt=0.27"], check=True)
    marker.touch()


def child(recipe: Path, out: Path, threads: int, engine: str, cache: str | None = None) -> None:
    from mmrecipe import build

    t = time.perf_counter()
    store = False if cache in (None, "") else cache  # the plain benchmark measures tokenizing
    result = build(recipe, out, threads=threads, progress=False, overwrite=True, tokenizer_engine=engine, cache=store)
    seconds = time.perf_counter() - t
    print(json.dumps({"seconds": seconds, "timings": result.timings, "summary": result.summary,
                      "engine": result.manifest.tokenizer_engine["engine"], "store": result.store,
                      "release_id": result.manifest.release_id}))


REBUILD_RECIPE = RECIPE.replace('total = "natural"', "total = {{ samples = {total} }}").replace(
    'layout = "conversation"\nimage_root', 'layout = "conversation"\nweight = {w_llava}\nimage_root'
).replace('path = "{data}/sharegpt.jsonl"\nlayout = "conversation"', 'path = "{data}/sharegpt.jsonl"\nlayout = "conversation"\nweight = {w_sharegpt}')


def _run_child(recipe: Path, out: Path, args: argparse.Namespace, cache: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--tokenizer-engine", args.tokenizer_engine,
                           "--child", str(recipe), str(out), "--child-cache", cache], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def rebuild(args: argparse.Namespace, data: Path) -> None:
    """Clean builds against rebuilds through the token store."""
    import shutil

    store = data / "token-store"
    shutil.rmtree(store, ignore_errors=True)
    recipe = data / "rebuild.toml"
    total = args.n  # about every sample once; weights then decide the split

    def write(w_llava: float, seq_len: int, natural: bool = False) -> None:
        text = REBUILD_RECIPE.format(tokenizer=TOKENIZER, data=data, total=total, w_llava=w_llava, w_sharegpt=round(1 - w_llava, 2))
        if natural:
            text = text.replace(f"total = {{ samples = {total} }}", 'total = "natural"')
        recipe.write_text(text.replace("seq_len = 4096", f"seq_len = {seq_len}"))

    rows = []

    def step(name: str, cache: str, check: bool) -> dict:
        r = _run_child(recipe, data / "rebuild-out", args, cache)
        if check:  # the same recipe built clean, without the store: the same release
            clean = _run_child(recipe, data / "rebuild-clean", args, "")
            assert clean["release_id"] == r["release_id"], (name, clean["release_id"], r["release_id"])
            r["clean_seconds"] = clean["seconds"]
        rows.append((name, r))
        return r

    write(0.7, 4096)
    step("clean build, no token store", "", False)
    step("clean build, filling the token store", str(store), False)
    # Every stored sample once: the tokens the store holds, and its size, before any other entry.
    write(0.7, 4096, natural=True)
    stored_tokens = step("rebuild after a mixture change (-> natural)", str(store), True)["summary"]["tokens"]
    size = _tree_bytes(store)
    write(0.6, 4096)
    step("rebuild after a weight change (0.7/0.3 -> 0.6/0.4)", str(store), True)
    write(0.6, 8192)
    step("rebuild after a seq_len change (4096 -> 8192)", str(store), True)
    write(0.6, 2048)
    step("rebuild after a seq_len change (8192 -> 2048)", str(store), True)
    write(0.6, 4096)
    step("rebuild after a seq_len change (2048 -> 4096)", str(store), True)
    base = rows[0][1]["seconds"]
    fig = {
        "n_generated": args.n,
        # Speed-up: against a clean build (no store) of the same recipe, run just after.
        "steps": [{"step": name, "seconds": round(r["seconds"], 2), "clean_seconds": round(r.get("clean_seconds", base), 2),
                   "speedup_vs_clean": round(r.get("clean_seconds", base) / r["seconds"], 2),
                   "from_store": r["store"].get("reused", []), "tokenized": r["store"].get("tokenized", []),
                   "stage_seconds": {k: round(v, 2) for k, v in r["timings"].items()}} for name, r in rows],
        "store_bytes": size,
        "stored_tokens": stored_tokens,
        "store_bytes_per_million_tokens": round(size / stored_tokens * 1e6),
    }
    if args.json:
        print(json.dumps(fig, indent=2))
        return
    print(f"token store, LLaVA-style mix of {args.n:,} generated samples ({stored_tokens:,} tokens stored)")
    for st in fig["steps"]:
        print(f"  {st['step']:<52} {st['seconds']:7.2f} s (clean {st['clean_seconds']:6.2f} s) {st['speedup_vs_clean']:5.2f}x  "
              f"store: {len(st['from_store'])} loaded, {len(st['tokenized'])} tokenized")
        print("      stages " + ", ".join(f"{k} {v:.2f} s" for k, v in st["stage_seconds"].items()))
    print(f"  store on disk  {size / 2**20:,.1f} MiB, {fig['store_bytes_per_million_tokens'] / 2**20:.2f} MiB per million tokens")


def reference(texts_file: Path) -> None:
    """Bare `encode_batch` over the rendered texts, best of two."""
    from tokenizers import Tokenizer

    with open(texts_file, "rb") as f:
        texts = pickle.load(f)
    tok = Tokenizer.from_file(str(TOKENIZER / "tokenizer.json"))
    best, tokens = float("inf"), 0
    for _ in range(2):
        t = time.perf_counter()
        encoded = tok.encode_batch(texts, add_special_tokens=False)
        best = min(best, time.perf_counter() - t)
        tokens = sum(len(e.ids) for e in encoded)
        del encoded
    print(json.dumps({"seconds": best, "tokens": tokens}))


def reference_texts(recipe: Path) -> list[str]:
    """The rendered text of every sample, as the build renders it (not timed)."""
    from mmrecipe.builder import normalize_source
    from mmrecipe.compile import batch_columns, make_compiler
    from mmrecipe.recipe import load_recipe, resolve

    r = resolve(load_recipe(recipe))
    sources = [normalize_source(r, s.index) for s in r.sources]
    comp = make_compiler(r)
    texts: list[str] = []
    for i, norm in enumerate(sources):
        for start in range(0, len(norm), 8192):
            texts += [x[0] for x in comp.preview_batch(i, batch_columns(norm, start, 8192)) if not isinstance(x, str)]
    return texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000, help="samples to generate (default 200000)")
    ap.add_argument("--threads", type=int, default=0, help="build threads (default: all cores)")
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "mmrecipe-bench", help="where generated data is cached")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    ap.add_argument("--tokenizer-engine", default="auto", choices=["auto", "hf", "fast"], help="the build's tokenizer engine (default auto)")
    ap.add_argument("--no-reference", action="store_true", help="measure the build only (peak RSS at large N)")
    ap.add_argument("--rebuild", action="store_true", help="measure rebuilds through the token store (see above)")
    ap.add_argument("--child", nargs=2, metavar=("RECIPE", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--child-cache", default="", help=argparse.SUPPRESS)
    ap.add_argument("--reference", metavar="TEXTS", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(Path(args.child[0]), Path(args.child[1]), args.threads, args.tokenizer_engine, args.child_cache)
        return
    if args.reference:
        reference(Path(args.reference))
        return

    data = args.data / f"n{args.n}"
    generate(data, args.n)
    if args.rebuild:
        rebuild(args, data)
        return
    recipe = data / "bench.toml"
    recipe.write_text(RECIPE.format(tokenizer=TOKENIZER, data=data))
    out = data / "release"

    proc = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--tokenizer-engine", args.tokenizer_engine,
                           "--child", str(recipe), str(out)], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr)
    build = json.loads(proc.stdout.strip().splitlines()[-1])
    peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

    s = build["summary"]
    if args.no_reference:
        print(json.dumps({"n_generated": args.n, "tokenizer_engine": build["engine"], "samples": sum(x["selected"] for x in s["sources"]), "tokens": s["tokens"],
                          "build_seconds": round(build["seconds"], 2), "peak_rss_mb": round(peak_rss_mb),
                          "packing_efficiency": round(s["packing_efficiency"], 4),
                          "stage_seconds": {k: round(v, 2) for k, v in build["timings"].items()}}, indent=2))
        return
    # The reference runs in a fresh process too, on the texts the build rendered.
    texts = reference_texts(recipe)
    texts_file = data / "rendered.pkl"
    with open(texts_file, "wb") as f:
        pickle.dump(texts, f)
    n_texts = len(texts)
    del texts
    proc = subprocess.run([sys.executable, __file__, "--reference", str(texts_file)], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr)
    ref = json.loads(proc.stdout.strip().splitlines()[-1])
    ref_seconds, ref_tokens = ref["seconds"], ref["tokens"]
    texts_file.unlink()

    s = build["summary"]
    samples = sum(x["selected"] for x in s["sources"])
    fig = {
        "n_generated": args.n,
        "samples": samples,
        "tokens": s["tokens"],
        "build_seconds": round(build["seconds"], 2),
        "build_samples_per_s": round(samples / build["seconds"]),
        "build_tokens_per_s": round(s["tokens"] / build["seconds"]),
        "encode_batch_seconds": round(ref_seconds, 2),
        "encode_batch_samples_per_s": round(n_texts / ref_seconds),
        "encode_batch_text_tokens_per_s": round(ref_tokens / ref_seconds),
        "speedup_vs_encode_batch": round(ref_seconds / build["seconds"], 2),
        "tokenize_stage_speedup_vs_encode_batch": round(ref_seconds / build["timings"]["tokenize"], 2),
        "peak_rss_mb": round(peak_rss_mb),
        "packing_efficiency": round(s["packing_efficiency"], 4),
        "stage_seconds": {k: round(v, 2) for k, v in build["timings"].items()},
        "threads": args.threads or os.cpu_count(),
        "tokenizer_engine": build["engine"],
    }
    if args.json:
        print(json.dumps(fig, indent=2))
        return
    print(f"LLaVA-style mix, {samples:,} samples, {s['tokens']:,} tokens (576 image tokens per image, seq_len 4096)")
    print(f"  tokenizer engine  {fig['tokenizer_engine']}")
    print(f"  recipe build      {fig['build_seconds']:8.2f} s  {fig['build_samples_per_s']:>9,} samples/s  {fig['build_tokens_per_s']:>11,} tokens/s")
    print(f"  encode_batch      {fig['encode_batch_seconds']:8.2f} s  {fig['encode_batch_samples_per_s']:>9,} samples/s  (same rendered texts)")
    print(f"  speed-up          {fig['speedup_vs_encode_batch']:.2f}x end to end; {fig['tokenize_stage_speedup_vs_encode_batch']:.2f}x render+tokenize+mask alone")
    print(f"  peak RSS (build)  {fig['peak_rss_mb']:,} MB")
    print(f"  packing           {fig['packing_efficiency']:.2%} of the lower bound")
    print("  stages            " + ", ".join(f"{k} {v:.2f} s" for k, v in fig["stage_seconds"].items()))


if __name__ == "__main__":
    main()
