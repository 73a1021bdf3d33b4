"""kill -9 at several moments of a build, plain and with --overwrite: the destination is
never a broken release (absent, or the previous release intact, or the new one complete),
and the next build cleans up whatever the killed one left beside it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DEMO

from mmrecipe import build
from mmrecipe.release.verify import verify

# A demo mix large enough that each moment below lasts long enough to be caught.
BIG = '\n[mixture]\ntotal = { samples = 10000 }\n'


def recipe(tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(DEMO.parent, tmp_path / "recipes", ignore=shutil.ignore_patterns("cache"))
    path = tmp_path / "recipes" / "big.toml"
    text = (DEMO.read_text().split("[mixture]")[0]) + BIG + "[[source]]" + DEMO.read_text().split("[[source]]", 1)[1]
    path.write_text(text)
    return path


def staging_has(out: Path, what: str) -> bool:
    for entry in out.parent.glob(f".{out.name}.*"):
        if what == "staging" and ".partial-" in entry.name:
            return True
        if what == "spill" and ".spill-" in entry.name and any(p.stat().st_size for p in entry.rglob("*") if p.is_file()):
            return True
        if what == "shard" and ".partial-" in entry.name and list(entry.glob("data/*.parquet")):
            return True
        if what == "stats" and ".partial-" in entry.name and (entry / "stats.json").exists():
            return True
    return False


def kill_when(proc: subprocess.Popen, out: Path, what: str, limit: float = 120.0) -> bool:
    """SIGKILL the build once `what` appears beside `out`; False if the build ended first."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if proc.poll() is not None:
            return False
        if staging_has(out, what):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.005)
    proc.kill()
    raise AssertionError(f"{what} never appeared")


def start(path: Path, out: Path, overwrite: bool) -> subprocess.Popen:
    code = "import sys, mmrecipe; mmrecipe.build(sys.argv[1], sys.argv[2], progress=False, overwrite=sys.argv[3] == '1')"
    return subprocess.Popen([sys.executable, "-c", code, str(path), str(out), "1" if overwrite else "0"])


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> tuple[Path, str]:
    folder = tmp_path_factory.mktemp("killed")
    path = recipe(folder)
    first = build(path, folder / "reference", progress=False)
    return path, first.manifest.release_id


@pytest.mark.parametrize("moment", ["staging", "spill", "shard", "stats"])
@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_killed_build_never_leaves_a_broken_release(big, tmp_path, moment, overwrite):
    path, release_id = big
    out = tmp_path / "out"
    if overwrite:
        old = build(DEMO, out, progress=False)  # a different, finished release to replace
    killed = kill_when(start(path, out, overwrite), out, moment)
    # The short moment between stats.json and the manifest may be missed; the others last.
    assert killed or moment == "stats", f"the build ended before {moment} could be caught"
    if overwrite:
        report = verify(out)
        assert report.ok, report.problems
        assert report.release_id in (old.manifest.release_id, release_id)
        if killed and moment != "stats":
            # Replaced only once complete. (stats.json comes just before the swap: the
            # signal may land after it, and the new release is then the complete one.)
            assert report.release_id == old.manifest.release_id
    elif killed:
        assert not out.exists()
    again = build(path, out, progress=False, overwrite=True)
    assert again.manifest.release_id == release_id and verify(out).ok
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "the next build removed what the killed one left"
