"""Instruction pools an LLM writes from seeds (`[pool.NAME] generate`), against a local
stub server: the filters (duplicates, near duplicates, placeholders), the stopping rule,
the cache (offline rebuilds byte for byte), bad input. The real server's turn is in
tests/test_llm_server.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import small_recipe
from hypothesis import given
from hypothesis import strategies as st
from llm_stub import Stub

from mmrecipe import LLMError, RecipeError, build, load_recipe
from mmrecipe import _core
from mmrecipe.check import check
from mmrecipe.cli import main
from mmrecipe.llm.pools import expand_pools
from mmrecipe.llm.stages import LLMStages
from mmrecipe.recipe import resolve
from mmrecipe.recipe.validate import placeholders, template_problem

SEEDS = ["{question}\nAnswer briefly.", "Give a short answer: {question}"]


@pytest.fixture
def stub():
    s = Stub().start()
    yield s
    s.stop()


def call_number(request: dict, seeds: list[str] = SEEDS) -> int:
    """Which call k a request is (mod the seed count): its seeds, shown as the model's
    earlier replies, are listed from the k-th on."""
    first = next(m["content"] for m in request["messages"] if m["role"] == "assistant")
    return seeds.index(first)


def pool_recipe(folder: Path, stub: Stub, generate: str = "", pool: str = "", source: str = "") -> Path:
    rows = [{"question": f"What is item {i}?", "answer": f"thing {i}"} for i in range(30)]
    (folder / "vqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    keys = {"seeds": json.dumps(SEEDS), "count": "6", "per_call": "4", "endpoint": f'"{stub.url}"',
            "model": '"stub-model"', "retries": "0", "timeout": "5", "concurrency": "2"}
    keys.update(line.split(" = ", 1) for line in generate.splitlines() if line.strip())
    body = f'''name = "vqa"
path = "vqa.jsonl"
layout = "qa"
fields = {{ question = "question", answer = "answer" }}
instructions = "mine"
{source}
[pool.mine]
{pool}
[pool.mine.generate]
''' + "".join(f"{k} = {v}\n" for k, v in keys.items())
    path = folder / "r.toml"
    path.write_text(small_recipe(body, output="seq_len = 256"))
    return path


def pool_of(recipe: Path, mode: str = "online"):
    plan = resolve(load_recipe(recipe))
    with LLMStages(plan, mode=mode, progress=False) as stages:
        expanded, results = expand_pools(plan, stages)
    return expanded.source("vqa").templates, results["mine"]


def replies(stub: Stub, *per_call: str):
    """A stub behaviour: call k gets per_call[k] (the last one after that). Pool calls
    are made one at a time, so the stub's last request is the one being answered."""
    return lambda prompt, attempt: per_call[min(call_number(stub.requests[-1]), len(per_call) - 1)]


def test_pool_is_templates_seeds_then_the_first_count_survivors(tmp_path, stub):
    stub.behave = replies(
        stub,
        "Here are 4 new instructions:\n1. {question} Reply in a few words.\n2. \"Answer shortly: {question}\"\n"
        "3. {question} answer BRIEFLY!\n- What is shown? {color}\n{question}",  # a duplicate by normalized text; an unknown field; no words
        "* Tell me, briefly: {question}\n* Please answer: {question}\n* Describe the scene.\n"  # lacks {question}
        "* Briefly, tell me: {question}\n* {question} One word only.\n* {question} A phrase will do.\n* late",
    )
    recipe = pool_recipe(tmp_path, stub, pool='templates = ["Q: {question}"]')
    templates, result = pool_of(recipe)
    assert templates == [
        "Q: {question}", *SEEDS,
        "{question} Reply in a few words.", "Answer shortly: {question}",
        "Tell me, briefly: {question}", "Please answer: {question}", "{question} One word only.", "{question} A phrase will do.",
    ]
    # "Briefly, tell me" is "Tell me, briefly" in another order; the 7th survivor is never needed
    assert result.dropped == {"duplicates": 2, "unknown placeholders": 1, "missing placeholders": 1, "placeholders only": 1}
    assert result.calls == 2 and len(stub.requests) == 2
    # each call its own seed; the seeds listed from the k-th on
    assert [r["seed"] for r in stub.requests] == [0, 1]
    assert [call_number(r) for r in stub.requests] == [0, 1]
    # the seeds as the model's earlier replies, then the ask for per_call more
    assert [m["content"] for m in stub.requests[1]["messages"] if m["role"] == "assistant"] == SEEDS[1:] + SEEDS[:1]
    assert "Keep every word in curly braces, such as {question}" in stub.requests[0]["messages"][0]["content"]
    assert stub.prompts()[0] == "Write 4 more instructions, each worded differently from the earlier ones, one per line."


def test_calls_stop_at_max_calls_and_an_empty_pool_is_an_error(tmp_path, stub):
    stub.behave = replies(stub, "Describe the scene.\nAbout {nope}: {question}")
    pool_recipe(tmp_path, stub, generate="max_calls = 3")
    with pytest.raises(LLMError, match=r"pool\.mine\.generate: 3 calls gave no usable instruction \(left out: 3 missing placeholders, 3 unknown placeholders\)"):
        pool_of(tmp_path / "r.toml")
    assert len(stub.requests) == 3


def test_a_short_pool_is_kept_with_a_note(tmp_path, stub):
    stub.behave = replies(stub, "{question} Short, please.")
    pool_recipe(tmp_path, stub, generate="max_calls = 2")
    templates, result = pool_of(tmp_path / "r.toml")
    assert templates == [*SEEDS, "{question} Short, please."]
    assert result.note() == "pool.mine: 1 of 6 instructions written in 2 calls, pool of 3 (left out: 1 duplicates)"


def test_build_rebuilds_offline_byte_for_byte_and_the_cache_is_an_input(tmp_path, stub):
    stub.behave = replies(stub, "{question} Reply tersely.\n{question} Be brief.", "{question} In short?\n{question} Short reply.\n{question} Keep it short.\n{question} Few words.")
    recipe = pool_recipe(tmp_path, stub)
    first = build(recipe, tmp_path / "a", progress=False, cache=False)
    asked = len(stub.requests)
    stub.stop()
    second = build(recipe, tmp_path / "b", progress=False, offline=True, cache=False)
    assert second.manifest.release_id == first.manifest.release_id
    assert asked == 2
    roles = [i.role for i in first.manifest.inputs]
    assert "cache:pool.mine" in roles
    stats = json.loads((tmp_path / "a" / "stats.json").read_text())
    assert "pool.mine: 6 of 6 instructions written in 2 calls, pool of 8" in stats["sources"][0]["notes"][0]
    # the generated templates are what the samples' instructions are drawn from
    used = {r.instruction for r in _previewed(recipe)}
    assert used and used <= {t.replace("{question}", "").strip() for t in pool_of(recipe, "cache")[0]}


def _previewed(recipe: Path):
    from mmrecipe.preview import preview

    class R:
        def __init__(self, text: str):
            self.instruction = re.sub(r"What is item \d+\?", "", text).strip()

    return [R(s.text.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]) for s in preview(recipe, n=30)]


def test_offline_without_the_cache_names_the_pool(tmp_path, stub):
    recipe = pool_recipe(tmp_path, stub)
    with pytest.raises(LLMError, match=r"pool\.mine\.generate: 1 of 1 calls .* --offline makes no calls"):
        build(recipe, tmp_path / "out", progress=False, offline=True, cache=False)
    assert stub.requests == [] and not (tmp_path / "out").exists()


def test_token_store_follows_the_generated_templates(tmp_path, stub):
    stub.behave = replies(stub, "{question} Reply tersely.\n{question} Be brief.\n{question} In short?\n{question} Short reply.\n{question} Few words.\n{question} Tiny answer.")
    recipe = pool_recipe(tmp_path, stub)
    store = tmp_path / "store"
    a = build(recipe, tmp_path / "a", progress=False, cache=store)
    b = build(recipe, tmp_path / "b", progress=False, cache=store, offline=True)
    assert b.store["reused"] == ["vqa"] and b.manifest.release_id == a.manifest.release_id
    # another reply (a cleared cache, a new server) is another pool: the entry does not match
    (tmp_path / "cache" / "pool.mine.jsonl").unlink()
    stub.behave = replies(stub, "{question} Something else.\n{question} And more.\n{question} Third.\n{question} Fourth.\n{question} Fifth one.\n{question} Sixth one.")
    c = build(recipe, tmp_path / "c", progress=False, cache=store)
    assert c.store["tokenized"] == ["vqa"] and c.manifest.release_id != a.manifest.release_id


def test_check_shows_the_pool_from_the_cache(tmp_path, stub, capsys):
    stub.behave = replies(stub, "{question} Reply tersely.\n{question} Be brief.\n{question} In short?\n{question} Short reply.\n{question} Few words.\n{question} Tiny answer.")
    recipe = pool_recipe(tmp_path, stub)
    report = check(recipe, images="none")
    assert report.pools["mine"].templates == SEEDS and report.pools["mine"].missing == 1  # nothing cached yet
    build(recipe, tmp_path / "out", progress=False, cache=False)
    assert main(["check", str(recipe), "--pools", "--images", "none"]) == 0
    out = capsys.readouterr().out
    assert "pool 'mine' (pool.mine: 6 of 6 instructions written in 1 calls, pool of 8)" in out
    assert "  {question} Tiny answer." in out and "  {question}\\nAnswer briefly." in out


def test_failed_calls_are_skipped_or_stop_the_build(tmp_path, stub):
    stub.behave = lambda p, k: "500" if call_number(stub.requests[-1]) == 0 else "{question} Brief.\n{question} Terse.\n{question} Short.\n{question} Small.\n{question} Quick.\n{question} Tiny."
    recipe = pool_recipe(tmp_path, stub)
    templates, result = pool_of(recipe)
    assert result.dropped["failed calls"] == 1 and len(templates) == 8
    (tmp_path / "cache" / "pool.mine.jsonl").unlink()
    recipe = pool_recipe(tmp_path, stub, generate='on_error = "fail"')
    with pytest.raises(LLMError, match=r"pool\.mine\.generate: the call for source 'pool\.mine', row 0 failed"):
        pool_of(recipe)


@pytest.mark.parametrize(
    "generate, message",
    [
        ("seeds = []", r"pool\.mine\.generate\.seeds: list a few hand-written instructions"),
        ('seeds = ["{question"]', r"pool\.mine\.generate\.seeds\[0\]: unclosed '\{'"),
        ("count = 0", r"pool\.mine\.generate\.count: 0 is not between 1 and 10000"),
        ("per_call = 1000", r"pool\.mine\.generate\.per_call: 1000 is not between 1 and 200"),
        ('prompt = " "', r"pool\.mine\.generate\.prompt: an empty prompt asks for nothing"),
        ('model = ""', r"pool\.mine\.generate\.model: name the model"),
        ("max_similarity = 0.0", r"pool\.mine\.generate\.max_similarity: 0\.0 is not in \(0, 1\]"),
    ],
)
def test_bad_pool_tables_name_their_key(tmp_path, stub, generate, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(pool_recipe(tmp_path, stub, generate=generate))


@given(st.text(alphabet="ab_{} 1", max_size=12))
def test_template_problem_agrees_with_the_core_parser(text):
    """What a generated template is checked with is what the core parses instructions with."""
    names = list(dict.fromkeys(placeholders(text)))
    empty = (np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.uint8))
    try:
        _core.fill_templates([text], 0, "s", np.zeros(0, dtype=np.uint64), names, [empty] * len(names))
        core_ok = True
    except ValueError:
        core_ok = False
    assert (template_problem(text) is None) == core_ok


def test_near_duplicates_are_dropped_unless_allowed(tmp_path, stub):
    stub.behave = replies(stub, "{question} Answer briefly please.\n{question} Reply in a word.\nGive a short answer to this: {question}")
    pool_recipe(tmp_path, stub, generate="count = 3\nmax_calls = 1")
    templates, result = pool_of(tmp_path / "r.toml")
    # ROUGE-L 2·3/(4+3) = 0.86 against the first seed and 2·5/(7+5) = 0.83 against the second
    assert templates == [*SEEDS, "{question} Reply in a word."] and result.dropped == {"near duplicates": 2}
    (tmp_path / "cache" / "pool.mine.jsonl").unlink()
    pool_recipe(tmp_path, stub, generate="count = 3\nmax_calls = 1\nmax_similarity = 1.0")
    assert len(pool_of(tmp_path / "r.toml")[0]) == 5


def _lcs(a: tuple[str, ...], b: tuple[str, ...]) -> int:
    """The longest common subsequence by its definition (the recursion), for small lists."""
    from functools import cache

    @cache
    def go(i: int, j: int) -> int:
        if i == len(a) or j == len(b):
            return 0
        return go(i + 1, j + 1) + 1 if a[i] == b[j] else max(go(i + 1, j), go(i, j + 1))

    return go(0, 0)


@given(st.lists(st.sampled_from("abcd"), max_size=9), st.lists(st.sampled_from("abcd"), max_size=9))
def test_rouge_l_is_the_lcs_f1(a, b):
    from mmrecipe.llm.pools import rouge_l

    expected = 2 * _lcs(tuple(a), tuple(b)) / (len(a) + len(b)) if a and b else 0.0
    assert rouge_l(a, b) == pytest.approx(expected) == pytest.approx(rouge_l(b, a))
    assert a == [] or rouge_l(a, a) == 1.0


def test_shipped_pool_demo_builds_offline_from_its_cache(tmp_path):
    from conftest import RECIPES

    result = build(RECIPES / "demo-pool.toml", tmp_path / "out", progress=False, offline=True, cache=False)
    assert result.llm["pool.caption-written"]["called"] == 0
    notes = {s["name"]: s["notes"] for s in result.summary["sources"]}
    assert notes["captions"][0].startswith("pool.caption-written: 24 of 24 instructions written in ")
    assert "cache:pool.caption-written" in {i.role for i in result.manifest.inputs}
    report = check(RECIPES / "demo-pool.toml", images="none")
    pool = report.pools["caption-written"].templates
    assert len(pool) == 29 and pool[:5] == load_recipe(RECIPES / "demo-pool.toml").pool["caption-written"].generate.seeds
