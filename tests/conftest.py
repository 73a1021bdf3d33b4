from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Never the user's token store: builds during collection and in session fixtures use a
# folder of this run, and every test gets an empty one of its own (`isolated_token_store`),
# so no test sees what another stored (CLI subprocesses inherit the variable).
os.environ["MMRECIPE_CACHE"] = tempfile.mkdtemp(prefix="mmrecipe-test-store-")
atexit.register(shutil.rmtree, os.environ["MMRECIPE_CACHE"], True)

# CI: derandomized and bounded, so a run is reproducible and its length predictable.
settings.register_profile("ci", derandomize=True, max_examples=100, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=50, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
MODEL = RECIPES / "models" / "smollm2"
DEMO = RECIPES / "demo.toml"


def small_recipe(source: str, model: str = "", output: str = "") -> str:
    """A recipe on the bundled tokenizer with one [[source]] (TOML body given), plus
    optional extra [model] lines and an [output] table."""
    text = f'[recipe]\nname = "t"\n[model]\ntokenizer = "{MODEL}"\n{model}\n'
    if output:
        text += f"[output]\n{output}\n"
    return text + f"[[source]]\n{source}\n"


def sources_moved(shipped: Path, folder: str, samples: int = 40) -> str:
    """TOML for a recipe extending `shipped` (its `extends` line left to the caller) with
    every source's data/ paths moved under `folder`, and `samples` in the mixture."""
    import tomli_w

    from mmrecipe import load_recipe

    def moved(value):
        return f"{folder}/{value}" if isinstance(value, str) and value.startswith("data/") else value

    sources = []
    for s in load_recipe(shipped).source:
        entry = {"name": s.name, "path": moved(s.path)}
        if s.image_root:
            entry["image_root"] = moved(s.image_root)
        if s.audio_root:
            entry["audio_root"] = moved(s.audio_root)
        if s.video_root:
            entry["video_root"] = moved(s.video_root)
        if s.join is not None and s.join.path:
            entry["join"] = {"path": moved(s.join.path)}
        sources.append(entry)
    return tomli_w.dumps({"mixture": {"total": {"samples": samples}}, "source": sources})


@pytest.fixture(autouse=True)
def isolated_token_store(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty token store folder for this test (MMRECIPE_CACHE)."""
    folder = tmp_path_factory.mktemp("token-store")
    monkeypatch.setenv("MMRECIPE_CACHE", str(folder))
    return folder


@pytest.fixture(scope="session")
def demo_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mmrecipe import build

    out = tmp_path_factory.mktemp("release") / "demo"
    build(DEMO, out, progress=False)
    return out


@pytest.fixture(scope="session")
def hf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(MODEL))
