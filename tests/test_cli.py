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


def test_llm_demo_build_and_check_report_the_llm_tables(tmp_path):
    demo_llm = DEMO.with_name("demo-llm.toml")
    r = run("build", str(demo_llm), "-o", str(tmp_path / "demo-llm"), "--offline", "--quiet")
    assert r.returncode == 0, r.stderr
    table = r.stdout[r.stdout.index("llm table"):]
    assert "from cache" in table and "calls made" in table and "failed" in table
    assert "lengthen.rephrase" in table and "generate.conversations" in table
    assert "note: lengthen.rephrase: 149 of 149 answers lengthened" in r.stdout
    c = run("check", str(demo_llm))
    assert c.returncode == 0, c.stderr
    rows = {line.split()[0]: line.split() for line in c.stdout.splitlines() if line.startswith(("lengthen.", "generate."))}
    assert rows["lengthen.rephrase"][-1] == "0" and rows["generate.conversations"][-1] == "0", c.stdout  # nothing to call
    b = run("build", "--help")
    assert "--offline" in b.stdout and "--retry-failed" in b.stdout
    both = run("build", str(demo_llm), "--offline", "--retry-failed")
    assert both.returncode == 2 and "not allowed with argument" in both.stderr


def test_offline_build_missing_calls_is_a_clear_error(tmp_path):
    recipe = tmp_path / "r.toml"
    shutil.copytree(DEMO.parent / "demo", tmp_path / "demo", ignore=shutil.ignore_patterns("cache"))
    shutil.copytree(DEMO.parent / "models", tmp_path / "models")
    shutil.copy(DEMO, tmp_path / "demo.toml")
    shutil.copy(DEMO.with_name("demo-llm.toml"), recipe)
    r = run("build", str(recipe), "-o", str(tmp_path / "out"), "--offline", "--quiet")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "lengthen.rephrase: 149 of 149 calls for source 'vqa' are not in the cache" in r.stderr
    assert "(145 distinct prompts) and --offline makes no calls (first: row 0)" in r.stderr
    assert not (tmp_path / "out").exists()
