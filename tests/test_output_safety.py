"""A build never destroys a user's files: `--overwrite` replaces only a release, `-o` may
not be or hold an input, the default folder name cannot leave `out/`, and two builds into
one folder do not race."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import small_recipe

from mmrecipe import ReleaseError, build
from mmrecipe.release.guard import default_name, lock


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A recipe with one captioned image in images/, its data beside it."""
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
    (tmp_path / "caps.jsonl").write_text('{"image": "a.png", "caption": "a black square"}\n')
    body = 'name = "caps"\npath = "caps.jsonl"\nlayout = "caption"\nimage_root = "images"\nfields = { image = "image", caption = "caption" }'
    (tmp_path / "r.toml").write_text(small_recipe(body, model='image = { placeholder = "<image>", token = "<image>", count = 4 }'))
    return tmp_path


def test_overwrite_never_replaces_an_image_root(project):
    with pytest.raises(ReleaseError, match="is an input"):
        build(project / "r.toml", project / "images", overwrite=True, progress=False)
    assert (project / "images" / "a.png").is_file()


def test_overwrite_never_replaces_a_data_file(project):
    before = (project / "caps.jsonl").read_bytes()
    with pytest.raises(ReleaseError, match="is an input"):
        build(project / "r.toml", project / "caps.jsonl", overwrite=True, progress=False)
    assert (project / "caps.jsonl").read_bytes() == before


def test_a_folder_holding_inputs_is_refused(project):
    with pytest.raises(ReleaseError, match="(is|contains) an input"):
        build(project / "r.toml", project, overwrite=True, progress=False)
    assert sorted(p.name for p in project.iterdir()) == ["caps.jsonl", "images", "r.toml"]


def test_overwrite_replaces_only_a_release(project, tmp_path_factory):
    user = tmp_path_factory.mktemp("user")
    (user / "notes.txt").write_text("mine")
    with pytest.raises(ReleaseError, match="is not a release"):
        build(project / "r.toml", user, overwrite=True, progress=False)
    assert (user / "notes.txt").read_text() == "mine"
    empty = tmp_path_factory.mktemp("empty")
    build(project / "r.toml", empty, overwrite=True, progress=False)  # an empty folder is fine
    build(project / "r.toml", empty, overwrite=True, progress=False)  # and so is a release
    assert (empty / "manifest.json").is_file()


def test_output_below_a_file_is_a_clear_error(project):
    with pytest.raises(ReleaseError, match="is a file"):
        build(project / "r.toml", project / "caps.jsonl" / "out", progress=False)


@pytest.mark.parametrize("name", ["../../esc", "/abs/olute", "..", "a\nb", "x" * 5000, ""])
def test_default_names_stay_inside_out(name, tmp_path):
    folder = tmp_path / "out" / default_name(name, "1.0.0")
    assert folder.parent == tmp_path / "out" and folder.name not in ("", ".", "..")
    assert len(folder.name) <= 100 and "/" not in folder.name and "\n" not in folder.name


def test_cli_without_o_writes_under_out(project):
    text = (project / "r.toml").read_text().replace('name = "t"', 'name = "../../esc"', 1)
    (project / "r.toml").write_text(text)
    run = subprocess.run([sys.executable, "-m", "mmrecipe", "build", "r.toml", "--quiet"], cwd=project, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert [p.name for p in (project / "out").iterdir()] == ["esc-0.0.0"]
    assert not (project.parent / "esc-0.0.0").exists()


def test_a_second_build_into_the_same_folder_fails_naming_the_first(project, tmp_path):
    out = tmp_path / "release"
    with lock(out.resolve()):
        with pytest.raises(ReleaseError, match=r"another build \(pid \d+\)"):
            build(project / "r.toml", out, progress=False)
    build(project / "r.toml", out, progress=False)  # the lock went with its holder
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_two_processes_race_for_one_folder(project, tmp_path):
    """Two real builds at once: one writes the release, the other names it and stops."""
    out = tmp_path / "release"
    code = "import sys, mmrecipe; mmrecipe.build(sys.argv[1], sys.argv[2], progress=False)"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(project / "r.toml"), str(out)], stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(), p.stderr.read()) for p in procs]
    assert (out / "manifest.json").is_file()
    failed = [err for rc, err in results if rc != 0]
    assert len(failed) <= 1
    for err in failed:
        assert "another build" in err or "already exists" in err, err
