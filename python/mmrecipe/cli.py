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
  recipe verify out/demo --recipe-dir recipes    re-hash a release and its inputs
  recipe stats out/demo                          realized mixture, tokens, packing
  recipe diff out/old out/new                    what changed between two releases
  recipe export out/demo --to hf -o out/demo-hf  write it for TRL/HF datasets, Megatron or MosaicML
  recipe preview recipes/demo.toml -n 3          see samples with the trained tokens marked
  recipe cache ls                                the token store: what rebuilds reuse

Run `recipe COMMAND --help` for the options of a command."""

BUILD_HELP = """\
Reads every source of the recipe, applies instruction templates, renders each sample
with the model's chat template, tokenizes it with the model's tokenizer, masks everything
but the responses, mixes the sources to exact counts and packs the samples into
sequences of output.seq_len tokens (best-fit decreasing). The release is written to a
hidden folder beside OUT and renamed into place only when complete.

LLM stages ([lengthen.NAME] tables and [[generate]]) call their endpoint only for what
their cache (cache/TABLE.jsonl beside the recipe, or `cache = ...`) lacks, `concurrency`
calls at a time; every finished call is written to the cache at once, so an interrupted
build loses none. The cache is an input of the release: with it, the release rebuilds
byte for byte with the endpoint off (--offline makes sure nothing is called).

Rebuilds: each source's tokenized samples are saved to the token store (--cache DIR, else
$MMRECIPE_CACHE, $XDG_CACHE_HOME/mmrecipe or ~/.cache/mmrecipe) under a key of everything
that shapes them: the source's files (by content), its table, instruction templates, LLM
cache content, tokenizer files, chat template, image rule, train_on, train_on_eos,
overlong and seed. A rebuild loads every source whose key matches instead of reading and
tokenizing it, and mixes and packs again: changing weights, the mixture total, alpha,
packing, shuffle or the shard size tokenizes nothing; seq_len reuses a source when every
sample fits both lengths. The release is byte-identical to a clean build either way.
The store is capped at $MMRECIPE_CACHE_MAX (default 20G), least recently used pruned;
`recipe cache ls|prune|clear` manages it.

Layout of a release:
  OUT/manifest.json        recipe, content hashes of every input, shards, totals
  OUT/stats.json           per-source counts, tokens, trained tokens, packing efficiency
  OUT/data/part-*.parquet  one row per packed sequence
  OUT/epoch-EEEEE/         with [output] epochs = N > 1: epoch E (1..N-1), its own
                           templates, subset, order and packing (stats.json, data/);
                           epoch 0 is the top level, as a one-epoch build writes it

example:
  recipe build recipes/demo.toml -o out/demo --threads 2
  recipe build recipes/demo-llm.toml -o out/demo-llm --offline
  recipe build recipes/demo.toml -o out/demo --overwrite --no-cache"""

CACHE_HELP = """\
The token store keeps each source's tokenized samples between builds (see `recipe build
--help`). Its folder: --cache DIR, else $MMRECIPE_CACHE, $XDG_CACHE_HOME/mmrecipe or
~/.cache/mmrecipe.

  ls      every entry: key, source, recipe, size, last used (most recent first)
  prune   remove the least recently used entries past --max (default $MMRECIPE_CACHE_MAX
          or 20G; builds do this after they finish)
  clear   remove every entry

example:
  recipe cache ls
  recipe cache prune --max 5G"""

CHECK_HELP = """\
Validates the recipe (every problem at once, with its key path), opens every source,
resolves every field path on the data, loads the tokenizer and chat template, opens the
sources' image files (headers only) and prints a table of sources. Unusable images are an
error for a source with on_error = "fail" and a warning with on_error = "skip". LLM
tables are not called: the check counts the rows their caches hold and the calls a
build would still make.
Exits 0 when the recipe is ready to build, 1 otherwise.

example:
  recipe check recipes/demo.toml --images all"""

VERIFY_HELP = """\
Re-hashes every shard listed in RELEASE/manifest.json and names each one that changed or
is missing, every file in RELEASE/data/ the manifest does not list, and checks that the
release_id still matches the manifest's content and stats.json its totals.

Inputs (recipe, tokenizer files, sources, pools) are checked only with --recipe-dir: the
manifest stores their paths relative to the folder of the recipe file the release was
built from (paths outside it are stored absolute), and not that folder itself, so that a
release does not depend on where it was built. Exits 0 when everything matches, 1 otherwise.

On the folder of an export (`recipe export`), re-hashes every file its export.json lists
and names those that changed, are missing or are not listed.

example:
  recipe verify out/demo --recipe-dir recipes
  recipe verify out/demo-hf"""

EXPORT_HELP = """\
Writes a verified release in the format of another training stack, reading it one row
group at a time, into a hidden folder beside DIR that is renamed into place when complete:

  hf        a Hugging Face datasets folder (load_from_disk) with input_ids, assistant_masks
            and seq_lengths, as TRL's SFTTrainer takes them tokenized and packed
            (SFTConfig(padding_free=True, max_length=None)), plus provenance and image
            references (needs `datasets`)
  megatron  Megatron-LM indexed datasets: tokens.bin/.idx and loss_mask.bin/.idx, one
            sequence per packed sample and one document per packed row; images cannot
            be carried: --drop-images keeps their tokens (masked) and leaves the pixels
  mds       MosaicML streaming shards (MDSWriter) with every column of the release
            (needs `mosaicml-streaming`)

DIR/export.json records the source release's id and the sha256 of every file written;
`recipe verify DIR` checks them. The same release exported twice gives identical files.
pip install "mmrecipe[export]" installs the libraries the formats need.

example:
  recipe export out/demo --to hf -o out/demo-hf
  recipe export out/demo --to megatron -o out/demo-megatron --drop-images"""

STATS_HELP = """\
Per source: the realized share of the packed samples against the target (weight / sum
of weights, or weight x usable^alpha with temperature sampling; usable rows / all usable
rows for a "natural" mixture; shares of tokens for a { tokens = N } total), samples, tokens,
trained tokens, images, and the rows the build skipped, dropped as too long or truncated;
then packing: efficiency against the best lower bound (L1 = total tokens / seq_len,
Martello-Toth L2, a counting bound, Fekete-Schepers DFF, images / max_images), the gap,
fill and images per sequence. Samples, tokens and packing are counted from the shards; numbers
on which the shards and stats.json disagree are reported on stderr.

example:
  recipe stats out/demo --plot lengths.png"""

DIFF_HELP = """\
Compares release A with release B: inputs added, removed or with a changed hash; recipe
keys that changed (dotted key paths, old -> new); release fields (chat template, seq_len,
...); per-source samples and tokens; totals. Exits 0 whether or not they differ.

example:
  recipe diff out/demo-1.0.0 out/demo-1.1.0"""


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
        *packing_lines(summary.get("packing")),
        f"release            {out}",
    ]
    return "\n".join(lines)


def cmd_build(args: argparse.Namespace) -> int:
    from .builder import build
    from .recipe import load_recipe
    from .release.guard import default_name

    recipe = load_recipe(args.recipe)
    out = Path(args.out) if args.out else Path("out") / default_name(recipe.recipe.name, recipe.recipe.version)
    result = build(
        recipe, out, threads=args.threads, overwrite=args.overwrite, progress=not args.quiet,
        offline=args.offline, retry_failed=args.retry_failed, tokenizer_engine=args.tokenizer_engine,
        cache=False if args.no_cache else args.cache,
        engine=args.engine, ray_address=args.address, ray_staging=args.ray_staging,
        ray_unit_bytes=args.ray_unit_bytes, ray_task_timeout=args.ray_task_timeout,
    )
    print(f"built {recipe.recipe.name} {recipe.recipe.version} (release {result.manifest.release_id[:12]})")
    print(format_summary(result.summary, out))
    if result.epochs:
        print(format_epochs(result.epochs))
    print(format_store(result.store))
    print("time               " + ", ".join(f"{stage} {seconds:.1f}s" for stage, seconds in result.timings.items()))
    for warning in result.store.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    if result.llm:
        print("\n" + format_llm(result.llm))
    for source in result.summary["sources"]:
        for note in source.get("notes", []):
            print(f"note: {note}")
    return 0


def format_epochs(totals: list[dict[str, Any]]) -> str:
    """One line per epoch of a multi-epoch release (the table above is epoch 0's)."""
    lines = [f"epochs             {len(totals)} (the table above is epoch 0; `recipe stats OUT --epoch E` shows another)"]
    for e, t in enumerate(totals):
        lines.append(f"  epoch {e:<10} {t['sequences']:,} sequences, {t['segments']:,} samples, {t['tokens']:,} tokens "
                     f"({t['trained_tokens']:,} trained), fill {t['fill']:.1%}")
    return "\n".join(lines)


def format_store(store: dict[str, Any]) -> str:
    """What the build took from the token store: "3 sources from the token store, 1 tokenized"."""
    from .store import human

    tokenized = len(store.get("tokenized", []))
    if not store.get("folder"):
        return f"token store        off ({tokenized} source{'s' * (tokenized != 1)} tokenized)"
    reused = len(store["reused"])
    text = f"token store        {reused} source{'s' * (reused != 1)} from the token store, {tokenized} tokenized"
    if store.get("saved_bytes"):
        text += f" (saved {human(store['saved_bytes'])})"
    return text + f" in {store['folder']}"


def cmd_cache(args: argparse.Namespace) -> int:
    import datetime

    from .store import TokenStore, cache_dir, human, size_cap

    store = TokenStore(cache_dir(args.cache))
    if args.action == "ls":
        entries = store.entries()
        when = lambda t: datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M")  # noqa: E731
        # The key's first 16 digits, and "@seq_len" for an entry valid at that seq_len only.
        rows = [[e.key[:16] + ("@" + e.key.partition("@")[2] if "@" in e.key else ""), e.source, e.recipe, human(e.bytes), when(e.last_used)] for e in entries]
        if rows:
            print(_table(rows, ["key", "source", "recipe", "size", "last used"]))
        print(f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, {human(sum(e.bytes for e in entries))} in {store.folder}")
    elif args.action == "prune":
        cap = args.max if args.max is not None else size_cap()
        removed = store.prune(cap)
        print(f"removed {len(removed)} entr{'y' if len(removed) == 1 else 'ies'} ({human(sum(e.bytes for e in removed))}); "
              f"{human(sum(e.bytes for e in store.entries()))} left in {store.folder} (cap {human(cap)})")
    else:
        n = store.clear()
        print(f"removed {n} entr{'y' if n == 1 else 'ies'} from {store.folder}")
    return 0


def _unit_size(text: str) -> int:
    try:
        size = _size(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(str(e).replace("--max: ", "")) from None
    if size < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive size")
    return size


def _size(text: str) -> int:
    import os

    from .store import size_cap

    old = os.environ.get("MMRECIPE_CACHE_MAX")
    os.environ["MMRECIPE_CACHE_MAX"] = text
    try:
        return size_cap()
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).replace("MMRECIPE_CACHE_MAX", "--max")) from None
    finally:
        if old is None:
            del os.environ["MMRECIPE_CACHE_MAX"]
        else:
            os.environ["MMRECIPE_CACHE_MAX"] = old


def format_llm(counts: dict[str, dict[str, int]], check: bool = False) -> str:
    """Per LLM table: rows, served from the cache, calls made, failed (or, for `check`,
    what a build would still call for)."""
    if check:
        rows = [[t, f"{c['rows']:,}", f"{c['cached']:,}", f"{c['missing']:,}"] for t, c in counts.items()]
        return _table(rows, ["llm table", "rows", "in cache", "to call"])
    rows = [[t, f"{c['rows']:,}", f"{c['cached']:,}", f"{c['called']:,}", f"{c['failed']:,}"] for t, c in counts.items()]
    return _table(rows, ["llm table", "rows", "from cache", "calls made", "failed"])


def _print_pools(report: Any) -> None:
    """Every pool the sources use: its templates (a generated pool's as the cache holds them)."""
    shown: set[str] = set()
    for s in report.plan.sources:
        name = s.spec.instructions if isinstance(s.spec.instructions, str) else None
        if name is None or name in shown:
            continue
        shown.add(name)
        result = report.pools.get(name)
        head = f"pool '{name}'" + (f" ({result.note()})" if result is not None else "")
        print(head + ":")
        templates = result.templates if result is not None else s.templates
        for t in templates:
            print("  " + t.replace("\n", "\\n"))
        print()


def cmd_check(args: argparse.Namespace) -> int:
    from .check import check

    report = check(args.recipe, images=args.images)
    checked = {c.source: c for c in report.images}
    if args.pools:
        _print_pools(report)

    def images(name: str) -> str:
        c = checked.get(name)
        return "-" if c is None or c.total == 0 else f"{c.checked - len(c.problems):,}/{c.checked:,} ok" + (f" of {c.total:,}" if c.total > c.checked else "")

    rows = [[s.source.name, s.source.spec.layout, f"{len(s):,}", str(len(s.source.all_files)), f"{s.source.spec.weight:g}", images(s.source.name)] for s in report.sources]
    print(_table(rows, ["source", "layout", "rows", "files", "weight", "images"]))
    if report.llm:
        print("\n" + format_llm(report.llm, check=True))
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    engine, reason = report.tokenizer_engine
    print(f"\ntokenizer engine: {engine} ({reason})")
    print(f"\n{args.recipe}: ok (tokenizer {report.model.tokenizer_json.parent}, chat template '{report.model.template_name}')")
    return 0


PREVIEW_HELP = """\
Renders the first N samples of each source exactly as a build would (instruction template
applied, chat template, image tokens) and shows the trained tokens highlighted, the
template chosen, token counts and image runs.

example:
  recipe preview recipes/demo.toml -n 2 --source vqa
  recipe preview recipes/demo.toml --html preview.html"""


def cmd_preview(args: argparse.Namespace) -> int:
    from .preview import preview, to_html, to_terminal

    samples = preview(args.recipe, n=args.n, source=args.source)
    if args.html:
        Path(args.html).write_text(to_html(samples, f"mmrecipe preview: {args.recipe}"), "utf-8")
        print(f"wrote {args.html} ({len(samples)} samples)")
    else:
        print(to_terminal(samples, color=sys.stdout.isatty() and not args.no_color))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export

    result = export(args.release, args.to, args.out, overwrite=args.overwrite, drop_images=args.drop_images, epoch=args.epoch)
    m = result.manifest
    print(f"exported release {m.release_id[:12]} as {m.to}: {m.rows:,} sequences, {m.segments:,} samples, "
          f"{m.tokens:,} tokens, {len(m.files)} file(s) in {result.path}")
    for note in m.notes:
        print(f"note: {note}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .export.common import MANIFEST as EXPORT_MANIFEST
    from .release.verify import verify

    if (Path(args.release) / EXPORT_MANIFEST).is_file():
        return _verify_export(args)
    report = verify(args.release, args.recipe_dir)
    for problem in report.problems:
        print(problem)
    inputs = f"{report.inputs} inputs" if report.inputs is not None else "inputs not checked (no --recipe-dir)"
    verdict = "ok" if report.ok else f"{len(report.problems)} problem(s)"
    print(f"release {report.release_id[:12]}: {report.shards} shard(s), {inputs}: {verdict}")
    return 0 if report.ok else 1


def _verify_export(args: argparse.Namespace) -> int:
    from .export.verify import verify_export

    if args.recipe_dir is not None:
        print("note: --recipe-dir is for releases; an export's inputs are its release (verify it there)", file=sys.stderr)
    report = verify_export(args.release)
    for problem in report.problems:
        print(problem)
    verdict = "ok" if report.ok else f"{len(report.problems)} problem(s)"
    print(f"export ({report.to}) of release {report.release_id[:12]}: {report.files} file(s): {verdict}")
    return 0 if report.ok else 1


def format_stats(stats: dict[str, Any]) -> str:
    rows = []
    for s in stats["sources"]:
        rows.append(
            [
                s["name"],
                f"{s['target_share']:.1%}",
                f"{s['share']:.1%}",
                f"{s['selected']:,}",
                f"{s['tokens']:,}",
                f"{s['trained_tokens']:,}",
                f"{s['images']:,}",
                f"{s['rows']:,}",
                f"{s['skipped']:,}",
                f"{s['dropped_overlong']:,}",
                f"{s['truncated']:,}",
            ]
        )
    header = ["source", "target", "realized", "samples", "tokens", "trained", "images", "rows", "skipped", "too long", "truncated"]
    return "\n".join(
        [
            f"{stats['name']} {stats['version']} (release {stats['release_id'][:12]}"
            + (f", epoch {stats['epoch']} of 0..{stats['epochs'] - 1}" if "epochs" in stats else "") + f"); target and realized are shares of the {'tokens' if stats['mixture'] == 'tokens' else 'samples'}"
            + (f" (alpha {stats['alpha']:g})" if stats["alpha"] else ""),
            "",
            _table(rows, header),
            "",
            f"sequences          {stats['sequences']:,} × {stats['seq_len']:,} tokens ({stats['segments']:,} samples packed)",
            f"tokens             {stats['tokens']:,} ({stats['trained_tokens']:,} trained, loss-token fraction {stats['trained_tokens'] / max(stats['tokens'], 1):.1%})",
            f"fill               {stats['fill']:.1%} of sequence capacity",
            f"packing efficiency {stats['packing_efficiency']:.2%} of the lower bound ({stats['lower_bound']:,} sequences)",
            *packing_lines(stats.get("packing")),
        ]
    )


def packing_lines(packing: dict[str, Any] | None) -> list[str]:
    """The bounds, the packer, fill and images per sequence (releases from before the
    packing block have none)."""
    if not packing:
        return []
    b = packing["bounds"]
    bounds = f"L1 {b['l1']:,}, L2 {b['l2']:,}, counting {b['count']:,}, DFF {b['dff']:,}" + (f", images {b['images']:,}" if b["images"] else "")
    fill, img = packing["fill_per_sequence"], packing["images_per_sequence"]
    lines = [
        f"bounds             {bounds}; gap {packing['gap']:.2%}" + (f" (packer: {packing['packer']})" if packing.get("packer") else ""),
        f"fill per sequence  min {fill['min']:.1%}, median {fill['median']:.1%}, max {fill['max']:.1%}",
    ]
    if img["max"]:
        cap = packing.get("image_cap") or packing.get("max_images")
        lines.append(f"images / sequence  min {img['min']:g}, median {img['median']:g}, max {img['max']:g}" + (f" (at most {cap})" if cap else ""))
    alone = packing.get("without_image_budget")
    if alone:
        lines.append(f"without the budget {alone['sequences']:,} sequences ({alone['packing_efficiency']:.2%} of its lower bound {alone['lower_bound']:,})")
    return lines


def cmd_stats(args: argparse.Namespace) -> int:
    import json

    from .release.stats import count_segments, plot_segment_lengths, release_stats
    from .release.format import read_manifest

    manifest = read_manifest(args.release).epoch(args.epoch)
    counts = count_segments(args.release, manifest)
    stats = release_stats(args.release, counts, args.epoch)
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    for line in stats["disagreements"]:
        print(f"warning: {line}", file=sys.stderr)
    if args.plot:
        path = plot_segment_lengths(counts, manifest.sources, manifest.seq_len, args.plot, stats["packing"])
        print(f"wrote {path}", file=sys.stderr)
    return 0


def format_diff(d: dict[str, Any]) -> str:
    from .release.diff import show

    absent = "(absent)"
    lines = [f"A {d['a']['path']} (release {d['a']['release_id'][:12]})", f"B {d['b']['path']} (release {d['b']['release_id'][:12]})"]
    if d["identical"]:
        return "\n".join([*lines, "", "identical releases"])
    ins = d["inputs"]
    lines += ["", "inputs:" if any(ins.values()) else "inputs: unchanged"]
    lines += [f"  + {i['path']} ({i['role']})" for i in ins["added"]]
    lines += [f"  - {i['path']} ({i['role']})" for i in ins["removed"]]
    lines += [f"  ~ {i['path']} ({i['role']}): {i['old'][:12]} -> {i['new'][:12]}" for i in ins["changed"]]
    lines += [f"  > {i['old']} -> {i['new']} ({i['role']}, same content)" for i in ins["moved"]]
    for title, changes in (("recipe", d["recipe"]), ("release", d["release"]), ("totals", d["totals"])):
        lines += ["", f"{title}:" if changes else f"{title}: unchanged"]
        lines += [f"  {c['key']}: {show(c['old']) if 'old' in c else absent} -> {show(c['new']) if 'new' in c else absent}" for c in changes]

    def pair(v: list[Any]) -> str:
        old, new = v
        if old == new:
            return f"{old:,}" if isinstance(old, int) else str(old)
        if isinstance(old, int) and isinstance(new, int):
            return f"{old:,} -> {new:,} ({new - old:+,})"
        return f"{absent if old is None else old} -> {absent if new is None else new}"

    if d.get("epoch"):
        lines += ["", f"counts of epoch {d['epoch']}:"]
    rows = [[s["name"], pair(s["weight"]), pair(s["selected"]), pair(s["tokens"]), pair(s["trained_tokens"])] for s in d["sources"]]
    lines += ["", _table(rows, ["source", "weight", "samples", "tokens", "trained"])]
    return "\n".join(lines)


def cmd_diff(args: argparse.Namespace) -> int:
    import json

    from .release.diff import diff_releases

    d = diff_releases(args.a, args.b, args.epoch)
    print(json.dumps(d, indent=2) if args.json else format_diff(d))
    return 0


def _epoch(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an epoch number (0, 1, ...), got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"epochs count from 0, got {value}")
    return value


def _threads(text: str) -> int:
    from .recipe.limits import threads_problem

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    problem = threads_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(problem.removeprefix("--threads: "))
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recipe", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__

    p.add_argument("--version", action="version", version=f"mmrecipe {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    b = sub.add_parser("build", help="build a release from a recipe", description=BUILD_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("recipe", help="the recipe TOML file")
    b.add_argument("-o", "--out", help="release folder to create (default: out/NAME-VERSION)")
    b.add_argument("-j", "--threads", type=_threads, default=0, help="worker threads (default: all cores); the release is identical for any value")
    b.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (only once the new release is complete)")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    b.add_argument("--tokenizer-engine", choices=["auto", "hf", "fast"], default=None,
                   help="the encoder of text to ids, instead of the recipe's [model] tokenizer_engine: the fast "
                        "byte-level BPE engine, HF tokenizers, or auto (fast where the tokenizer's shape allows); "
                        "the release is the same either way")
    calls = b.add_mutually_exclusive_group()
    calls.add_argument("--offline", action="store_true",
                       help="make no LLM calls: lengthening and generation come from their caches, and a call "
                            "missing from a cache is an error that names it")
    calls.add_argument("--retry-failed", action="store_true",
                       help="ask the endpoint again for calls recorded in a cache as failed (on_error = keep or drop)")
    store = b.add_mutually_exclusive_group()
    store.add_argument("--cache", metavar="DIR",
                       help="the token store folder (default: $MMRECIPE_CACHE, $XDG_CACHE_HOME/mmrecipe or ~/.cache/mmrecipe): "
                            "sources whose samples it holds are not read or tokenized again")
    store.add_argument("--no-cache", action="store_true", help="neither use nor fill the token store")
    b.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="where sources are read and tokenized: this machine, or a Ray cluster (pip install \"mmrecipe[ray]\"); "
                        "the release is the same either way")
    b.add_argument("--address", metavar="ADDR",
                   help="--engine ray: the cluster's address, e.g. 10.0.0.1:6379 (default: $RAY_ADDRESS, else a new local instance)")
    b.add_argument("--ray-staging", metavar="DIR",
                   help="--engine ray: a folder every node can write and this machine read, for the tasks' token store "
                        "entries (default: a hidden folder beside OUT)")
    b.add_argument("--ray-unit-bytes", metavar="SIZE", type=_unit_size,
                   help="--engine ray: the most bytes of a JSON Lines or JSON array source one task reads, e.g. 64M (the default); "
                        "a larger source is cut into several tasks at the slices a local build reads, the same release")
    b.add_argument("--ray-task-timeout", metavar="SECONDS", type=float,
                   help="--engine ray: fail the build when no task of the cluster finishes for this long (default 3600)")
    b.set_defaults(func=cmd_build)
    k = sub.add_parser("cache", help="list, prune or clear the token store", description=CACHE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    k.add_argument("action", choices=["ls", "prune", "clear"], help="what to do")
    k.add_argument("--cache", metavar="DIR", help="the token store folder (default as for `recipe build`)")
    k.add_argument("--max", metavar="SIZE", type=_size, help="prune: the size to keep the store under (e.g. 5G; default $MMRECIPE_CACHE_MAX or 20G)")
    k.set_defaults(func=cmd_cache)
    c = sub.add_parser("check", help="validate a recipe and its sources without building", description=CHECK_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("recipe", help="the recipe TOML file")
    c.add_argument("--images", choices=["all", "sample", "none"], default="sample",
                   help="open every image, up to 200 per source (default), or none")
    c.add_argument("--pools", action="store_true", help="print the instruction templates of every pool the sources use (generated ones as the call cache holds them)")
    c.set_defaults(func=cmd_check)
    v = sub.add_parser("verify", help="re-hash a release's shards (and inputs) against its manifest", description=VERIFY_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("release", help="the release folder")
    v.add_argument("--recipe-dir", metavar="DIR", help="folder of the recipe file the release was built from (or the recipe file itself): also check the inputs")
    v.set_defaults(func=cmd_verify)
    e = sub.add_parser("export", help="write a release for TRL/HF datasets, Megatron-LM or MosaicML streaming", description=EXPORT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("release", help="the release folder")
    from .export import FORMATS

    e.add_argument("--to", required=True, choices=FORMATS, help="the format to write")
    e.add_argument("-o", "--out", required=True, metavar="DIR", help="the folder to create")
    e.add_argument("--overwrite", action="store_true", help="replace DIR if it is an earlier export (or empty)")
    e.add_argument("--epoch", type=_epoch, default=None, metavar="E", help="the epoch to export of a multi-epoch release (required for one)")
    e.add_argument("--drop-images", action="store_true",
                   help="export a release with images into a format that cannot carry them (megatron): the image "
                        "tokens stay in the sequences, masked as built, and the images are left behind")
    e.set_defaults(func=cmd_export)
    st = sub.add_parser("stats", help="realized mixture vs target, tokens, packing", description=STATS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    st.add_argument("release", help="the release folder")
    st.add_argument("--json", action="store_true", help="print the numbers as JSON")
    st.add_argument("--plot", metavar="FILE.png", help="also write a PNG of segment lengths per source and fill per sequence (needs matplotlib)")
    st.add_argument("--epoch", type=_epoch, default=0, metavar="E", help="the epoch of a multi-epoch release to count (default 0)")
    st.set_defaults(func=cmd_stats)
    d = sub.add_parser("diff", help="what changed between two releases", description=DIFF_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("a", metavar="A", help="the older release folder")
    d.add_argument("b", metavar="B", help="the newer release folder")
    d.add_argument("--json", action="store_true", help="print the differences as JSON")
    d.add_argument("--epoch", type=_epoch, default=0, metavar="E", help="compare the counts of this epoch of multi-epoch releases (default 0)")
    d.set_defaults(func=cmd_diff)
    v = sub.add_parser("preview", help="show rendered samples with trained tokens highlighted", description=PREVIEW_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("recipe", help="the recipe TOML file")
    v.add_argument("-n", type=int, default=3, help="samples per source (default 3)")
    v.add_argument("--source", help="only this source")
    v.add_argument("--html", metavar="FILE", help="write an HTML page instead of printing")
    v.add_argument("--no-color", action="store_true", help="mark trained text with «» instead of colors")
    v.set_defaults(func=cmd_preview)
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
    except BrokenPipeError:  # `recipe stats ... | head`: the reader left, nothing is wrong
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
