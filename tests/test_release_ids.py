"""The shipped recipes' releases are pinned: the same recipe and inputs give these release
ids, from any install location and any recipe-folder location (an id follows content,
never the paths of this machine). A change that moves an id on purpose updates it here
and says why in its commit."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import ROOT, sources_moved

from mmrecipe import build

PINNED = {
    "demo": "229bafa820fb110fae46db530e87ea52d1b03b31e8ce684e5001460ac1528296",
    "demo-llm": "b10c1bc1d639ffe8bbbfb0c6d11d71253246272159dba905faf2626ed296878b",
    "demo-epochs": "12952dc05122a4f45284786bc07e118f75fe9bae68ee1d8a301a9bbda20c6b06",
    "demo-pool": "cb1645cd9dde9152bcb613686e723c9c21af7b98edfd0912d23d8cc7bd818fcb",
    "alignment": "c6e019396a321fe0f6720861b0322c202e9ebd81a4a97930da2459bfaec1c7fb",
    "alignment-parquet": "ad4c8e1c4afea22843dc82aeb4e8fd3d724a73ddd51f7045a6a9ee5092aaf6cc",
    "llava-1.5-mix": "77484a765103937d44a0026288800e73154d15c9e3ea951926ac80d9dac164e3",
    "instructblip": "15e38f13b03489491286945004ec87c4c55f82ea4e7413a4a28cf139f685e099",
    "asr-alignment": "6d7b0b3ac40e29197675074e2c1cb23c304629e14f7dd816c3b8827833a390a7",
    "video-instruct": "3ef4a062623f09f3500b1759eb54b65b15d6ca02972bb77020abf59053cb1552",
}


def lay_out(folder: Path) -> Path:
    """recipes/ and the fixtures copied side by side under `folder`; the shipped recipes
    on the fixtures as `NAME-fixtures.toml`, with paths relative to the recipes."""
    shutil.copytree(ROOT / "recipes", folder / "recipes")
    shutil.copytree(ROOT / "tests" / "fixtures", folder / "fixtures")
    for stem in ("alignment", "alignment-parquet", "llava-1.5-mix", "instructblip", "asr-alignment", "video-instruct"):
        body = sources_moved(folder / "recipes" / f"{stem}.toml", "../fixtures", 40)
        (folder / "recipes" / f"{stem}-fixtures.toml").write_text(f'extends = "{stem}.toml"\n' + body)
    return folder / "recipes"


def release_id(recipes: Path, name: str, out: Path) -> str:
    recipe = recipes / (f"{name}.toml" if name.startswith("demo") else f"{name}-fixtures.toml")
    return build(recipe, out / name, progress=False, offline=True).manifest.release_id


@pytest.mark.parametrize("name", sorted(PINNED))
def test_shipped_release_ids_are_pinned(name, tmp_path):
    assert release_id(lay_out(tmp_path / "a"), name, tmp_path / "out") == PINNED[name]


def test_the_id_does_not_follow_the_recipe_folder(tmp_path):
    first = release_id(lay_out(tmp_path / "a"), "demo", tmp_path / "out-a")
    second = release_id(lay_out(tmp_path / "deeper" / "b"), "demo", tmp_path / "out-b")
    assert first == second == PINNED["demo"]


def test_the_id_does_not_follow_the_install_location(tmp_path):
    """The package copied to two places (built-in pools included) builds one release id."""
    import os
    import subprocess
    import sys

    import mmrecipe

    recipes = lay_out(tmp_path / "work")
    ids = []
    for place in ("one", "two/deeper"):
        site = tmp_path / place
        shutil.copytree(Path(mmrecipe.__file__).parent, site / "mmrecipe", ignore=shutil.ignore_patterns("__pycache__"))
        code = ("import sys, mmrecipe; assert mmrecipe.__file__.startswith(sys.argv[1]), mmrecipe.__file__; "
                "print(mmrecipe.build(sys.argv[2], sys.argv[3], progress=False).manifest.release_id)")
        run = subprocess.run([sys.executable, "-c", code, str(site), str(recipes / "demo.toml"), str(tmp_path / place / "out")],
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(site)})
        assert run.returncode == 0, run.stderr[-2000:]
        ids.append(run.stdout.strip())
    assert ids[0] == ids[1] == PINNED["demo"]
