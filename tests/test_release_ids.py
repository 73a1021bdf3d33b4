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
    "demo": "a9c00f2bf3b2b7f8853d91070e94ca6bf569b2d6e02be3ad157298f5beab7aca",
    "demo-llm": "6c80aec5adc3302cc3d932cbfc765994066eee18e8f34e8a3b07e345b5a81cd4",
    "alignment": "0e1d7de26daf1d343de0681653aa919f1493952f721c86c7d1c68d5a8ba7c6c8",
    "llava-1.5-mix": "266a5e338eddbff44601573cf3c366776b4072e5fb3ce38bfdaef478fba8e3ac",
    "instructblip": "e40e566d5a173c67f61998202d6a0921f5339eed25d73bf4b5425916842d8859",
}


def lay_out(folder: Path) -> Path:
    """recipes/ and the fixtures copied side by side under `folder`; the shipped recipes
    on the fixtures as `NAME-fixtures.toml`, with paths relative to the recipes."""
    shutil.copytree(ROOT / "recipes", folder / "recipes")
    shutil.copytree(ROOT / "tests" / "fixtures", folder / "fixtures")
    for stem in ("alignment", "llava-1.5-mix", "instructblip"):
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
