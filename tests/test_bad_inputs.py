"""Bad input, as a hostile user would give it, through the `recipe` command: every case
ends with its exit code and a message holding the expected words, never a traceback, and
leaves nothing behind (no release, no staging folder, no lock).

Two tables: every broken recipe of tests/test_recipe.py built with `recipe build`, and the
cases that only a command line, a file system or a data file can make."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Callable

import pytest
from conftest import MODEL
from test_recipe import BASE, BROKEN

from mmrecipe.cli import main


def project(tmp_path: Path) -> Path:
    """The BASE recipe of test_recipe.py with its data, in `tmp_path`."""
    from PIL import Image

    (tmp_path / "chat.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n')
    (tmp_path / "vqa.jsonl").write_text('{"question": "What?", "answers": ["cat", "cat"], "image": "a.png"}\n')
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "ctx.jsonl").write_text('{"caption": "a cat", "image": "a.png"}\n')
    (tmp_path / "r.toml").write_text(textwrap.dedent(BASE))
    return tmp_path


def run(capsys, argv: list[str], cwd: Path) -> tuple[int, str]:
    old = Path.cwd()
    os.chdir(cwd)
    try:
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's usage errors
            code = int(e.code or 0)
    finally:
        os.chdir(old)
    captured = capsys.readouterr()
    return code, captured.err


def assert_clean(folder: Path, before: set[str]) -> None:
    after = {p.name for p in folder.iterdir()}
    assert after - before == set(), f"left behind: {sorted(after - before)}"


@pytest.mark.parametrize("name,change,error,text", [b for b in BROKEN if b[2]], ids=[b[0] for b in BROKEN if b[2]])
def test_broken_recipes_through_the_command(capsys, tmp_path, name, change, error, text):
    folder = project(tmp_path)
    (folder / "r.toml").write_text(change(textwrap.dedent(BASE)))
    before = {p.name for p in folder.iterdir()}
    code, err = run(capsys, ["build", "r.toml", "-o", "out", "--quiet", "--offline"], folder)
    text = STREAMED.get(name, text)
    assert code == 1 and text in err and "Traceback" not in err, err
    assert_clean(folder, before)


# A streamed source is read a slice at a time: a path that resolves on none of a slice's
# rows is a missing value there (the whole-source check names the path itself).
STREAMED = {"field path resolves on no row": "source 'vqa', row 0, field 'answer': missing value (answers[5])"}


def _jsonl_source(body: str | bytes) -> Callable[[Path], None]:
    def setup(folder: Path) -> None:
        data = body.encode() if isinstance(body, str) else body
        (folder / "extra.jsonl").write_bytes(data)
        with open(folder / "r.toml", "a") as f:
            f.write('\n[[source]]\nname = "extra"\npath = "extra.jsonl"\nlayout = "qa"\nfields = { question = "q", answer = "a" }\n')
    return setup


def _json_source(body: str) -> Callable[[Path], None]:
    def setup(folder: Path) -> None:
        (folder / "extra.json").write_text(body)
        with open(folder / "r.toml", "a") as f:
            f.write('\n[[source]]\nname = "extra"\npath = "extra.json"\nlayout = "qa"\nfields = { question = "q", answer = "a" }\n')
    return setup


def _recipe_text(text: str) -> Callable[[Path], None]:
    return lambda folder: (folder / "r.toml").write_text(text)


def _mkdir(name: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).mkdir()


def _user_folder(folder: Path) -> None:
    (folder / "mine").mkdir()
    (folder / "mine" / "notes.txt").write_text("keep me")


def _nothing(folder: Path) -> None:
    pass


CASES = [
    # name, setup, argv, exit code, words in the message
    ("negative threads", _nothing, ["build", "r.toml", "-o", "out", "--threads", "-3"], 2, "out of range"),
    ("too many threads", _nothing, ["build", "r.toml", "-o", "out", "--threads", "100000"], 2, "out of range"),
    ("threads not a number", _nothing, ["build", "r.toml", "-o", "out", "--threads", "many"], 2, "expected a whole number"),
    ("output is the recipe folder", _nothing, ["build", "r.toml", "-o", ".", "--overwrite"], 1, "an input of this build"),
    ("output is a data file", _nothing, ["build", "r.toml", "-o", "vqa.jsonl", "--overwrite"], 1, "is an input of this build"),
    ("output below a file", _nothing, ["build", "r.toml", "-o", "vqa.jsonl/out"], 1, "is a file"),
    ("overwrite a user folder", _user_folder, ["build", "r.toml", "-o", "mine", "--overwrite"], 1, "is not a release"),
    ("output exists", _user_folder, ["build", "r.toml", "-o", "mine"], 1, "already exists"),
    ("recipe file missing", _nothing, ["build", "nope.toml", "-o", "out"], 1, "recipe file not found"),
    ("recipe is a folder", _mkdir("dir.toml"), ["build", "dir.toml", "-o", "out"], 1, "is a folder"),
    ("extends names a folder", lambda f: ((f / "base").mkdir(), (f / "d.toml").write_text('extends = "base"\n')), ["build", "d.toml", "-o", "out"], 1, "is a folder"),
    ("extends a missing file", _recipe_text('extends = "gone.toml"\n'), ["build", "r.toml", "-o", "out"], 1, "base recipe not found"),
    ("recipe not UTF-8", lambda f: (f / "r.toml").write_bytes(b"\xff\xfe[recipe]"), ["build", "r.toml", "-o", "out"], 1, "not UTF-8"),
    ("unknown command", _nothing, ["bulid", "r.toml"], 2, "invalid choice"),
    ("verify a missing folder", _nothing, ["verify", "nowhere"], 1, "not a release"),
    ("stats of a non-release", _mkdir("empty"), ["stats", "empty"], 1, "not a release"),
    ("malformed JSON line", _jsonl_source('{"q": "a", "a": "b"}\n{"q": oops}\n'), ["build", "r.toml", "-o", "out"], 1, "line 2: malformed JSON"),
    ("not UTF-8 data", _jsonl_source(b'{"q": "\xff", "a": "b"}\n'), ["build", "r.toml", "-o", "out"], 1, "not UTF-8"),
    ("JSON line not an object", _jsonl_source('[1, 2]\n'), ["build", "r.toml", "-o", "out"], 1, "expected a JSON object"),
    ("empty data file", _jsonl_source(""), ["build", "r.toml", "-o", "out"], 1, "no rows"),
    ("null answer", _jsonl_source('{"q": "x", "a": null}\n'), ["build", "r.toml", "-o", "out"], 1, "row 0, field 'answer': missing value"),
    ("unknown role", lambda f: (f / "chat.jsonl").write_text('{"messages": [{"role": "narrator", "content": "once"}]}\n'),
     ["build", "r.toml", "-o", "out"], 1, "unknown role 'narrator'"),
    ("broken JSON array", _json_source('[{"q": "x", "a": "y"}, {"q": '), ["build", "r.toml", "-o", "out"], 1, "cannot read"),
    ("JSON array with trailing data", _json_source('[{"q": "x", "a": "y"}] and more'), ["build", "r.toml", "-o", "out"], 1, "data after the closing ']'"),
    ("JSON line nested 10,000 deep", _jsonl_source('{"q": ' + "[" * 10_000 + "]" * 10_000 + ', "a": "y"}\n'), ["build", "r.toml", "-o", "out"], 1, "nested deeper than 128 levels"),
    ("lone surrogate", _jsonl_source('{"q": "\\ud800", "a": "y"}\n'), ["build", "r.toml", "-o", "out"], 1, "lone UTF-16 surrogate"),
    ("source file missing", _recipe_text(textwrap.dedent(BASE).replace('path = "chat.jsonl"', 'path = "gone.jsonl"')), ["build", "r.toml", "-o", "out"], 1, "file not found"),
    ("glob matches nothing", _recipe_text(textwrap.dedent(BASE).replace('path = "chat.jsonl"', 'path = "gone/*.jsonl"')), ["build", "r.toml", "-o", "out"], 1, "no file matches"),
    ("glob reaches a FIFO", lambda f: (os.mkfifo(f / "chat2.jsonl"), (f / "r.toml").write_text(textwrap.dedent(BASE).replace('path = "chat.jsonl"', 'path = "chat*.jsonl"'))),
     ["build", "r.toml", "-o", "out"], 1, "is not a regular file"),
    ("tokenizer folder missing", _recipe_text(textwrap.dedent(BASE).replace(str(MODEL), "/nonexistent/tok")), ["build", "r.toml", "-o", "out"], 1, "no tokenizer.json"),
    ("image missing at check", lambda f: (f / "a.png").unlink(), ["check", "r.toml", "--images", "all"], 1, "file not found"),
    ("preview of an unknown source", _nothing, ["preview", "r.toml", "--source", "nope"], 1, "no source named 'nope'"),
]


@pytest.mark.parametrize("name,setup,argv,code,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_error(capsys, tmp_path, name, setup, argv, code, words):
    folder = project(tmp_path)
    setup(folder)
    before = {p.name for p in folder.iterdir()}
    got, err = run(capsys, argv, folder)
    assert got == code and words in err and "Traceback" not in err, err
    assert_clean(folder, before)
    if (folder / "mine").is_dir():
        assert (folder / "mine" / "notes.txt").read_text() == "keep me"


def test_the_corpus_is_large():
    assert len(CASES) + len([b for b in BROKEN if b[2]]) >= 60
