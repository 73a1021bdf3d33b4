"""The token store: a rebuild loads every source whose key matches instead of reading and
tokenizing it, tokenizes exactly the sources whose key changed, and writes the release a
clean build writes, byte for byte."""

from __future__ import annotations

import json
import shutil
import threading
import tomllib
import warnings
from pathlib import Path
from typing import Callable

import msgspec
import pytest
import tomli_w
from conftest import RECIPES
from hypothesis import given, settings
from hypothesis import strategies as st

from mmrecipe import build, load_recipe, resolve
from mmrecipe.builder import TokenStoreWarning
from mmrecipe.cli import main
from mmrecipe.compile import core_plan
from mmrecipe.hashing import Hashes
from mmrecipe.recipe.schema import GenerateSpec, LengthenSpec, SourceSpec
from mmrecipe.store import (
    CORE_EXCLUDED, CORE_INCLUDED, LLM_EXCLUDED, LLM_INCLUDED, SOURCE_EXCLUDED, SOURCE_INCLUDED, SPEC_EXCLUDED, SPEC_INCLUDED,
    TokenStore, cache_dir, size_cap, source_key,
)

SOURCES = {"vqa", "captions", "llava", "chat"}


@pytest.fixture
def world(tmp_path: Path) -> Path:
    """A copy of the demo recipes, their data and the tokenizer, free to edit."""
    root = tmp_path / "recipes"
    root.mkdir()
    for name in ("demo.toml", "demo-llm.toml"):
        shutil.copy(RECIPES / name, root / name)
    shutil.copytree(RECIPES / "demo", root / "demo")
    shutil.copytree(RECIPES / "models" / "smollm2", root / "models" / "smollm2")
    return root


def edit_recipe(path: Path, change: Callable[[dict], None]) -> None:
    data = tomllib.loads(path.read_text("utf-8"))
    change(data)
    path.write_text(tomli_w.dumps(data), "utf-8")


def release_bytes(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


class Builds:
    """Builds through one token store, each checked against a clean build."""

    def __init__(self, tmp: Path, store: Path) -> None:
        self.tmp, self.store, self.n = tmp, store, 0

    def __call__(self, recipe: Path, **kw) -> dict:
        self.n += 1
        warm = build(recipe, self.tmp / f"warm{self.n}", progress=False, cache=self.store, **kw)
        clean = build(recipe, self.tmp / f"clean{self.n}", progress=False, cache=False, **kw)
        assert warm.manifest.release_id == clean.manifest.release_id
        assert release_bytes(warm.path) == release_bytes(clean.path)
        assert set(warm.store["reused"]) | set(warm.store["tokenized"]) == {s["name"] for s in warm.summary["sources"]}
        return warm.store


@pytest.fixture
def builds(tmp_path: Path) -> Builds:
    return Builds(tmp_path / "out", tmp_path / "store")


# --- what the key covers -------------------------------------------------------------


def _fields(struct: type) -> set[str]:
    return {f.name for f in msgspec.structs.fields(struct)}


def test_every_key_of_the_core_plan_and_the_tables_is_classified():
    """A key added to the core plan, a source's table or an LLM table must be put in the
    store key's included or excluded list (mmrecipe.store), on purpose."""
    for a, b in ((CORE_INCLUDED, CORE_EXCLUDED), (SOURCE_INCLUDED, SOURCE_EXCLUDED), (SPEC_INCLUDED, SPEC_EXCLUDED), (LLM_INCLUDED, LLM_EXCLUDED)):
        assert not a & b, a & b
    for recipe in (RECIPES / "demo.toml", RECIPES / "demo-llm.toml"):
        plan = resolve(load_recipe(recipe))
        core = core_plan(plan)
        assert set(core) - CORE_INCLUDED - CORE_EXCLUDED == set(), "classify these core plan keys in mmrecipe.store"
        for entry in core["sources"]:
            assert set(entry) - SOURCE_INCLUDED - SOURCE_EXCLUDED == set(), "classify these source keys in mmrecipe.store"
    assert _fields(SourceSpec) - SPEC_INCLUDED - SPEC_EXCLUDED == set(), "classify these [[source]] keys in mmrecipe.store"
    for table in (LengthenSpec, GenerateSpec):
        assert _fields(table) - LLM_INCLUDED - LLM_EXCLUDED == set(), f"classify these {table.__name__} keys in mmrecipe.store"


def _keys(recipe: Path) -> dict[str, str]:
    plan = resolve(load_recipe(recipe))
    hashes = Hashes()
    return {s.name: source_key(plan, s, hashes) for s in plan.sources}


def test_excluded_keys_leave_the_key_and_included_ones_change_it(world):
    recipe = world / "demo.toml"
    base = _keys(recipe)
    for change in (
        lambda d: d["source"][0].update(weight=9.0, max_epochs=50.0),
        lambda d: d["mixture"].update(total={"tokens": 5000}, alpha=0.5),
        lambda d: d["output"].update(packing="none", shuffle=False, shard_sequences=7, seq_len=4096),
        lambda d: d["model"].update(tokenizer_engine="hf"),
        lambda d: d["recipe"].update(version="9.9.9", description="other"),
    ):
        edit_recipe(recipe, change)
        assert _keys(recipe) == base
    edit_recipe(recipe, lambda d: d["output"].update(train_on="all"))
    assert all(_keys(recipe)[s] != base[s] for s in SOURCES)


# --- rebuilds ------------------------------------------------------------------------


def test_rebuilds_that_change_no_sample_tokenize_nothing(world, builds):
    recipe = world / "demo.toml"
    assert builds(recipe)["tokenized"] == ["vqa", "captions", "llava", "chat"]
    assert builds(recipe)["reused"] == ["vqa", "captions", "llava", "chat"]
    for change in (
        lambda d: d["source"][0].update(weight=0.9),
        lambda d: d["mixture"].update(total={"samples": 900}),
        lambda d: d["mixture"].update(total={"tokens": 20000}, alpha=0.3),
        lambda d: d["output"].update(packing="none"),
        lambda d: d["output"].update(packing="bfd", balance="images"),
        lambda d: d["output"].update(shuffle=False),
        lambda d: d["output"].update(shard_sequences=5),
        lambda d: d["model"].update(tokenizer_engine="hf"),
        lambda d: d["output"].update(seq_len=4096),  # every demo sample fits both
    ):
        edit_recipe(recipe, change)
        store = builds(recipe)
        assert store["tokenized"] == [], store["misses"]


def _replace(path: Path, old: str, new: str) -> None:
    text = path.read_text("utf-8")
    assert old in text, old
    path.write_text(text.replace(old, new, 1), "utf-8")


def _flip_data_byte(world: Path) -> None:
    path = world / "demo" / "data" / "chat.jsonl"
    text = path.read_text("utf-8")
    at = text.index('"content": "') + len('"content": "')
    path.write_text(text[:at] + ("X" if text[at] != "X" else "Y") + text[at + 1:], "utf-8")


# (what changes, the sources that must be tokenized again)
SHAPING = {
    "template": (lambda w: edit_recipe(w / "demo.toml", lambda d: d["source"][0].update(instructions=["<image>\n{question} Briefly."])), {"vqa"}),
    "short answer": (lambda w: edit_recipe(w / "demo.toml", lambda d: d["source"][0].update(short_answer="word")), {"vqa"}),
    "field mapping": (lambda w: edit_recipe(w / "demo.toml", lambda d: d["source"][0]["fields"].update(answer="answers[0]")), {"vqa"}),
    "data byte": (_flip_data_byte, {"chat"}),
    "tokenizer file": (lambda w: _replace(w / "models" / "smollm2" / "tokenizer_config.json", "{", "{ "), SOURCES),
    "chat template": (lambda w: edit_recipe(w / "demo.toml", lambda d: d["model"].update(chat_template="chatml")), SOURCES),
    "train_on": (lambda w: edit_recipe(w / "demo.toml", lambda d: d["output"].update(train_on="last_assistant")), SOURCES),
    "train_on_eos": (lambda w: edit_recipe(w / "demo.toml", lambda d: d["output"].update(train_on_eos=False)), SOURCES),
    "image rule": (lambda w: edit_recipe(w / "demo.toml", lambda d: d["model"]["image"].update(count=32)), SOURCES),
    "seed": (lambda w: edit_recipe(w / "demo.toml", lambda d: d["recipe"].update(seed=7)), SOURCES),
    # Samples with more images are dropped as they are added (text-only chat is keyed the same).
    "max_images": (lambda w: edit_recipe(w / "demo.toml", lambda d: d["output"].update(max_images=1)), SOURCES),
}


@pytest.mark.parametrize("what", sorted(SHAPING))
def test_a_change_that_shapes_samples_tokenizes_its_sources_again(world, builds, what):
    recipe = world / "demo.toml"
    builds(recipe)
    change, again = SHAPING[what]
    change(world)
    store = builds(recipe)
    assert set(store["tokenized"]) == again, store["misses"]
    assert set(store["reused"]) == SOURCES - again
    assert builds(recipe)["tokenized"] == [], "the changed sources are stored in turn"


@pytest.mark.parametrize("overlong", ["drop", "truncate", "split_turns"])
def test_a_shorter_seq_len_tokenizes_the_sources_with_samples_over_it(world, tmp_path, overlong):
    """seq_len is not in the key: an entry is reused for another seq_len when every one of
    its samples fits both; a source with a sample over the new one is tokenized again."""
    recipe = world / "demo.toml"
    edit_recipe(recipe, lambda d: d["output"].update(overlong=overlong))
    store = tmp_path / "store"
    build(recipe, tmp_path / "a", progress=False, cache=store)
    edit_recipe(recipe, lambda d: d["output"].update(seq_len=300))
    warm = build(recipe, tmp_path / "b", progress=False, cache=store)
    clean = build(recipe, tmp_path / "c", progress=False, cache=False)
    assert release_bytes(warm.path) == release_bytes(clean.path)
    over = {s["name"] for s in clean.summary["sources"] if s["dropped_overlong"] + s["truncated"]}
    assert over and over != SOURCES, "the demo has sources on both sides of 300 tokens"
    assert set(warm.store["tokenized"]) == over, warm.store["misses"]
    assert all("seq_len" in warm.store["misses"][name] for name in over)
    # Both lengths are kept now: going back and forth tokenizes nothing.
    for seq_len in (2048, 300):
        edit_recipe(recipe, lambda d: d["output"].update(seq_len=seq_len))
        r = build(recipe, tmp_path / f"again{seq_len}", progress=False, cache=store)
        assert r.store["tokenized"] == [], r.store["misses"]
    clean = build(recipe, tmp_path / "clean300", progress=False, cache=False)
    assert release_bytes(r.path) == release_bytes(clean.path)
    names = [e.key for e in TokenStore(store).entries()]
    assert sum("@300" in n for n in names) == len(over) and len(names) == len(SOURCES) + len(over)


def test_llm_tables_key_on_their_cache_content(world, builds):
    recipe = world / "demo-llm.toml"
    builds(recipe, offline=True)
    cache = world / "demo" / "cache" / "lengthen.rephrase.jsonl"
    lines = cache.read_text("utf-8").splitlines()
    record = json.loads(lines[0])
    record["response"] = "A different sentence."
    cache.write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n", "utf-8")
    store = builds(recipe, offline=True)
    assert store["tokenized"] == ["vqa"], store["misses"]
    edit_recipe(recipe, lambda d: d["generate"][0].update(concurrency=1, timeout=5.0, weight=0.5))  # how calls go, the mix
    assert builds(recipe, offline=True)["tokenized"] == []
    edit_recipe(recipe, lambda d: d["generate"][0].update(min_turns=2))
    assert builds(recipe, offline=True)["tokenized"] == ["conversations"]


def test_rebuilds_under_random_edits_equal_clean_builds(world, tmp_path):
    """Property: after any sequence of recipe edits, a build through the store (filled by
    the builds before it) writes the release a clean build writes."""
    recipe = world / "demo.toml"
    original = recipe.read_text("utf-8")
    edits = {
        "weight": lambda d, v: d["source"][v % 4].update(weight=0.05 + v / 10),
        "total": lambda d, v: d["mixture"].update(total={"samples": 100 + 50 * v}),
        "packing": lambda d, v: d["output"].update(packing=("bfd", "none", "tight")[v % 3]),
        "shuffle": lambda d, v: d["output"].update(shuffle=bool(v % 2)),
        "seq_len": lambda d, v: d["output"].update(seq_len=(512, 2048, 4096)[v % 3]),
        "overlong": lambda d, v: d["output"].update(overlong=("drop", "truncate", "split_turns")[v % 3]),
        "train_on": lambda d, v: d["output"].update(train_on=("assistant", "last_assistant", "all")[v % 3]),
        "seed": lambda d, v: d["recipe"].update(seed=v % 3),
        "template": lambda d, v: d["source"][0].update(instructions=["<image>\n{question}" + "!" * (v % 3)]),
    }
    store, n = tmp_path / "store", [0]

    @settings(max_examples=6, deadline=None, derandomize=True)
    @given(st.lists(st.tuples(st.sampled_from(sorted(edits)), st.integers(0, 5)), min_size=1, max_size=3))
    def run(changes):
        recipe.write_text(original, "utf-8")
        for name, value in changes:
            edit_recipe(recipe, lambda d: edits[name](d, value))
        n[0] += 1
        warm = build(recipe, tmp_path / f"w{n[0]}", progress=False, cache=store)
        clean = build(recipe, tmp_path / f"c{n[0]}", progress=False, cache=False)
        assert release_bytes(warm.path) == release_bytes(clean.path)
        again = build(recipe, tmp_path / f"a{n[0]}", progress=False, cache=store)
        assert again.store["tokenized"] == [] and release_bytes(again.path) == release_bytes(clean.path)

    run()


# --- damage, failures, concurrency, size ---------------------------------------------


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_a_damaged_entry_is_detected_and_rebuilt(world, builds, damage):
    recipe = world / "demo.toml"
    builds(recipe)
    entry = next(e for e in TokenStore(builds.store).entries() if e.source == "llava")
    path = TokenStore(builds.store).path(entry.key)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    elif damage == "truncate":
        data = data[: len(data) - 3]
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    store = builds(recipe)
    assert store["tokenized"] == ["llava"]
    assert store["misses"]["llava"]
    assert builds(recipe)["tokenized"] == [], "rewritten whole"


def test_an_unusable_store_degrades_to_a_plain_build(world, tmp_path):
    recipe = world / "demo.toml"
    clean = build(recipe, tmp_path / "clean", progress=False, cache=False)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.warns(TokenStoreWarning, match="cannot be used"):
        r = build(recipe, tmp_path / "no-folder", progress=False, cache=blocker / "store")
    assert r.store["folder"] is None and release_bytes(r.path) == release_bytes(clean.path)
    # Entries that cannot be written (a folder where each file goes): warnings, same release.
    store = TokenStore(tmp_path / "store")
    plan = resolve(load_recipe(recipe))
    hashes = Hashes()
    for s in plan.sources:
        (store.path(source_key(plan, s, hashes)) / "x").mkdir(parents=True)
    with pytest.warns(TokenStoreWarning, match="not saved"):
        r = build(recipe, tmp_path / "unwritable", progress=False, cache=store.folder)
    assert len(r.store["warnings"]) == 4 and r.store["tokenized"] == ["vqa", "captions", "llava", "chat"]
    assert release_bytes(r.path) == release_bytes(clean.path)


def test_two_builds_at_once_share_a_store(world, tmp_path):
    recipe = world / "demo.toml"
    store = tmp_path / "store"
    results: dict[int, object] = {}

    def one(i: int) -> None:
        results[i] = build(recipe, tmp_path / f"r{i}", progress=False, cache=store)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert release_bytes(tmp_path / "r0") == release_bytes(tmp_path / "r1")
    assert len(TokenStore(store).entries()) == 4
    assert not list((store / "tokens").glob(".*tmp*")), "no temporary file left"
    assert build(recipe, tmp_path / "r2", progress=False, cache=store).store["tokenized"] == []


def test_least_recently_used_entries_are_pruned_past_the_cap(world, tmp_path, monkeypatch):
    recipe = world / "demo.toml"
    store = TokenStore(tmp_path / "store")
    build(recipe, tmp_path / "a", progress=False, cache=store.folder)
    sizes = {e.source: e.bytes for e in store.entries()}
    edit_recipe(recipe, lambda d: d["source"][3].update(instructions=["{question}?"]))  # a second chat entry
    cap = int(sum(sizes.values()) * 1.05)  # room for the four, not for a fifth
    monkeypatch.setenv("MMRECIPE_CACHE_MAX", str(cap))
    r = build(recipe, tmp_path / "b", progress=False, cache=store.folder)
    assert r.store["tokenized"] == ["chat"]
    left = store.entries()
    assert sum(e.bytes for e in left) <= cap
    assert [e.source for e in left].count("chat") == 1, "the old chat entry, least recently used, went"
    assert {e.source for e in left} == SOURCES


def test_size_cap_parsing(monkeypatch):
    for text, want in (("", 20 << 30), ("1000", 1000), ("5G", 5 << 30), ("500MiB", 500 << 20), ("1.5k", 1536)):
        monkeypatch.setenv("MMRECIPE_CACHE_MAX", text)
        assert size_cap() == want
    monkeypatch.setenv("MMRECIPE_CACHE_MAX", "lots")
    with pytest.raises(ValueError, match="MMRECIPE_CACHE_MAX"):
        size_cap()


def test_the_cache_folder_default_order(monkeypatch, tmp_path):
    monkeypatch.setenv("MMRECIPE_CACHE", str(tmp_path / "a"))
    assert cache_dir() == tmp_path / "a"
    assert cache_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("MMRECIPE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "mmrecipe"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "mmrecipe"


def test_tests_never_use_the_users_store(isolated_token_store):
    assert cache_dir() == isolated_token_store
    assert not list(isolated_token_store.iterdir())


# --- the command line ----------------------------------------------------------------


def test_recipe_build_says_what_it_reused_and_cache_commands(world, tmp_path, capsys):
    recipe = str(world / "demo.toml")
    store = str(tmp_path / "store")
    assert main(["build", recipe, "-o", str(tmp_path / "a"), "-q", "--cache", store]) == 0
    assert "0 sources from the token store, 4 tokenized" in capsys.readouterr().out
    assert main(["build", recipe, "-o", str(tmp_path / "b"), "-q", "--cache", store]) == 0
    assert "4 sources from the token store, 0 tokenized" in capsys.readouterr().out
    assert main(["build", recipe, "-o", str(tmp_path / "c"), "-q", "--no-cache"]) == 0
    assert "token store        off (4 sources tokenized)" in capsys.readouterr().out
    assert main(["cache", "ls", "--cache", store]) == 0
    out = capsys.readouterr().out
    for want in ("key", "source", "last used", "vqa", "captions", "llava", "chat", "4 entries"):
        assert want in out, out
    assert main(["cache", "prune", "--cache", store, "--max", "1"]) == 0
    assert "removed 4 entries" in capsys.readouterr().out
    main(["build", recipe, "-o", str(tmp_path / "d"), "-q", "--cache", store])
    capsys.readouterr()
    assert main(["cache", "clear", "--cache", store]) == 0
    assert "removed 4 entries" in capsys.readouterr().out
    assert TokenStore(Path(store)).entries() == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["cache", "ls", "--cache", store]) == 0


def test_the_core_calls_check_their_order(tmp_path):
    """`load_source` only into a source with nothing added yet (InternalError otherwise),
    and a missing entry is a miss with its reason, not an error."""
    from mmrecipe.builder import normalize_source
    from mmrecipe.compile import batch_columns, make_compiler
    from mmrecipe.errors import InternalError

    plan = resolve(load_recipe(RECIPES / "demo.toml"))
    norm = normalize_source(plan, 3)
    compiler = make_compiler(plan)
    compiler.add_batch(3, batch_columns(norm, 0, len(norm)))
    entry = tmp_path / "chat.tok"
    assert compiler.save_source(3, "k", b"{}", entry) == entry.stat().st_size
    assert compiler.load_source(0, "k", tmp_path / "absent.tok")[0] is None
    with pytest.raises(InternalError, match="has samples"):
        compiler.load_source(3, "k", entry)
    fresh = make_compiler(plan)
    assert fresh.load_source(3, "k", entry) == (b"{}", "")
    assert fresh.load_source(2, "other", entry)[1] == "the entry holds another key"
