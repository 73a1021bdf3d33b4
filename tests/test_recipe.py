"""The recipe language: broken recipes fail with the key path and what was expected."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from conftest import DEMO, MODEL, RECIPES
from hypothesis import given
from hypothesis import strategies as st

from mmrecipe import MMRecipeError, RecipeError, SourceError, TemplateError, TokenizerError, load_recipe, parse_recipe
from mmrecipe.check import check
from mmrecipe.recipe import to_dict

BASE = f"""
[recipe]
name = "t"
version = "1.0.0"
seed = 1

[model]
tokenizer = "{MODEL}"
image = {{ placeholder = "<image>", token = "<image>", count = 4 }}

[[source]]
name = "chat"
path = "chat.jsonl"
layout = "conversation"

[[source]]
name = "vqa"
path = "vqa.jsonl"
layout = "qa"
fields = {{ question = "question", answer = "answers[0]", image = "image" }}
instructions = "vqa-short"
image_root = "."
"""


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "chat.jsonl").write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
    )
    (tmp_path / "vqa.jsonl").write_text('{"question": "What?", "answers": ["cat", "cat"], "image": "a.png"}\n')
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    return tmp_path


def write(folder: Path, text: str) -> Path:
    p = folder / "r.toml"
    p.write_text(textwrap.dedent(text))
    return p


def test_base_recipe_is_valid(folder):
    report = check(write(folder, BASE))
    assert [len(s) for s in report.sources] == [1, 1]


# (what is changed, the replacement, the error class, text the message must contain)
BROKEN = [
    ("broken toml", lambda t: t + "\n[[[", RecipeError, "not valid TOML"),
    ("unknown top key", lambda t: t + "\n[outptu]\nseq_len = 5\n", RecipeError, "outptu: unknown key (did you mean 'output'?)"),
    ("misspelled source key", lambda t: t.replace('layout = "qa"', 'layuot = "qa"'), RecipeError, "source[1].layuot: unknown key (did you mean 'layout'?)"),
    ("misspelled model key", lambda t: t.replace("tokenizer =", "tokeniser ="), RecipeError, "model.tokeniser: unknown key"),
    ("misspelled image key", lambda t: t.replace("count = 4", "cuont = 4"), RecipeError, "model.image.cuont: unknown key (did you mean 'count'?)"),
    ("wrong type seed", lambda t: t.replace("seed = 1", 'seed = "one"'), RecipeError, "recipe.seed: Expected `int`"),
    ("wrong type weight", lambda t: t.replace('name = "chat"', 'name = "chat"\nweight = "heavy"'), RecipeError, "source[0].weight: Expected `float`"),
    ("bad layout", lambda t: t.replace('layout = "conversation"', 'layout = "dialog"'), RecipeError, "source[0].layout"),
    ("zero weight", lambda t: t.replace('name = "chat"', 'name = "chat"\nweight = 0'), RecipeError, "source[0].weight: must be > 0"),
    ("negative weight", lambda t: t.replace('name = "chat"', 'name = "chat"\nweight = -1.0'), RecipeError, "source[0].weight: must be > 0"),
    ("duplicate names", lambda t: t.replace('name = "vqa"', 'name = "chat"'), RecipeError, "source[1].name: duplicate source name 'chat'"),
    ("missing recipe name", lambda t: t.replace('name = "t"\n', ""), RecipeError, "recipe: Object missing required field `name`"),
    ("no sources", lambda t: t[: t.index("[[source]]")], RecipeError, "Object missing required field `source`"),
    ("conflicting totals", lambda t: t + "\n[mixture]\ntotal = { samples = 5, tokens = 9 }\n", RecipeError, "mixture.total"),
    ("bad total word", lambda t: t + '\n[mixture]\ntotal = "all"\n', RecipeError, "mixture.total: 'all' is not a mixture total"),
    ("unknown pool", lambda t: t.replace('"vqa-short"', '"vqa-shrot"'), RecipeError, "source[1].instructions: no pool named 'vqa-shrot' (did you mean 'vqa-short'?)"),
    ("qa without answer", lambda t: t.replace(', answer = "answers[0]"', ""), RecipeError, "source[1].fields.answer"),
    ("tiny seq_len", lambda t: t + "\n[output]\nseq_len = 4\n", RecipeError, "output.seq_len"),
    ("bad packing", lambda t: t + '\n[output]\npacking = "ffd"\n', RecipeError, "output.packing"),
    ("missing file", lambda t: t.replace('"chat.jsonl"', '"nope.jsonl"'), SourceError, "source[0].path): file not found"),
    ("glob matches nothing", lambda t: t.replace('"chat.jsonl"', '"shards/*.jsonl"'), SourceError, "no file matches"),
    ("field on no column", lambda t: t.replace('question = "question"', 'question = "query"'), SourceError, "source[1].fields.question: source 'vqa' has no column 'query'"),
    ("field path resolves on no row", lambda t: t.replace('"answers[0]"', '"answers[5]"'), SourceError, "source[1].fields.answer: the path 'answers[5]' resolves on no row"),
    ("bad field path syntax", lambda t: t.replace('"answers[0]"', '"answers[x]"'), RecipeError, "source[1].fields.answer"),
    ("unknown reducer", lambda t: t.replace('"answers[0]"', '"majority(answers)"'), RecipeError, "unknown reducer 'majority'"),
    ("placeholder with no field", lambda t: t.replace('instructions = "vqa-short"', 'instructions = ["Q: {question} ({hint})"]'), RecipeError, "placeholder {hint} has no field"),
    ("tokenizer folder missing", lambda t: t.replace(str(MODEL), "/nonexistent/model"), TokenizerError, "model.tokenizer: no tokenizer.json"),
    ("unknown chat template", lambda t: t.replace("[model]", '[model]\nchat_template = "chatml2"'), TokenizerError, "model.chat_template: 'chatml2'"),
    ("image token not in vocab", lambda t: t.replace('token = "<image>"', 'token = "<|image_pad|>"'), TokenizerError, "'<|image_pad|>' is not in the tokenizer"),
    ("unknown role", lambda t: t, None, None),  # replaced in its own test below
]


@pytest.mark.parametrize("name,change,error,text", [b for b in BROKEN if b[2]], ids=[b[0] for b in BROKEN if b[2]])
def test_broken_recipes(folder, name, change, error, text):
    path = write(folder, change(BASE))
    with pytest.raises(error) as e:
        check(path)
    assert text in str(e.value), str(e.value)


def test_corpus_size():
    assert len([b for b in BROKEN if b[2]]) >= 25


def test_all_problems_reported_at_once(folder):
    text = BASE.replace('layout = "qa"', 'layuot = "qa"').replace("seed = 1", "seed = 1\nsede = 2").replace("count = 4", "cnt = 4")
    with pytest.raises(RecipeError) as e:
        load_recipe(write(folder, text))
    keys = [p.split(":")[0] for p in e.value.problems]
    assert {"source[1].layuot", "recipe.sede", "model.image.cnt"} <= set(keys)
    assert "source[1]: Object missing required field `layout`" in e.value.problems


def test_data_problems(folder):
    (folder / "chat.jsonl").write_text('{"messages": [{"role": "wizard", "content": "hi"}]}\n')
    with pytest.raises(SourceError, match=r"row 0.*unknown role 'wizard'.*roles = \{ wizard = \"user\" \}"):
        check(write(folder, BASE))
    (folder / "chat.jsonl").write_text("")
    with pytest.raises(SourceError, match="no rows"):
        check(write(folder, BASE))
    good = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
    (folder / "chat.jsonl").write_text(good + good + '{"messages": [}\n')
    with pytest.raises(SourceError, match=r"chat.jsonl, line 3: malformed JSON"):
        check(write(folder, BASE))
    (folder / "chat.jsonl").write_bytes(good.encode() + b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}\n')
    with pytest.raises(SourceError, match=r"line 2: not UTF-8"):
        check(write(folder, BASE))


def test_image_path_escaping_root(folder):
    (folder / "vqa.jsonl").write_text('{"question": "q", "answers": ["a"], "image": "../secret.png"}\n')
    with pytest.raises(SourceError, match=r"row 0, field 'image': the path '../secret.png' escapes"):
        check(write(folder, BASE))


def test_paths_resolve_relative_to_the_recipe(folder, monkeypatch, tmp_path_factory):
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    assert len(check(write(folder, BASE)).sources) == 2


def test_every_shipped_recipe_checks():
    for path in sorted(RECIPES.glob("*.toml")):
        report = check(path)
        assert all(len(s) > 0 for s in report.sources), path


def drop_none(value):
    if isinstance(value, dict):
        return {k: drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_none(v) for v in value]
    return value


names = st.text(st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), min_size=1, max_size=12).filter(str.strip)


@given(name=names, version=st.from_regex(r"[0-9]\.[0-9]\.[0-9]", fullmatch=True), seed=st.integers(0, 2**63 - 1),
       seq_len=st.integers(16, 1 << 20), weight=st.floats(0.001, 1000))
def test_recipe_round_trip(name, version, seed, seq_len, weight):
    import tomli_w

    text = tomli_w.dumps({
        "recipe": {"name": name, "version": version, "seed": seed},
        "model": {"tokenizer": "m"},
        "output": {"seq_len": seq_len},
        "source": [{"name": "a", "path": "a.jsonl", "layout": "conversation", "weight": weight}],
    })
    r = parse_recipe(text)
    again = parse_recipe(tomli_w.dumps(drop_none(to_dict(r))))
    assert to_dict(again) == to_dict(r)
    assert (r.recipe.name, r.recipe.seed, r.output.seq_len, r.source[0].weight) == (name, seed, seq_len, weight)


def test_demo_recipe_loads():
    r = load_recipe(DEMO)
    assert r.recipe.name == "demo" and len(r.source) == 4
    assert isinstance(RecipeError("x"), MMRecipeError) and issubclass(TemplateError, MMRecipeError)
