"""The `recipe` command as a user meets it."""

from __future__ import annotations

import shutil
import subprocess
import sys

from conftest import DEMO


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmrecipe", *args], capture_output=True, text=True, cwd=cwd)


def test_console_script_is_installed():
    assert shutil.which("recipe") is not None


def test_help_teaches():
    top = run("--help")
    assert top.returncode == 0
    assert "recipe build recipes/demo.toml -o out/demo" in top.stdout and "check" in top.stdout
    b = run("build", "--help")
    assert b.returncode == 0
    for text in ("--threads", "--overwrite", "manifest.json", "data/part-", "example:"):
        assert text in b.stdout


def test_build_prints_summary(tmp_path):
    out = tmp_path / "demo"
    r = run("build", str(DEMO), "-o", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    for text in ("vqa", "captions", "llava", "chat", "sequences", "tokens", "loss-token fraction", "packing efficiency", str(out)):
        assert text in r.stdout, text
    again = run("build", str(DEMO), "-o", str(out), "--quiet")
    assert again.returncode == 1
    assert "already exists" in again.stderr and "Traceback" not in again.stderr


def test_user_errors_go_to_stderr_without_traceback(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[recipe]\nname = "x"\n[model]\ntokenizer = "m"\n[[source]]\nname = "a"\npath = "a.jsonl"\nlayout = "qa"\nwieght = 2\n')
    r = run("check", str(bad))
    assert r.returncode == 1 and r.stdout == ""
    assert "source[0].wieght: unknown key (did you mean 'weight'?)" in r.stderr
    assert "source[0].fields.question" in r.stderr
    assert "Traceback" not in r.stderr
    missing = run("build", str(tmp_path / "nope.toml"))
    assert missing.returncode == 1 and "recipe file not found" in missing.stderr


def test_check_prints_sources():
    r = run("check", str(DEMO))
    assert r.returncode == 0, r.stderr
    assert "llava" in r.stdout and "conversation" in r.stdout and "ok" in r.stdout
