"""The `recipe` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from .errors import MMRecipeError

DESCRIPTION = """\
mmrecipe compiles a versioned TOML recipe into a reproducible release of packed,
response-masked token sequences for multimodal instruction tuning.

  recipe build recipes/demo.toml -o out/demo     build a release
  recipe check recipes/demo.toml                 validate a recipe and its sources

Run `recipe COMMAND --help` for the options of a command."""

BUILD_HELP = """\
Reads every source of the recipe, applies instruction templates, renders each sample
with the model's chat template, tokenizes it with the model's tokenizer, masks everything
but the responses, mixes the sources to exact counts and packs the samples into
sequences of output.seq_len tokens (best-fit decreasing). The release is written to a
hidden folder beside OUT and renamed into place only when complete.

Layout of a release:
  OUT/manifest.json        recipe, content hashes of every input, shards, totals
  OUT/stats.json           per-source counts, tokens, trained tokens, packing efficiency
  OUT/data/part-*.parquet  one row per packed sequence

example:
  recipe build recipes/demo.toml -o out/demo --threads 2"""

CHECK_HELP = """\
Validates the recipe (every problem at once, with its key path), opens every source,
resolves every field path on the data, loads the tokenizer and chat template, and prints
a table of sources. Exits 0 when the recipe is ready to build, 1 otherwise."""


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)])


def format_summary(summary: dict[str, Any], out: Path) -> str:
    rows = []
    for s in summary["sources"]:
        rows.append(
            [
                s["name"],
                f"{s['rows']:,}",
                f"{s['skipped']:,}",
                f"{s['dropped_overlong']:,}",
                f"{s['selected']:,}",
                f"{s['tokens']:,}",
                f"{s['trained_tokens'] / s['tokens']:.1%}" if s["tokens"] else "-",
            ]
        )
    table = _table(rows, ["source", "rows", "skipped", "too long", "samples", "tokens", "trained"])
    tokens = summary["tokens"]
    lines = [
        table,
        "",
        f"sequences          {summary['sequences']:,} × {summary['seq_len']:,} tokens ({summary['segments']:,} samples packed)",
        f"tokens             {tokens:,} ({summary['trained_tokens']:,} trained, loss-token fraction {summary['trained_tokens'] / max(tokens, 1):.1%})",
        f"fill               {summary['fill']:.1%} of sequence capacity",
        f"packing efficiency {summary['packing_efficiency']:.2%} of the lower bound ({summary['lower_bound']:,} sequences)",
        f"release            {out}",
    ]
    return "\n".join(lines)


def cmd_build(args: argparse.Namespace) -> int:
    from .builder import build
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe)
    out = Path(args.out) if args.out else Path("out") / f"{recipe.recipe.name}-{recipe.recipe.version}"
    result = build(recipe, out, threads=args.threads, overwrite=args.overwrite, progress=not args.quiet)
    print(f"built {recipe.recipe.name} {recipe.recipe.version} (release {result.manifest.release_id[:12]})")
    print(format_summary(result.summary, out))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .check import check

    report = check(args.recipe)
    rows = [[s.spec.name, s.spec.layout, f"{len(s):,}", str(len(s.files)), f"{s.spec.weight:g}"] for s in report.sources]
    print(_table(rows, ["source", "layout", "rows", "files", "weight"]))
    print(f"\n{args.recipe}: ok (tokenizer {report.model.tokenizer_json.parent}, chat template '{report.model.template_name}')")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recipe", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__

    p.add_argument("--version", action="version", version=f"mmrecipe {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    b = sub.add_parser("build", help="build a release from a recipe", description=BUILD_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("recipe", help="the recipe TOML file")
    b.add_argument("-o", "--out", help="release folder to create (default: out/NAME-VERSION)")
    b.add_argument("-j", "--threads", type=int, default=0, help="worker threads (default: all cores); the release is identical for any value")
    b.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (only once the new release is complete)")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    b.set_defaults(func=cmd_build)
    c = sub.add_parser("check", help="validate a recipe and its sources without building", description=CHECK_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("recipe", help="the recipe TOML file")
    c.set_defaults(func=cmd_check)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if not getattr(args, "func", None):
        p.print_help()
        return 2
    try:
        return int(args.func(args))
    except MMRecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; no release was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
