"""`--engine ray` on a real two-node Ray cluster on loopback (two `ray start` processes):
the release is the one the local engine builds, byte for byte, also when a worker dies
mid-task and Ray runs the task again; and a driver that fails after the cluster's work
leaves nothing beside OUT. Skipped without Ray (`pip install "mmrecipe[ray]"`)."""

from __future__ import annotations

import os
from contextlib import closing
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DEMO, sources_moved
from test_release_ids import PINNED, lay_out

from mmrecipe.errors import MMRecipeError

ray = pytest.importorskip("ray")

from mmrecipe import build  # noqa: E402
from mmrecipe import builder as builder_module  # noqa: E402
from mmrecipe.engines.ray import HANG_ENV, KILL_ONCE_ENV, RayEngineError  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(log: Path, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if "Ray runtime started" in log.read_text("utf-8", "replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    pytest.fail(f"{what} did not start:\n{log.read_text('utf-8', 'replace')[-3000:]}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """A head node and a second node, 1 CPU each, as separate `ray start --block`
    processes (ended by their ids at teardown, which stops what each started). Yields
    the address and the folders that arm the worker-kill and the hanging-task hooks while
    they exist."""
    folder = tmp_path_factory.mktemp("ray")
    port = _free_port()
    kill, hang = folder / "kill-once", folder / "hang"
    # Loopback only: no token authentication between the test's own processes.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", KILL_ONCE_ENV: str(kill), HANG_ENV: str(hang),
           "RAY_USAGE_STATS_ENABLED": "0"}
    ray_cli = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--num-cpus", "1", "--disable-usage-stats"]
    temp = Path("/tmp") / f"mmr-ray-{os.getpid()}"  # Ray's socket paths must stay short
    procs = []
    try:
        head_log = folder / "head.log"
        head = subprocess.Popen([*ray_cli, "--head", "--port", str(port), "--include-dashboard=false", "--temp-dir", str(temp)],
                                stdout=head_log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
        procs.append(head)
        _wait_for(head_log, head, "the head node")
        node_log = folder / "node.log"
        node = subprocess.Popen([*ray_cli, "--address", f"127.0.0.1:{port}"],
                                stdout=node_log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
        procs.append(node)
        _wait_for(node_log, node, "the second node")
        old = os.environ.get("RAY_AUTH_MODE")
        os.environ["RAY_AUTH_MODE"] = "disabled"
        address = f"127.0.0.1:{port}"
        ray.init(address=address, log_to_driver=False)
        try:
            end = time.monotonic() + 60
            while ray.cluster_resources().get("CPU", 0) < 2 and time.monotonic() < end:
                time.sleep(0.5)
            assert ray.cluster_resources().get("CPU", 0) == 2, "both nodes joined"
        finally:
            ray.shutdown()
        yield address, kill, hang
        if old is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = old
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
        import shutil

        shutil.rmtree(temp, ignore_errors=True)


def files(release: Path) -> dict[str, bytes]:
    return {str(p.relative_to(release)): p.read_bytes() for p in sorted(release.rglob("*")) if p.is_file()}


def both(recipe: Path, out: Path, address: str, **kw) -> tuple[object, object]:
    local = build(recipe, out / "local", progress=False, offline=True, cache=False, **kw)
    remote = build(recipe, out / "ray", progress=False, offline=True, cache=False, engine="ray", ray_address=address, **kw)
    return local, remote


def test_the_demo_is_the_same_release_on_the_cluster(cluster, tmp_path):
    local, remote = both(DEMO, tmp_path, cluster[0])
    assert remote.manifest.release_id == local.manifest.release_id == PINNED["demo"]
    assert files(tmp_path / "ray") == files(tmp_path / "local")
    assert sorted(remote.store["tokenized"]) == sorted(s["name"] for s in remote.summary["sources"])
    assert "connect" in remote.timings and "connect" not in local.timings


def test_every_node_is_checked_to_see_the_staging_folder(cluster, tmp_path):
    from mmrecipe.engines.ray import Cluster

    folder = tmp_path / "staging"
    folder.mkdir()
    with closing(Cluster(cluster[0], progress=False)) as c:
        assert c.check_shared(folder) == 2  # both nodes read the probe
    assert list(folder.iterdir()) == []  # and it is gone


@pytest.mark.parametrize("probe, detail", [
    (lambda folder, name, token: None, "cannot read .*probe-.*No such file"),
    (lambda folder, name, token: (folder / name).write_text("another"), "holds another build's probe"),
])
def test_a_node_that_cannot_see_the_staging_folder_is_named(cluster, tmp_path, monkeypatch, probe, detail):
    """The nodes here share the disk, so what a node elsewhere would find is staged: no
    probe file, or another folder's under the same path."""
    from mmrecipe.engines import ray as engine

    monkeypatch.setattr(engine, "write_probe", probe)
    with pytest.raises(RayEngineError, match=rf"staging folder .* must be on storage every node shares, and 2 of 2 node\(s\) "
                                             rf"cannot see it \(node \S+ \(.*, id [0-9a-f]{{12}}\): .*{detail}.*--ray-staging DIR"):
        build(DEMO, tmp_path / "out", progress=False, cache=False, engine="ray", ray_address=cluster[0])
    assert list(tmp_path.iterdir()) == []  # no release, nothing beside it


def test_a_multi_epoch_release_is_the_same_on_the_cluster(cluster, tmp_path):
    """The templated sources are tokenized again for each later epoch, on the cluster."""
    local, remote = both(DEMO.parent / "demo-epochs.toml", tmp_path, cluster[0])
    assert remote.manifest.release_id == local.manifest.release_id == PINNED["demo-epochs"]
    assert files(tmp_path / "ray") == files(tmp_path / "local")
    assert "vqa (epoch 2)" in remote.store["tokenized"] and remote.manifest.epoch_count == 3


@pytest.mark.parametrize("name", ["llava-1.5-mix", "demo-llm", "asr-alignment", "video-instruct"])
def test_shipped_recipes_are_the_same_release_on_the_cluster(cluster, tmp_path, name):
    """llava-1.5-mix on its fixtures (images, ten sources); demo-llm, whose one source
    has an LLM stage and is therefore tokenized on the driver; asr-alignment and
    video-instruct, whose sources' clips are read on the cluster."""
    recipes = lay_out(tmp_path / "work")
    recipe = recipes / (f"{name}.toml" if name.startswith("demo") else f"{name}-fixtures.toml")
    local, remote = both(recipe, tmp_path / "out", cluster[0])
    assert remote.manifest.release_id == local.manifest.release_id == PINNED[name]
    assert files(tmp_path / "out" / "ray") == files(tmp_path / "out" / "local")
    if name in ("asr-alignment", "video-instruct"):
        assert sorted(remote.tasks) == sorted(s["name"] for s in local.summary["sources"])


def test_a_killed_worker_is_retried_and_the_release_is_the_same(cluster, tmp_path):
    address, kill, _ = cluster
    kill.mkdir()  # armed: every task kills its worker on its first run
    try:
        remote = build(DEMO, tmp_path / "ray", progress=False, cache=False, engine="ray", ray_address=address)
    finally:
        killed = sorted(p.name for p in kill.iterdir())
        for p in kill.iterdir():
            p.unlink()
        kill.rmdir()
    shards = [k for k in killed if k.startswith("shard-")]
    assert len(killed) - len(shards) == 4, "each of the demo's four sources' tasks killed its worker once"
    assert shards == [f"shard-0-{k}" for k in range(len(remote.manifest.shards))] and shards, "and each shard's task"
    local = build(DEMO, tmp_path / "local", progress=False, cache=False)
    assert remote.manifest.release_id == local.manifest.release_id
    assert files(tmp_path / "ray") == files(tmp_path / "local")


def test_the_cluster_fills_the_token_store_for_a_local_rebuild(cluster, tmp_path, isolated_token_store):
    first = build(DEMO, tmp_path / "ray", progress=False, engine="ray", ray_address=cluster[0])
    assert first.store["saved_bytes"] > 0 and first.store["reused"] == []
    again = build(DEMO, tmp_path / "local", progress=False)
    assert sorted(again.store["reused"]) == sorted(first.store["tokenized"]) and again.store["tokenized"] == []
    assert files(tmp_path / "ray") == files(tmp_path / "local")
    # And the cluster gets no task for what the store holds.
    third = build(DEMO, tmp_path / "ray2", progress=False, engine="ray", ray_address=cluster[0])
    assert third.store["tokenized"] == [] and third.manifest.release_id == first.manifest.release_id


@pytest.mark.parametrize("where, error, text", [
    ("shard_ranges", RuntimeError, "interrupted"),  # the driver, planning the shards after every entry is loaded
    ("write_planned_shard", RayEngineError, r"(?s)shard data/part-00000\.parquet: its task failed on the cluster .*interrupted"),
])
def test_a_driver_failing_after_the_tasks_leaves_nothing(cluster, tmp_path, monkeypatch, where, error, text):
    def fail(*a, **k):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(builder_module, where, fail)
    staging = tmp_path / "staging"
    staging.mkdir()
    parent = tmp_path / "rel"
    with pytest.raises(error, match=text):
        build(DEMO, parent / "demo", progress=False, cache=False, engine="ray", ray_address=cluster[0])
    with pytest.raises(error, match=text):
        build(DEMO, parent / "demo", progress=False, cache=False, engine="ray", ray_address=cluster[0], ray_staging=staging)
    assert list(parent.iterdir()) == []
    assert list(staging.iterdir()) == []


def test_a_task_error_is_the_sources_own(cluster, tmp_path):
    """A source that fails on a worker fails the build as it would locally."""
    from mmrecipe.errors import MMRecipeError

    from conftest import small_recipe

    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "q"}\n')
    recipe = tmp_path / "r.toml"
    recipe.write_text(small_recipe(f'name = "s"\npath = "{data}"\nlayout = "vqa"'))
    with pytest.raises(MMRecipeError) as local:
        build(recipe, tmp_path / "local", progress=False, cache=False)
    with pytest.raises(MMRecipeError) as remote:
        build(recipe, tmp_path / "ray", progress=False, cache=False, engine="ray", ray_address=cluster[0])
    assert str(local.value) in str(remote.value)
    assert not (tmp_path / "ray").exists()


def test_the_command_line(cluster, tmp_path):
    """`recipe build --engine ray --address ADDR --ray-unit-bytes 4K`: the pinned release,
    a bar of the tasks done on the cluster with its CPUs, and the time of each stage."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    run = subprocess.run([sys.executable, "-m", "mmrecipe", "build", str(DEMO), "-o", str(tmp_path / "demo"), "--no-cache",
                          "--engine", "ray", "--address", cluster[0], "--ray-unit-bytes", "4K", "--ray-task-timeout", "600"],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"(release {PINNED['demo'][:12]})" in run.stdout
    assert "2 CPUs in the cluster" in run.stderr
    times = next(line for line in run.stdout.splitlines() if line.startswith("time "))
    assert all(f"{stage} " in times for stage in ("read", "connect", "tokenize", "pack", "write"))


def _generated_mix(folder: Path, samples: int) -> Path:
    """A text-only mix of `samples` rows in four JSON Lines sources (VQA-style questions
    with a pool, captions, two-turn chats, alpaca records), mixed to a fixed total."""
    import json

    folder.mkdir()
    quarter = samples // 4
    writers = {
        "qa": lambda i: {"question": f"What is {i} plus {i % 97}?", "answer": str(i + i % 97)},
        "caption": lambda i: {"caption": f"A picture of {i % 13} cats and {i % 7} dogs on a {('red', 'blue', 'green')[i % 3]} sofa."},
        "chat": lambda i: {"messages": [{"role": "user", "content": f"Tell me about number {i}."},
                                        {"role": "assistant", "content": f"{i} is {'even' if i % 2 == 0 else 'odd'}, "
                                                                         f"and its square is {i * i}."}]},
        "alpaca": lambda i: {"instruction": f"Spell {i} backwards.", "input": "", "output": str(i)[::-1]},
    }
    for name, row in writers.items():
        with (folder / f"{name}.jsonl").open("w") as f:
            for i in range(quarter):
                f.write(json.dumps(row(i)) + "\n")
    (folder / "mix.toml").write_text(f"""
[recipe]
name = "generated-mix"
seed = 7
[model]
tokenizer = "{DEMO.parent / 'models' / 'smollm2'}"
[output]
seq_len = 1024
shard_sequences = 250
[mixture]
total = {{ samples = {samples * 9 // 10} }}
[[source]]
name = "qa"
path = "qa.jsonl"
layout = "qa"
fields = {{ question = "question", answer = "answer" }}
instructions = "vqa-short"
weight = 2
[[source]]
name = "caption"
path = "caption.jsonl"
layout = "caption"
fields = {{ caption = "caption" }}
instructions = "caption-brief"
[[source]]
name = "chat"
path = "chat.jsonl"
layout = "conversation"
[[source]]
name = "alpaca"
path = "alpaca.jsonl"
layout = "alpaca"
""")
    return folder / "mix.toml"


#: The generated mix's size; MMRECIPE_RAY_SAMPLES sets another (CI runs the full 50k: ~1 min).
SAMPLES = int(os.environ.get("MMRECIPE_RAY_SAMPLES", "50000"))


def test_a_generated_50k_mix_is_the_same_release_on_the_cluster(cluster, tmp_path):
    recipe = _generated_mix(tmp_path / "mix", SAMPLES)
    local, remote = both(recipe, tmp_path / "out", cluster[0])
    assert remote.manifest.release_id == local.manifest.release_id
    assert files(tmp_path / "out" / "ray") == files(tmp_path / "out" / "local")
    assert remote.summary["segments"] == SAMPLES * 9 // 10
    # More shards than are planned ahead at once (SHARDS_IN_FLIGHT per CPU of the cluster's 2).
    assert len(remote.manifest.shards) > 8 or SAMPLES < 50000
    assert sorted(remote.store["tokenized"]) == ["alpaca", "caption", "chat", "qa"]  # all four on the cluster


def _one_big_source(folder: Path, rows: int, on_error: str = "fail", bad: tuple[int, ...] = (),
                    no_image: tuple[int, ...] = ()) -> Path:
    """A recipe of one JSON Lines source of `rows` question-answer rows on an image in two
    files (an instruction template drawn per row: the release follows each row's number),
    rows `bad` without an answer, rows `no_image` naming an image that is not there, and a
    small second source."""
    import json

    folder.mkdir()
    half = rows // 2
    for name, numbers in (("a", range(half)), ("b", range(half, rows))):
        with (folder / f"big-{name}.jsonl").open("w") as f:
            for i in numbers:
                row = {"question": f"What is {i} times {i % 7}?", "answer": str(i * (i % 7)),
                       "image": f"missing-{i}.jpg" if i in no_image else "astronaut.jpg"}
                if i in bad:
                    del row["answer"]
                f.write(json.dumps(row) + ("\n\n" if i % 11 == 0 else "\n"))
    (folder / "small.jsonl").write_text("".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(20)))
    (folder / "mix.toml").write_text(f"""
[recipe]
name = "units"
seed = 5
[model]
tokenizer = "{DEMO.parent / 'models' / 'smollm2'}"
image = {{ placeholder = "<image>", token = "<image>", count = 8 }}
[output]
seq_len = 256
[[source]]
name = "big"
path = "big-*.jsonl"
layout = "qa"
fields = {{ image = "image", question = "question", answer = "answer" }}
image_root = "{DEMO.parent / 'demo' / 'data' / 'images'}"
instructions = "vqa-short"
on_error = "{on_error}"
[[source]]
name = "small"
path = "small.jsonl"
layout = "qa"
fields = {{ question = "question", answer = "answer" }}
""")
    return folder / "mix.toml"


@pytest.fixture
def small_slices(monkeypatch):
    """Slices of 40 records (8192 in a build), so that small data makes many units."""
    monkeypatch.setattr(builder_module, "BATCH_ROWS", 40)


def test_a_source_cut_into_work_units_is_the_same_release(cluster, tmp_path, small_slices, isolated_token_store):
    """A source over its task budget becomes several tasks, each within it; two budgets
    give the local build's bytes, skipped rows and their first examples (rows of later
    units, numbered in the whole source); the token store gets the source whole."""
    bad, no_image = tuple(range(430, 800, 23)), tuple(range(510, 800, 19))
    recipe = _one_big_source(tmp_path / "mix", 800, "skip", bad, no_image)
    local = build(recipe, tmp_path / "local", progress=False, cache=False)
    size = sum(p.stat().st_size for p in (tmp_path / "mix").glob("big-*.jsonl"))
    counts = []
    for budget, cache in ((size // 9, False), (size // 3, None)):  # the second fills the store
        out = tmp_path / f"ray-{budget}"
        remote = build(recipe, out, progress=False, engine="ray", ray_address=cluster[0], ray_unit_bytes=budget, cache=cache)
        assert files(out) == files(tmp_path / "local")
        assert remote.manifest.release_id == local.manifest.release_id
        tasks = remote.tasks["big"]
        assert len(tasks) >= 3 and all(t["bytes"] <= budget for t in tasks), tasks
        assert sum(t["rows"] for t in tasks) == 800
        assert remote.tasks["small"] == [{"rows": 20, "bytes": remote.tasks["small"][0]["bytes"]}]  # one task
        counts.append(len(tasks))
    assert counts[0] > counts[1]
    stats = local.summary["sources"][0]
    assert stats["skipped"] == len(set(no_image) - set(bad)) > 5
    assert [e.split(",")[0] for e in stats["skipped_examples"]] == [f"row {r}" for r in sorted(set(no_image) - set(bad))[:5]]
    assert "first: row 430" in " ".join(stats["notes"])
    # The second build saved the source whole: a local build loads it.
    again = build(recipe, tmp_path / "again", progress=False)
    assert "big" in again.store["reused"] and files(tmp_path / "again") == files(tmp_path / "local")


@pytest.mark.parametrize("fault", ["row", "line"])
def test_an_error_in_a_later_unit_is_the_local_builds(cluster, tmp_path, small_slices, fault):
    """A row without its answer (on_error = "fail"), or a line that is not JSON, far into
    the source: the error names the row, or the file's line, as the local build's does."""
    recipe = _one_big_source(tmp_path / "mix", 600, bad=(517,) if fault == "row" else ())
    if fault == "line":
        with (tmp_path / "mix" / "big-b.jsonl").open("a") as f:
            f.write('{"question": [1}\n')
    with pytest.raises(MMRecipeError) as local:
        build(recipe, tmp_path / "local", progress=False, cache=False)
    size = sum(p.stat().st_size for p in (tmp_path / "mix").glob("big-*.jsonl"))
    with pytest.raises(MMRecipeError) as remote:
        build(recipe, tmp_path / "ray", progress=False, cache=False, engine="ray", ray_address=cluster[0],
              ray_unit_bytes=size // 6)
    assert str(remote.value) == str(local.value)
    assert ("517" if fault == "row" else "line ") in str(local.value)
    assert not (tmp_path / "ray").exists()


def test_a_task_that_never_returns_fails_the_build(cluster, tmp_path):
    _, _, hang = cluster
    hang.mkdir()  # armed: every task waits without end
    try:
        with pytest.raises(RayEngineError, match=r"source '\w+'( \(work unit \d+, rows \d+\.\.\))?: no task of the cluster finished in 2 s .*--ray-task-timeout"):
            build(DEMO, tmp_path / "out", progress=False, cache=False, engine="ray", ray_address=cluster[0], ray_task_timeout=2)
    finally:
        hang.rmdir()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("nodes", [lambda: [], "raise"])
def test_a_cluster_that_goes_away_fails_the_build(cluster, tmp_path, monkeypatch, nodes):
    """Staged as Ray would report it while tasks hang: no node alive, or no answer."""
    from mmrecipe.engines import ray as engine

    _, _, hang = cluster
    monkeypatch.setattr(engine, "POLL", 0.2)
    real = ray.nodes
    calls = []

    def gone():
        calls.append(1)
        if len(calls) == 1:
            return real()  # the staging check's look, before any task
        if nodes == "raise":
            raise ConnectionError("GCS unreachable")
        return nodes()

    monkeypatch.setattr(ray, "nodes", gone)
    hang.mkdir()
    try:
        with pytest.raises(RayEngineError, match=r"source '\w+'( \(work unit \d+, rows \d+\.\.\))?: the Ray cluster went away while it ran .*no release"):
            build(DEMO, tmp_path / "out", progress=False, cache=False, engine="ray", ray_address=cluster[0])
    finally:
        hang.rmdir()
    assert list(tmp_path.iterdir()) == []


def test_parquet_and_webdataset_sources_cut_into_work_units_are_the_same_release(cluster, tmp_path, small_slices):
    """A plain parquet source (slices of 40 rows, several row groups, rows skipped far into
    it), alignment-parquet on its fixtures (image bytes, cut at row groups) and
    alignment-webdataset on its two shards, each with a budget that makes several units:
    the local build's release, byte for byte."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmrecipe import load_recipe
    from mmrecipe.recipe import resolve

    folder = tmp_path / "mix"
    folder.mkdir()
    answers = [None if i % 97 == 50 else f"answer {i} " + "x" * (i % 23) for i in range(700)]
    table = pa.table({"question": [f"question {i}?" for i in range(700)], "answer": answers})
    pq.write_table(table, folder / "qa.parquet", row_group_size=64)
    (folder / "mix.toml").write_text(f"""
[recipe]
name = "pq-units"
seed = 3
[model]
tokenizer = "{DEMO.parent / 'models' / 'smollm2'}"
[output]
seq_len = 256
[[source]]
name = "qa"
path = "qa.parquet"
layout = "qa"
fields = {{ question = "question", answer = "answer" }}
instructions = "vqa-short"
on_error = "skip"
""")
    recipes = lay_out(tmp_path / "work")
    wds = recipes / "alignment-webdataset-fixtures.toml"  # two shards: a unit each
    wds.write_text('extends = "alignment-webdataset.toml"\n' + sources_moved(recipes / "alignment-webdataset.toml", "../fixtures"))
    cases = ((folder / "mix.toml", "qa", 3), (recipes / "alignment-parquet-fixtures.toml", "captions", 3), (wds, "captions", 2))
    for recipe, source, least in cases:
        local = build(recipe, tmp_path / "local", progress=False, cache=False, overwrite=True)
        remote = build(recipe, tmp_path / "ray", progress=False, cache=False, overwrite=True, engine="ray",
                       ray_address=cluster[0], ray_unit_bytes=2048)
        assert files(tmp_path / "ray") == files(tmp_path / "local")
        assert len(remote.tasks[source]) >= least, remote.tasks
        plan = resolve(load_recipe(recipe))
        if recipe != wds:
            assert sum(t["rows"] for t in remote.tasks[source]) == sum(pq.read_metadata(f).num_rows for f in plan.sources[0].files)
        if source == "qa":  # rows 50, 147, ... 632 have no answer: a note per slice, naming its row
            stats = local.summary["sources"][0]
            assert stats["rows"] == 693 and len(stats["notes"]) == 7 and "first: row 632" in stats["notes"][-1]
        if source == "captions" and recipe != wds:
            assert remote.manifest.release_id == PINNED["alignment-parquet"]


def test_an_audio_source_cut_into_work_units_is_the_same_release(cluster, tmp_path, small_slices):
    """A JSON Lines audio source of 200 rows in 40-record slices, cut into several units:
    the local build's bytes, clips and skipped rows (a missing clip) included."""
    from conftest import RECIPES, ROOT

    import json

    clips = sorted((ROOT / "tests" / "fixtures" / "data" / "asr" / "clips").iterdir())
    data = tmp_path / "m.jsonl"
    with open(data, "w") as f:
        for k in range(200):
            clip = "missing.wav" if k in (57, 133) else clips[k % len(clips)].name
            f.write(json.dumps({"audio": clip, "text": f"clip number {k}"}) + "\n")
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[recipe]\nname = "a"\n[model]\ntokenizer = "{RECIPES / "models" / "smollm2-audio"}"\n'
                      f'audio = {{ rule = "whisper" }}\n[output]\nseq_len = 2048\n[[source]]\nname = "s"\npath = "{data}"\n'
                      f'layout = "asr"\nfields = {{ audio = "audio", text = "text" }}\naudio_root = "{clips[0].parent}"\n'
                      'instructions = "asr"\non_error = "skip"\n')
    local = build(recipe, tmp_path / "local", progress=False, cache=False)
    assert local.summary["sources"][0]["skipped"] == 2
    remote = build(recipe, tmp_path / "ray", progress=False, cache=False, engine="ray", ray_address=cluster[0],
                   ray_unit_bytes=data.stat().st_size // 4)
    assert len(remote.tasks["s"]) >= 3 and sum(t["rows"] for t in remote.tasks["s"]) == 200
    assert files(tmp_path / "ray") == files(tmp_path / "local")
    assert remote.manifest.release_id == local.manifest.release_id
