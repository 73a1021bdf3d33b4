"""The tokenizer engines: the fast byte-level BPE engine and HF tokenizers give the same
releases; `[model] tokenizer_engine` and `--tokenizer-engine` choose one, the manifest
records it (outside the release id) and `recipe check` says which and why; a fast engine
that disagrees with HF on a shadow-checked sample stops the build."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import msgspec
import pytest
from conftest import DEMO, MODEL, ROOT
from test_release_ids import PINNED, lay_out

from mmrecipe import RecipeError, TokenizerError, _core, build
from mmrecipe.cli import main
from mmrecipe.release.verify import verify


def built(recipes: Path, name: str, out: Path, engine: str):
    recipe = recipes / (f"{name}.toml" if name.startswith("demo") else f"{name}-fixtures.toml")
    return build(recipe, out, progress=False, offline=True, tokenizer_engine=engine)


def shard_bytes(release: Path) -> dict[str, bytes]:
    files = sorted(p for p in release.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert files
    return {str(p.relative_to(release)): p.read_bytes() for p in files}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_both_engines_build_the_pinned_release(name, tmp_path):
    recipes = lay_out(tmp_path / "a")
    results = {e: built(recipes, name, tmp_path / e, e) for e in ("hf", "fast")}
    for engine, result in results.items():
        assert result.manifest.release_id == PINNED[name], engine
        assert result.manifest.tokenizer_engine["engine"] == engine
        assert verify(result.path).ok, engine
    # Shards and stats byte for byte; the manifests differ only in the engine they record.
    assert shard_bytes(results["hf"].path) == shard_bytes(results["fast"].path)
    hf, fast = (json.loads((r.path / "manifest.json").read_bytes()) for r in results.values())
    assert hf.pop("tokenizer_engine") != fast.pop("tokenizer_engine")
    assert hf == fast


def recipe_with(tmp_path: Path, model_lines: str, tokenizer: Path = MODEL, name: str = "recipe.toml") -> Path:
    """The demo recipe on 40 samples with extra `[model]` lines (and another tokenizer)."""
    text = DEMO.read_text("utf-8").replace('tokenizer = "models/smollm2"', f"tokenizer = {json.dumps(str(tokenizer))}\n{model_lines}")
    text = text.replace("total = { samples = 400 }", "total = { samples = 40 }")
    text = text.replace('"demo/data', f'"{ROOT / "recipes" / "demo" / "data"}')
    path = tmp_path / name
    path.write_text(text, "utf-8")
    return path


def test_the_recipe_key_and_the_cli_switch_choose_the_engine(tmp_path, capsys):
    hf_recipe = recipe_with(tmp_path, 'tokenizer_engine = "hf"')
    by_key = build(hf_recipe, tmp_path / "a", progress=False).manifest
    assert by_key.tokenizer_engine["engine"] == "hf"
    assert main(["build", str(hf_recipe), "-o", str(tmp_path / "b"), "-q", "--tokenizer-engine", "fast"]) == 0
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["tokenizer_engine"]["engine"] == "fast"
    assert manifest["release_id"] == by_key.release_id  # the switch does not change the release
    assert "tokenizer_engine" not in manifest["recipe"]["model"]  # not part of what the release is
    default = build(recipe_with(tmp_path, "", name="default.toml"), tmp_path / "d", progress=False)
    assert default.manifest.tokenizer_engine["engine"] == "fast"
    assert "auto" in default.manifest.tokenizer_engine["reason"]


def test_check_prints_the_engine_and_why(tmp_path, capsys):
    assert main(["check", str(DEMO), "--images", "none"]) == 0
    out = capsys.readouterr().out
    assert "tokenizer engine: fast (byte-level BPE, GPT-2 (digits isolated) split" in out
    assert main(["check", str(recipe_with(tmp_path, 'tokenizer_engine = "hf"')), "--images", "none"]) == 0
    assert 'tokenizer engine: hf (requested (tokenizer_engine = "hf"))' in capsys.readouterr().out


def test_bad_values_are_clear_errors(tmp_path, capsys):
    with pytest.raises(RecipeError, match="model.tokenizer_engine"):
        build(recipe_with(tmp_path, 'tokenizer_engine = "turbo"'), tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="tokenizer_engine: 'turbo' is not one of 'auto', 'hf', 'fast'"):
        build(DEMO, tmp_path / "b", progress=False, tokenizer_engine="turbo")
    with pytest.raises(SystemExit):
        main(["build", str(DEMO), "-o", str(tmp_path / "c"), "--tokenizer-engine", "turbo"])
    assert "invalid choice: 'turbo'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="'turbo'"):
        _core.tokenizer_engine(str(MODEL / "tokenizer.json"), "turbo")


def lowercase_model(folder: Path) -> Path:
    """The bundled tokenizer with a Lowercase normalizer: a shape the fast engine refuses."""
    shutil.copytree(MODEL, folder)
    tok = json.loads((folder / "tokenizer.json").read_text("utf-8"))
    tok["normalizer"] = {"type": "Lowercase"}
    (folder / "tokenizer.json").write_text(json.dumps(tok), "utf-8")
    return folder


def test_forcing_fast_on_a_tokenizer_it_cannot_serve_is_a_clear_error(tmp_path):
    model = lowercase_model(tmp_path / "model")
    engine, why = _core.tokenizer_engine(str(model / "tokenizer.json"), "auto")
    assert engine == "hf" and "Lowercase" in why
    with pytest.raises(RecipeError, match=r"model.tokenizer_engine: \"fast\" cannot encode this tokenizer exactly: the normalizer is Lowercase"):
        _core.tokenizer_engine(str(model / "tokenizer.json"), "fast")
    with pytest.raises(RecipeError, match="model.tokenizer_engine.*Lowercase"):
        build(recipe_with(tmp_path, 'tokenizer_engine = "fast"', model), tmp_path / "a", progress=False)
    auto = build(recipe_with(tmp_path, "", model), tmp_path / "b", progress=False)
    assert auto.manifest.tokenizer_engine == {"engine": "hf", "reason": why}


def chat_recipe(tmp_path: Path, rows: int, on_error: str) -> Path:
    data = tmp_path / "chat.jsonl"
    with data.open("w", encoding="utf-8") as f:
        for i in range(rows):
            msgs = [{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"},
                    {"role": "assistant", "content": f"It is {2 * i}."}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    recipe = {
        "recipe": {"name": "shadow", "seed": 1},
        "model": {"tokenizer": str(MODEL)},
        "output": {"seq_len": 512},
        "source": [{"name": "chat", "path": str(data), "layout": "conversation", "on_error": on_error}],
    }
    import tomli_w

    path = tmp_path / "shadow.toml"
    path.write_bytes(tomli_w.dumps(recipe).encode())
    return path


def test_a_shadow_mismatch_stops_the_build_with_the_texts_ids_and_switch(tmp_path, monkeypatch):
    """MMRECIPE_TEST_FAST_ENGINE_FAULT makes the fast engine wrong (a test hook): about 1 in
    1,000 samples is re-encoded by HF, so 3,000 rows meet the check; `skip` does not hide it."""
    recipe = chat_recipe(tmp_path, 3000, on_error="skip")
    assert build(recipe, tmp_path / "exact", progress=False).summary["segments"] == 3000  # an exact engine passes
    monkeypatch.setenv("MMRECIPE_TEST_FAST_ENGINE_FAULT", "1")
    with pytest.raises(TokenizerError) as err:
        build(recipe, tmp_path / "faulty", progress=False, cache=False)  # tokenized, not from the store
    message = str(err.value)
    for want in ("source 'chat', row ", "shadow check", "Question ", "fast ids: [", "hf ids:", 'tokenizer_engine = "hf"', "--tokenizer-engine hf"):
        assert want in message, message
    assert not (tmp_path / "faulty").exists()
    # Forcing HF, as the message says, builds the same release as the exact engine did.
    forced = build(recipe, tmp_path / "forced", progress=False, tokenizer_engine="hf")
    exact = msgspec.json.decode((tmp_path / "exact" / "manifest.json").read_bytes())
    assert forced.manifest.release_id == exact["release_id"]
