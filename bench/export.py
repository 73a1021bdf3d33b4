#!/usr/bin/env python3
"""Export throughput and peak memory per format (`recipe export --to hf|megatron|mds`).

    python bench/export.py [--n 20000 80000] [--formats hf megatron mds] [--data DIR] [--json]

For each --n: generates the LLaVA-style mix of bench/run.py (cached under --data), builds
its release, then exports it to each format in a fresh child process, which reports its
wall time and its own peak RSS (VmHWM). Two references run the same way: `read`, the floor of
any export (the shards hashed as `recipe verify` does, then every row group decoded with
pyarrow), and `import`, the child's RSS with the format's library imported and nothing
read. Megatron is exported with --drop-images (the mix has images). tokens/s counts the release's tokens; `export/read` is the export's time over the
floor's. Peak RSS at two release sizes shows whether memory follows the data.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import RECIPE, TOKENIZER, generate  # noqa: E402

LIBRARY = {"hf": "datasets", "megatron": "numpy", "mds": "streaming"}


def child(kind: str, release: Path, out: Path) -> None:
    import importlib

    if kind == "build":
        from mmrecipe import build

        build(release.parent / "bench.toml", release, progress=False, overwrite=True)
        seconds = 0.0
    elif kind.startswith("import:"):
        importlib.import_module(LIBRARY[kind.split(":")[1]])
        importlib.import_module("mmrecipe.export")
        seconds = 0.0
    elif kind == "read":
        import pyarrow.parquet as pq

        from mmrecipe.release.verify import verify

        t = time.perf_counter()
        assert verify(release).ok
        for shard in json.loads((release / "manifest.json").read_text())["shards"]:
            pf = pq.ParquetFile(release / shard["path"], memory_map=True)
            for g in range(pf.metadata.num_row_groups):
                table = pf.read_row_group(g)
                for name in table.column_names:
                    table.column(name).combine_chunks().values.to_numpy(zero_copy_only=False)
        seconds = time.perf_counter() - t
    else:
        from mmrecipe.export import export

        t = time.perf_counter()
        export(release, kind, out, overwrite=True, drop_images=kind == "megatron")  # images: references or none
        seconds = time.perf_counter() - t
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """This process's peak RSS since its exec (VmHWM): getrusage's ru_maxrss would start
    from the RSS of the parent at fork."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(kind: str, release: Path, out: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", kind, str(release), str(out)], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[20_000, 80_000], help="samples to generate, one release each")
    ap.add_argument("--formats", nargs="+", default=["hf", "megatron", "mds"])
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "mmrecipe-bench")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", nargs=3, metavar=("KIND", "RELEASE", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), Path(args.child[2]))
        return

    # A format whose library is not installed is skipped, and said so, rather than ending the run.
    formats = [to for to in args.formats if importlib.util.find_spec(LIBRARY[to]) is not None]
    for to in sorted(set(args.formats) - set(formats)):
        print(f"skipped {to}: {LIBRARY[to]} is not installed (pip install \"mmrecipe[export]\")", file=sys.stderr)
    figures = []
    for n in args.n:
        data = args.data / f"n{n}"
        generate(data, n)
        recipe = data / "bench.toml"
        recipe.write_text(RECIPE.format(tokenizer=TOKENIZER, data=data))
        release = data / "release"
        if not (release / "manifest.json").exists():
            run_child("build", release, release)
        manifest = json.loads((release / "manifest.json").read_text())
        tokens = manifest["totals"]["tokens"]
        size = sum(p.stat().st_size for p in release.rglob("*") if p.is_file())
        read = run_child("read", release, data / "none")
        for to in formats:
            base = run_child(f"import:{to}", release, data / "none")
            out = data / f"export-{to}"
            got = run_child(to, release, out)
            written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
            figures.append({
                "n": n, "format": to, "rows": manifest["totals"]["sequences"], "tokens": tokens,
                "release_mb": round(size / 2**20), "written_mb": round(written / 2**20),
                "seconds": round(got["seconds"], 2), "tokens_per_s": round(tokens / got["seconds"]),
                "read_seconds": round(read["seconds"], 2), "export_over_read": round(got["seconds"] / read["seconds"], 2),
                "peak_rss_mb": round(got["peak_rss_mb"]), "import_rss_mb": round(base["peak_rss_mb"]),
                "read_rss_mb": round(read["peak_rss_mb"]),
            })
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    print("| n | format | tokens | release | written | export | tokens/s | read (floor) | export/read | peak RSS | RSS after import | read RSS |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for f in figures:
        print(f"| {f['n']:,} | {f['format']} | {f['tokens']:,} | {f['release_mb']:,} MB | {f['written_mb']:,} MB | {f['seconds']} s "
              f"| {f['tokens_per_s'] / 1e6:.1f} M | {f['read_seconds']} s | {f['export_over_read']}× | {f['peak_rss_mb']:,} MB "
              f"| {f['import_rss_mb']:,} MB | {f['read_rss_mb']:,} MB |")


if __name__ == "__main__":
    main()
