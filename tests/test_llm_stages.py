"""Answer lengthening and conversation generation against a local stub server: the
cache (durable, keyed by what shapes a reply), offline rebuilds, retries, timeouts,
HTTP errors, malformed replies, each on_error policy, concurrency and a killed build."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import polars as pl
import pytest
from conftest import small_recipe
from llm_stub import Stub

from mmrecipe import LLMError, build, load_recipe
from mmrecipe.builder import normalize_rows, normalize_source
from mmrecipe.recipe import resolve
from mmrecipe.sources.columns import CONTENTS, ROW
from mmrecipe.llm.stages import LLMStages

N = 12


@pytest.fixture
def stub():
    s = Stub().start()
    yield s
    s.stop()


def qa_rows(folder: Path, n: int = N) -> None:
    rows = [{"id": i, "question": f"What is item {i}?", "answer": f"thing {i % 5}"} for i in range(n)]
    (folder / "vqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def lengthen_recipe(folder: Path, stub: Stub, table: str = "", model: str = "stub-model") -> Path:
    """A one-source qa recipe whose answers [lengthen.r] rewrites through `stub`; `table`
    holds TOML lines that replace or add keys of [lengthen.r]."""
    keys = {"endpoint": f'"{stub.url}"', "model": f'"{model}"', "prompt": '"Q: {question}\\nA: {answer}"',
            "retries": "2", "backoff": "0", "timeout": "5", "concurrency": "3"}
    keys.update(line.split(" = ", 1) for line in table.splitlines() if line.strip())
    body = '''name = "vqa"
path = "vqa.jsonl"
layout = "qa"
fields = { question = "question", answer = "answer" }
lengthen = "r"
[lengthen.r]
''' + "".join(f"{k} = {v}\n" for k, v in keys.items())
    path = folder / "r.toml"
    path.write_text(small_recipe(body, output="seq_len = 256"))
    return path


def answers(recipe_path: Path, mode: str = "online", **kw) -> dict[int, str]:
    plan = resolve(load_recipe(recipe_path))
    with LLMStages(plan, mode=mode, progress=False, **kw) as stages:
        norm = normalize_source(plan, 0, stages)
    return {row: turns[1] for row, turns in norm.frame.select(ROW, CONTENTS).iter_rows()}


def cache_lines(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "cache" / "lengthen.r.jsonl").read_text().splitlines()]


def same_release(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    return files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and all(
        (a / f).read_bytes() == (b / f).read_bytes() for f in files
    )


def test_lengthened_answers_are_the_replies_and_rebuild_offline(tmp_path, stub):
    qa_rows(tmp_path)
    recipe = lengthen_recipe(tmp_path, stub)
    first = build(recipe, tmp_path / "a", progress=False)
    # Rows 0..4 and 5..9 ask distinct prompts; identical prompts are asked once.
    assert sorted(stub.prompts()) == sorted({f"Q: What is item {i}?\nA: thing {i % 5}" for i in range(N)})
    assert first.llm["lengthen.r"] == {"rows": N, "cached": 0, "called": N, "failed": 0, "missing": 0}
    assert answers(recipe, mode="offline") == {i: f"LONG Q: What is item {i}? | A: thing {i % 5}" for i in range(N)}
    # The cache is an input of the release.
    roles = {i.role: i for i in first.manifest.inputs}
    assert roles["cache:lengthen.r"].path == "cache/lengthen.r.jsonl"
    # Rebuilt with the server gone: byte for byte, offline or not (nothing is missing).
    stub.stop()
    build(recipe, tmp_path / "b", progress=False, offline=True)
    again = build(recipe, tmp_path / "c", progress=False, cache=False)  # the stage itself, not the token store
    assert again.llm["lengthen.r"]["called"] == 0 and again.llm["lengthen.r"]["cached"] == N
    assert same_release(tmp_path / "a", tmp_path / "b") and same_release(tmp_path / "a", tmp_path / "c")
    note = json.loads((tmp_path / "a" / "stats.json").read_text())["sources"][0]["notes"]
    assert note == [f"lengthen.r: {N} of {N} answers lengthened"]


def test_release_follows_the_cache_content_not_its_order(tmp_path, stub):
    from mmrecipe.release.verify import verify

    qa_rows(tmp_path)
    recipe = lengthen_recipe(tmp_path, stub)
    build(recipe, tmp_path / "a", progress=False)
    cache = tmp_path / "cache" / "lengthen.r.jsonl"
    lines = cache.read_text().splitlines(keepends=True)
    # The calls finished in another order (concurrency): same content, same release.
    cache.write_text("".join(reversed(lines)))
    assert verify(tmp_path / "a", recipe_dir=tmp_path).problems == []
    build(recipe, tmp_path / "b", progress=False, offline=True)
    assert same_release(tmp_path / "a", tmp_path / "b")
    # A changed reply is a changed input: verify names the cache, the release id moves.
    record = json.loads(lines[0])
    cache.write_text("".join(lines[1:]) + json.dumps({**record, "response": "edited"}) + "\n")
    problems = verify(tmp_path / "a", recipe_dir=tmp_path).problems
    assert [p.path for p in problems] == ["cache/lengthen.r.jsonl (cache:lengthen.r)"]
    other = build(recipe, tmp_path / "c", progress=False, offline=True)
    assert other.manifest.release_id != json.loads((tmp_path / "a" / "manifest.json").read_text())["release_id"]


def test_cache_key_covers_what_shapes_the_reply(tmp_path, stub):
    qa_rows(tmp_path)
    answers(lengthen_recipe(tmp_path, stub))
    asked = len(stub.requests)
    # How a call is made is not part of the key: no new calls.
    answers(lengthen_recipe(tmp_path, stub, table="concurrency = 1\ntimeout = 9\nretries = 0"))
    assert len(stub.requests) == asked
    # What shapes the reply is: each change asks every prompt again.
    changes = [{"table": t} for t in ("temperature = 0.1", "max_tokens = 7", 'system = "Be brief."', "seed = 5", "top_p = 0.9")]
    for change in [*changes, {"model": "other-model"}]:
        before = len(stub.requests)
        answers(lengthen_recipe(tmp_path, stub, **change))
        assert len(stub.requests) - before == N, change
    assert len({r["seed"] for r in stub.requests}) == 2


def test_offline_names_what_is_missing(tmp_path, stub):
    qa_rows(tmp_path)
    recipe = lengthen_recipe(tmp_path, stub)
    with pytest.raises(LLMError, match=r"lengthen.r: 12 of 12 calls for source 'vqa' are not in the cache .*lengthen.r.jsonl.*--offline.*first: row 0"):
        build(recipe, tmp_path / "out", progress=False, offline=True)
    assert stub.requests == [] and not (tmp_path / "out").exists()


def test_retries_recover_from_500s_and_malformed_json(tmp_path, stub):
    qa_rows(tmp_path)
    # Row 1 fails twice with 500, row 2 gets broken JSON once; retries = 2 covers both.
    stub.behave = lambda p, k: ("500" if "item 1?" in p and k <= 2 else "malformed" if "item 2?" in p and k == 1 else "LONG " + p)
    got = answers(lengthen_recipe(tmp_path, stub))
    assert got[1].startswith("LONG") and got[2].startswith("LONG")
    assert stub.attempts["Q: What is item 1?\nA: thing 1"] == 3 and stub.attempts["Q: What is item 2?\nA: thing 2"] == 2
    assert all("error" not in r for r in cache_lines(tmp_path))


def test_slow_replies_within_the_timeout_and_a_timeout_that_recovers(tmp_path, stub):
    qa_rows(tmp_path)
    # Every reply takes 0.3 s (under timeout = 2: one attempt each); row 4's first
    # attempt hangs past the timeout, its retry answers.
    stub.delay = 0.3
    stub.hang = 3.0
    stub.behave = lambda p, k: "timeout" if "item 4?" in p and k == 1 else "LONG " + p
    got = answers(lengthen_recipe(tmp_path, stub, table='timeout = 2\non_error = "fail"'))
    assert all(v.startswith("LONG") for v in got.values())
    assert stub.attempts["Q: What is item 4?\nA: thing 4"] == 2
    assert all(n == 1 for p, n in stub.attempts.items() if "item 4?" not in p)


@pytest.mark.parametrize("fault,reason", [
    ("500", "HTTP 500"), ("malformed", "malformed reply"), ("timeout", "no reply within timeout"),
    ("length", "cut at max_tokens"), ("empty", "the reply is empty"),
])
def test_each_fault_fails_the_call_under_on_error_fail(tmp_path, stub, fault, reason):
    qa_rows(tmp_path)
    stub.behave = lambda p, k: fault if "item 3?" in p else "LONG " + p
    stub.hang = 1.0
    recipe = lengthen_recipe(tmp_path, stub, table='on_error = "fail"\ntimeout = 0.3\nretries = 1')
    with pytest.raises(LLMError, match=rf"source 'vqa'.*row 3.*{reason}") as e:
        build(recipe, tmp_path / "out", progress=False)
    assert 'on_error = "fail"' in str(e.value)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")], "no staging or spill left behind"
    # Failures are not recorded under "fail": the next build asks again.
    assert all(r.get("error") is None for r in cache_lines(tmp_path))


def test_on_error_keep_and_drop_record_failures_and_retry_failed(tmp_path, stub):
    qa_rows(tmp_path)
    stub.behave = lambda p, k: "500" if "item 3?" in p else "LONG " + p
    keep = lengthen_recipe(tmp_path, stub, table='on_error = "keep"')
    result = build(keep, tmp_path / "keep", progress=False)
    assert result.llm["lengthen.r"]["failed"] == 1
    assert answers(keep, mode="offline")[3] == "thing 3"  # the original answer
    stats = json.loads((tmp_path / "keep" / "stats.json").read_text())["sources"][0]
    assert stats["notes"] == ["lengthen.r: 11 of 12 answers lengthened, 1 kept as it was after failed calls"]
    failed = [r for r in cache_lines(tmp_path) if r.get("error")]
    assert len(failed) == 1 and "HTTP 500" in failed[0]["error"]
    # The recorded failure is final: an offline rebuild reproduces the release.
    build(keep, tmp_path / "keep2", progress=False, offline=True)
    assert same_release(tmp_path / "keep", tmp_path / "keep2")

    drop = lengthen_recipe(tmp_path, stub, table='on_error = "drop"')
    dropped = build(drop, tmp_path / "drop", progress=False)
    assert dropped.summary["sources"][0]["rows"] == N - 1
    assert 3 not in answers(drop, mode="offline")

    # --retry-failed asks again; once the server recovers, the answer is lengthened.
    stub.behave = lambda p, k: "LONG " + p
    asked = len(stub.requests)
    retried = build(keep, tmp_path / "keep3", progress=False, retry_failed=True)
    assert len(stub.requests) == asked + 1 and retried.llm["lengthen.r"]["called"] == 1
    assert answers(keep, mode="offline")[3].startswith("LONG")


def test_fatal_http_status_and_unreachable_endpoint(tmp_path, stub):
    qa_rows(tmp_path)
    stub.behave = lambda p, k: "404"
    with pytest.raises(LLMError, match=r"lengthen.r: .* answered HTTP 404 .*check endpoint, model"):
        build(lengthen_recipe(tmp_path, stub), tmp_path / "out", progress=False)
    url = stub.url
    stub.stop()  # nothing listens on the port now
    path = lengthen_recipe(tmp_path, stub, table="retries = 1")
    path.write_text(path.read_text().replace(stub.url, url))
    with pytest.raises(LLMError, match=r"lengthen.r.endpoint: cannot connect .*--offline"):
        build(path, tmp_path / "out", progress=False)


def test_api_key_comes_from_the_named_environment_variable(tmp_path, stub, monkeypatch):
    qa_rows(tmp_path, 2)
    recipe = lengthen_recipe(tmp_path, stub, table='api_key_env = "MMRECIPE_TEST_KEY"')
    monkeypatch.delenv("MMRECIPE_TEST_KEY", raising=False)
    with pytest.raises(LLMError, match=r"lengthen.r.api_key_env: the environment variable MMRECIPE_TEST_KEY is not set"):
        answers(recipe)
    monkeypatch.setenv("MMRECIPE_TEST_KEY", "sk-test")
    answers(recipe)
    assert stub.auth == ["Bearer sk-test"] * 2
    # The key is not part of the release or the cache.
    assert "sk-test" not in (tmp_path / "cache" / "lengthen.r.jsonl").read_text()


def test_calls_run_concurrently(tmp_path, stub):
    qa_rows(tmp_path)
    # The first three requests wait for each other: a client that sends one call at a
    # time would leave them waiting until the barrier breaks.
    stub.barrier = threading.Barrier(3, timeout=10)
    answers(lengthen_recipe(tmp_path, stub))
    assert not stub.barrier.broken


def test_template_lengthening_is_offline_and_keyed_by_row(tmp_path, stub):
    qa_rows(tmp_path, 200)
    path = lengthen_recipe(tmp_path, stub)
    text = path.read_text()
    start = text.index("[lengthen.r]")
    path.write_text(text[:start] + '[lengthen.r]\nmethod = "template"\npool = "answer-sentence"\n')
    got = answers(path)
    assert stub.requests == []
    from mmrecipe.recipe.pools import load_pool

    templates = load_pool("answer-sentence", load_recipe(path).pool).templates
    used = set()
    for row, answer in got.items():
        matches = [t for t in templates if t.format(answer=f"thing {row % 5}", question=f"What is item {row}?") == answer]
        assert matches, answer
        used.add(matches[0])
    assert len(used) == len(templates)
    # The choice is a function of the row, not of its position in a batch.
    plan = resolve(load_recipe(path))
    frame = pl.read_ndjson(tmp_path / "vqa.jsonl").slice(150, 10)
    with LLMStages(plan, mode="cache", progress=False) as stages:
        norm = normalize_rows(plan.sources[0], stages, frame, 150, partial=True)
    assert {r: t[1] for r, t in norm.frame.select(ROW, CONTENTS).iter_rows()} == {r: got[r] for r in range(150, 160)}


def test_torn_last_line_is_cut_off(tmp_path, stub):
    qa_rows(tmp_path)
    recipe = lengthen_recipe(tmp_path, stub)
    answers(recipe)
    cache = tmp_path / "cache" / "lengthen.r.jsonl"
    lines = cache.read_text().splitlines(keepends=True)
    cache.write_text("".join(lines[:-1]) + lines[-1][:40])  # killed mid-write
    asked = len(stub.requests)
    answers(recipe)
    assert len(stub.requests) == asked + 1
    assert [json.loads(x)["key"] for x in cache.read_text().splitlines()]  # every line parses
    cache.write_text(cache.read_text().replace('"key"', '"kee"', 1))
    with pytest.raises(LLMError, match=r"lengthen.r.jsonl, line 1: not a call record"):
        answers(recipe)


def test_killed_build_loses_no_finished_call(tmp_path, stub):
    qa_rows(tmp_path, 30)
    stub.behave = lambda p, k: "LONG " + p
    stub.delay = 0.15
    recipe = lengthen_recipe(tmp_path, stub, table="concurrency = 1")
    cache = tmp_path / "cache" / "lengthen.r.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "mmrecipe", "build", str(recipe), "-o", str(tmp_path / "out"), "-q"])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not cache.exists() or cache.read_text().count("\n") < 5):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = [json.loads(line) for line in cache.read_text().splitlines()]
    assert 5 <= len(done) < 25
    assert not (tmp_path / "out").exists()
    asked_before = len(stub.requests)
    result = build(recipe, tmp_path / "out", progress=False)
    # Only what had not finished is asked again (a call in flight at the kill is asked twice).
    assert result.llm["lengthen.r"]["cached"] == len(done)
    assert len(stub.requests) - asked_before == 30 - len(done)
    assert set(stub.prompts()) == {f"Q: What is item {i}?\nA: thing {i % 5}" for i in range(30)}
    # The second build removed what the killed one left beside the release.
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_interrupt_stops_the_retries_and_keeps_finished_calls(tmp_path, stub):
    qa_rows(tmp_path, 30)
    # Rows 0-9 answer; the others fail with 500s and would be retried for minutes
    # (backoff 4 s, doubling, five retries: over a minute in all).
    stub.behave = lambda p, k: "LONG " + p if any(f"item {i}?" in p for i in range(10)) else "500"
    recipe = lengthen_recipe(tmp_path, stub, table="retries = 5\nbackoff = 4\nconcurrency = 2")
    # Ctrl-C's default handler, whatever the test runner's own disposition of SIGINT is.
    command = "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); from mmrecipe.cli import main; sys.exit(main())"
    proc = subprocess.Popen([sys.executable, "-c", command, "build", str(recipe), "-o", str(tmp_path / "out"), "-q"],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and sum(n > 1 for n in list(stub.attempts.values())) < 1:
        time.sleep(0.02)  # until some call is waiting to retry
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)  # far less than one backoff schedule
    assert proc.returncode == 130 and "interrupted; no release was written" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    kept = [json.loads(line) for line in (tmp_path / "cache" / "lengthen.r.jsonl").read_text().splitlines()]
    assert kept and all(r["response"].startswith("LONG") for r in kept)  # finished calls, no failure recorded


def test_shipped_llm_demo_builds_offline_from_its_caches(tmp_path):
    from conftest import RECIPES

    result = build(RECIPES / "demo-llm.toml", tmp_path / "demo-llm", progress=False, offline=True, threads=1)
    build(RECIPES / "demo-llm.toml", tmp_path / "demo-llm-2", progress=False, offline=True, threads=2)
    assert same_release(tmp_path / "demo-llm", tmp_path / "demo-llm-2")  # any thread count
    assert {t: c["called"] for t, c in result.llm.items()} == {"lengthen.rephrase": 0, "generate.conversations": 0}
    notes = {s["name"]: s["notes"] for s in result.summary["sources"]}
    assert notes["vqa"][0].startswith("lengthen.rephrase: 149 of 149 answers lengthened")
    assert notes["conversations"][0].startswith("generate.conversations: ")
    roles = {i.role for i in result.manifest.inputs}
    assert {"cache:lengthen.rephrase", "cache:generate.conversations", "seeds:generate.conversations"} <= roles


def test_builds_sharing_a_cache_keep_each_others_lines(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from mmrecipe.llm.cache import CallCache, Record

    path = tmp_path / "shared.jsonl"
    a, b = CallCache(path), CallCache(path)  # both read the file before either writes

    def record(key: str) -> Record:
        return Record(key=key, table="t", model="m", prompt="p " * 50, response="r " * 200)

    a.append(record("a0"))
    b.append(record("b0"))
    with open(path, "ab") as f:
        f.write(b'{"key": "torn", "tab')  # a third build, killed mid-write
    a.append(record("a1"))
    with ThreadPoolExecutor(4) as pool:  # two open files, two threads each
        list(pool.map(lambda k: (a if k % 2 else b).append(record(f"x{k}")), range(200)))
    a.close()
    b.close()
    keys = [json.loads(line)["key"] for line in path.read_text().splitlines()]
    assert keys[:3] == ["a0", "b0", "a1"] and sorted(keys[3:]) == sorted(f"x{k}" for k in range(200))
    assert set(CallCache(path).frame["key"]) == set(keys)
