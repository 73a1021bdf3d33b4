"""The recipe language: broken recipes fail with the key path and what was expected."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from conftest import DEMO, MODEL, RECIPES, sources_moved
from hypothesis import given
from hypothesis import strategies as st

from mmrecipe import MMRecipeError, RecipeError, SourceError, TemplateError, TokenizerError, load_recipe, parse_recipe
from mmrecipe.check import check
from mmrecipe.builder import recipe_data as to_dict
from mmrecipe.recipe.limits import LIMITS

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
    (tmp_path / "ctx.jsonl").write_text('{"caption": "a cat", "image": "a.png"}\n')
    return tmp_path


def write(folder: Path, text: str) -> Path:
    p = folder / "r.toml"
    p.write_text(textwrap.dedent(text))
    return p


def test_base_recipe_is_valid(folder):
    report = check(write(folder, BASE))
    assert [len(s) for s in report.sources] == [1, 1]


LENGTHEN = '\n[lengthen.rephrase]\nmodel = "m"\nprompt = "{question} {answer}"\n'
GENERATE = '\n[[generate]]\nname = "g"\npath = "ctx.jsonl"\nmodel = "m"\nfields = { caption = "caption" }\ncontext = "{caption}"\n'


def lengthen(text: str, name: str = "rephrase", table: str = LENGTHEN) -> str:
    """The base recipe with its vqa source lengthened by [lengthen.NAME] (`table`)."""
    return text.replace('image_root = "."', f'image_root = "."\nlengthen = "{name}"') + table


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
    ("bad format spec in a field", lambda t: t.replace('"answers[0]"', '"{answers[0]:x}"'), RecipeError, "source[1].fields.answer: '{answers[0]:x}': the only format spec is :0N"),
    ("group_by on conversations", lambda t: t.replace('layout = "conversation"', 'layout = "conversation"\ngroup_by = "image"'), RecipeError, "source[0].group_by: only applies to the 'qa' layout"),
    ("group_by by question", lambda t: t.replace('layout = "qa"', 'layout = "qa"\ngroup_by = "question"'), RecipeError, "source[1].group_by"),
    ("remove without extends", lambda t: t.replace('name = "chat"', 'name = "chat"\nremove = true'), RecipeError, "source[0].remove: only a recipe with `extends`"),
    ("extends a missing file", lambda t: 'extends = "base.toml"\n' + t, RecipeError, "extends: base recipe not found"),
    ("join without keys", lambda t: t.replace('image_root = "."', 'image_root = "."\njoin = { path = "vqa.jsonl" }'), RecipeError, "source[1].join: Object missing required field `left_on`"),
    ("unknown role", lambda t: t, None, None),  # replaced in its own test below
    # LLM stages
    ("lengthen names no table", lambda t: lengthen(t, "rephrse"), RecipeError, "source[1].lengthen: no [lengthen.rephrse] table (did you mean 'rephrase'?)"),
    ("lengthen a conversation", lambda t: t.replace('layout = "conversation"', 'layout = "conversation"\nlengthen = "rephrase"') + LENGTHEN, RecipeError, "source[0].lengthen: only a 'qa' source has short answers"),
    ("lengthen prompt field unmapped", lambda t: lengthen(t, table=LENGTHEN.replace("{answer}", "{caption}")), RecipeError, "source[1].lengthen: lengthen.rephrase uses {caption}, which source 'vqa' does not map"),
    ("lengthen with short_answer", lambda t: lengthen(t.replace('image_root = "."', 'image_root = "."\nshort_answer = "word"')), RecipeError, "a lengthened answer is not short"),
    ("llm lengthen without prompt", lambda t: lengthen(t, table='\n[lengthen.rephrase]\nmodel = "m"\n'), RecipeError, 'lengthen.rephrase.prompt: method "llm" needs a prompt'),
    ("llm lengthen without model", lambda t: lengthen(t, table=LENGTHEN.replace('model = "m"', "")), RecipeError, "lengthen.rephrase.model: name the model"),
    ("llm endpoint not a url", lambda t: lengthen(t, table=LENGTHEN + 'endpoint = "localhost:8080"\n'), RecipeError, "lengthen.rephrase.endpoint: expected an http:// or https:// URL"),
    ("llm zero concurrency", lambda t: lengthen(t, table=LENGTHEN + "concurrency = 0\n"), RecipeError, "lengthen.rephrase.concurrency: must be at least 1"),
    ("lengthen bad on_error", lambda t: lengthen(t, table=LENGTHEN + 'on_error = "skip"\n'), RecipeError, "lengthen.rephrase.on_error"),
    ("misspelled lengthen key", lambda t: lengthen(t, table=LENGTHEN + 'temprature = 0.2\n'), RecipeError, "lengthen.rephrase.temprature: unknown key (did you mean 'temperature'?)"),
    ("template lengthen without templates", lambda t: lengthen(t, table='\n[lengthen.rephrase]\nmethod = "template"\n'), RecipeError, 'method "template" needs one of templates'),
    ("template lengthen unknown pool", lambda t: lengthen(t, table='\n[lengthen.rephrase]\nmethod = "template"\npool = "answer-sentense"\n'), RecipeError, "lengthen.rephrase.pool: no pool named 'answer-sentense'"),
    ("generate name clash", lambda t: t + GENERATE.replace('name = "g"', 'name = "chat"'), RecipeError, "generate[0].name: 'chat' is already the name of a source"),
    ("generate context field unmapped", lambda t: t + GENERATE.replace('context = "{caption}"', 'context = "{caption} {boxes}"'), RecipeError, "generate[0].context: uses {boxes}, which fields does not map"),
    ("generate without context", lambda t: t + GENERATE.replace('context = "{caption}"\n', ""), RecipeError, "generate[0]: Object missing required field `context`"),
    ("generate bad reply format", lambda t: t + GENERATE + 'reply = "xml"\n', RecipeError, "generate[0].reply"),
    ("generate zero conversations", lambda t: t + GENERATE + "conversations = 0\n", RecipeError, "generate[0].conversations: must be at least 1"),
    ("generate context file missing", lambda t: t + GENERATE.replace("ctx.jsonl", "nope.jsonl"), SourceError, "(generate[0].path): file not found"),
    ("generate seeds file missing", lambda t: t + GENERATE + 'seeds = "nope.jsonl"\n', SourceError, "generate[0].seeds: file not found"),
    ("generate field on no column", lambda t: t + GENERATE.replace('caption = "caption"', 'caption = "captoin"'), SourceError, "generate[0].fields.caption: source 'g' has no column 'captoin'"),
    # Every number is bounded where the recipe is checked (recipe/limits.py), never by a crash later.
    ("seq_len too large", lambda t: t + "\n[output]\nseq_len = 1_000_000_000_000\n", RecipeError, "output.seq_len: must be at least 16 and at most 1,048,576, got 1,000,000,000,000"),
    ("seq_len too short", lambda t: t + "\n[output]\nseq_len = 8\n", RecipeError, "output.seq_len: must be at least 16"),
    ("negative seed", lambda t: t.replace("seed = 1", "seed = -1"), RecipeError, "recipe.seed: must be at least 0"),
    ("seed past 64 bits", lambda t: t.replace("seed = 1", "seed = 1180591620717411303424"), RecipeError, "recipe.seed: must be at least 0 and at most"),
    ("infinite weight", lambda t: t.replace('name = "chat"', 'name = "chat"\nweight = inf'), RecipeError, "source[0].weight: must be a finite number, got inf"),
    ("nan weight", lambda t: t.replace('name = "chat"', 'name = "chat"\nweight = nan'), RecipeError, "source[0].weight: must be a finite number, got nan"),
    ("nan alpha", lambda t: t + "\n[mixture]\nalpha = nan\n", RecipeError, "mixture.alpha: must be a finite number"),
    ("infinite alpha", lambda t: t + "\n[mixture]\nalpha = inf\n", RecipeError, "mixture.alpha: must be a finite number"),
    ("huge image count", lambda t: t.replace("count = 4", "count = 1_000_000_000"), RecipeError, "model.image.count: must be at least 1 and at most 16,384"),
    ("huge min_pixels", lambda t: t.replace("count = 4", "min_pixels = 1_000_000_000_000"), RecipeError, "model.image.min_pixels: must be at least 1 and at most"),
    ("zero shard size", lambda t: t + "\n[output]\nshard_sequences = 0\n", RecipeError, "output.shard_sequences: must be at least 1"),
    ("zero samples", lambda t: t + "\n[mixture]\ntotal = { samples = 0 }\n", RecipeError, "mixture.total.samples: must be at least 1"),
    ("infinite max_epochs", lambda t: t.replace('name = "chat"', 'name = "chat"\nmax_epochs = inf'), RecipeError, "source[0].max_epochs: must be a finite number"),
    ("several out of range at once", lambda t: t.replace("seed = 1", "seed = -5") + "\n[output]\nseq_len = 3\n", RecipeError, "2 problems in the recipe"),
]


@pytest.mark.parametrize("name,change,error,text", [b for b in BROKEN if b[2]], ids=[b[0] for b in BROKEN if b[2]])
def test_broken_recipes(folder, name, change, error, text):
    path = write(folder, change(BASE))
    with pytest.raises(error) as e:
        check(path)
    assert text in str(e.value), str(e.value)


MEDIA_LIMITS = [k for k in LIMITS if k.startswith(("model.audio.", "model.video."))]


@pytest.mark.parametrize("key", MEDIA_LIMITS)
@pytest.mark.parametrize("side", ["over", "under"])
def test_audio_and_video_numbers_are_bounded(folder, key, side):
    """Every number of an audio or video rule, just past its bound, is a recipe error
    naming the key and the bound (not a wrapped integer or a panic in the core)."""
    medium, name = key.split(".")[1:]
    limit = LIMITS[key]
    value = limit.high + 1 if side == "over" else limit.low - (0 if limit.low_open else 1)
    text = BASE.replace("count = 4 }\n", f"count = 4 }}\n{medium} = {{ {name} = {value!r} }}\n")
    assert f"{medium} = " in text
    with pytest.raises(RecipeError) as e:
        load_recipe(write(folder, text))
    assert f"{key}: must be " in str(e.value), str(e.value)
    if side == "over":
        assert f"at most {limit.high:,}" in str(e.value)


def test_every_number_of_the_media_rules_is_bounded():
    from mmrecipe.recipe.schema import AudioSpec, VideoSpec

    numbers = {f"model.{medium}.{f}" for medium, spec in (("audio", AudioSpec), ("video", VideoSpec))
               for f, t in spec.__annotations__.items() if any(n in str(t) for n in ("int", "float"))}
    in_validate = {"model.audio.count", "model.video.count", "model.video.max_tokens"}  # tests/test_audio.py, test_video.py
    assert numbers and numbers - in_validate == set(MEDIA_LIMITS) and not in_validate & set(MEDIA_LIMITS)


def test_corpus_size():
    assert len([b for b in BROKEN if b[2]]) >= 50


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


# --- shipped recipes -------------------------------------------------------------------
#
# Shipped recipes other than the demo read data users put under recipes/data/; the tests
# check and build each one through a recipe that extends it and points every source at
# the tiny copies in tests/fixtures/data/ (same formats, same layout).

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SHIPPED = sorted(p for p in RECIPES.glob("*.toml") if not p.name.startswith("demo"))


def on_fixtures(shipped: Path, out: Path, samples: int = 40) -> Path:
    """A recipe that extends `shipped` with each source's data/ paths moved to the fixtures."""
    path = out / f"{shipped.stem}-fixtures.toml"
    path.write_text(f"extends = {str(shipped)!r}\n" + sources_moved(shipped, str(FIXTURES), samples))
    return path


def test_demo_recipe_checks():
    report = check(DEMO)
    assert all(len(s) > 0 for s in report.sources)


def test_recipes_are_shipped():
    assert {p.stem for p in SHIPPED} >= {"alignment", "llava-1.5-mix", "instructblip"}
    for path in SHIPPED:
        recipe = load_recipe(path)
        # the bundled tokenizer (with an audio token for the recipes with audio)
        assert recipe.model.tokenizer == ("models/smollm2-audio" if recipe.model.audio else "models/smollm2"), path
        assert all(str(s.path).startswith("data/") for s in recipe.source), path


@pytest.mark.parametrize("shipped", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_recipe_checks_and_builds_on_fixtures(shipped, tmp_path):
    from mmrecipe import build

    derived = on_fixtures(shipped, tmp_path)
    report = check(derived, images="all")
    assert all(len(s) > 0 for s in report.sources), shipped
    assert all(not c.problems for c in report.images) and not report.warnings
    result = build(derived, tmp_path / "out", progress=False)
    selected = {s["name"]: s["selected"] for s in result.summary["sources"]}
    assert sum(selected.values()) == 40 and set(selected) == {s.name for s in report.plan.sources}


def test_instructblip_uses_several_pools():
    recipe = load_recipe(RECIPES / "instructblip.toml")
    pools = {s.instructions for s in recipe.source if isinstance(s.instructions, str)}
    assert {"vqa-short", "vqa-open", "multiple-choice", "caption-brief", "ocr"} <= pools
    mc = next(s for s in recipe.source if s.instructions == "multiple-choice")
    assert "options" in mc.fields


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


# --- extends --------------------------------------------------------------------------


def two_folders(folder: Path) -> tuple[Path, Path]:
    """The BASE recipe in `folder`, and an empty sibling folder for recipes extending it."""
    write(folder, BASE)
    other = folder / "derived"
    other.mkdir()
    return folder / "r.toml", other


def test_extends_merges_tables_and_sources_by_name(folder):
    base, other = two_folders(folder)
    (other / "more.jsonl").write_text((folder / "chat.jsonl").read_text())
    (other / "d.toml").write_text(textwrap.dedent("""
        extends = "../r.toml"
        [recipe]
        version = "2.0.0"
        [output]
        seq_len = 512
        [[source]]
        name = "vqa"
        weight = 3.0
        fields = { answer = "answers[1]" }
        [[source]]
        name = "more"
        path = "more.jsonl"
        layout = "conversation"
    """))
    r = load_recipe(other / "d.toml")
    assert (r.recipe.name, r.recipe.version, r.recipe.seed, r.output.seq_len) == ("t", "2.0.0", 1, 512)
    assert [s.name for s in r.source] == ["chat", "vqa", "more"]
    vqa = r.source[1]
    assert vqa.weight == 3.0 and vqa.layout == "qa" and vqa.instructions == "vqa-short"
    assert vqa.fields == {"question": "question", "answer": "answers[1]", "image": "image"}  # fields merge key by key
    assert r.bases == [base.resolve()] and r.path == (other / "d.toml").resolve()
    assert "bases" not in to_dict(r) and "extends" not in to_dict(r)
    assert [len(s) for s in check(r).sources] == [1, 1, 1]


def test_extends_paths_of_the_base_stay_relative_to_the_base(folder, monkeypatch, tmp_path_factory):
    _, other = two_folders(folder)
    (other / "d.toml").write_text('extends = "../r.toml"\n')
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    report = check(other / "d.toml")
    assert [s.files[0].resolve() for s in report.plan.sources] == [(folder / "chat.jsonl").resolve(), (folder / "vqa.jsonl").resolve()]
    assert report.plan.recipe.source[1].image_root == ".."  # rewritten from "." in the base's folder
    # A path the extending recipe writes is relative to the extending recipe.
    (other / "chat.jsonl").write_text("")
    (other / "e.toml").write_text('extends = "../r.toml"\n[[source]]\nname = "chat"\npath = "chat.jsonl"\n')
    with pytest.raises(SourceError, match="no rows"):
        check(other / "e.toml")


def test_extends_removes_and_replaces_sources(folder):
    _, other = two_folders(folder)
    (other / "d.toml").write_text('extends = "../r.toml"\n[[source]]\nname = "chat"\nremove = true\n')
    assert [s.name for s in load_recipe(other / "d.toml").source] == ["vqa"]
    # Removed, then defined anew under the same name: nothing of the base entry remains.
    (other / "e.toml").write_text(textwrap.dedent("""
        extends = "../r.toml"
        [[source]]
        name = "vqa"
        remove = true
        [[source]]
        name = "vqa"
        path = "../vqa.jsonl"
        layout = "qa"
        fields = { question = "question", answer = "answers[0]" }
    """))
    vqa = load_recipe(other / "e.toml").source[1]
    assert (vqa.name, vqa.instructions, vqa.image_root, "image" in vqa.fields) == ("vqa", None, None, False)


def test_extends_chains_and_replaces_the_mixture_total(folder):
    _, other = two_folders(folder)
    (folder / "mid.toml").write_text('extends = "r.toml"\n[mixture]\ntotal = { samples = 10 }\n[output]\nseq_len = 100\n')
    (other / "top.toml").write_text('extends = "../mid.toml"\n[mixture]\ntotal = { tokens = 500 }\n')
    r = load_recipe(other / "top.toml")
    assert r.mixture.total == {"tokens": 500} and r.output.seq_len == 100
    assert r.bases == [(folder / "mid.toml").resolve(), (folder / "r.toml").resolve()]


def test_extends_cycles_and_missing_bases_are_errors(folder):
    (folder / "a.toml").write_text('extends = "b.toml"\n')
    (folder / "b.toml").write_text('extends = "a.toml"\n')
    with pytest.raises(RecipeError, match=r"cycle: .*a\.toml -> .*b\.toml -> .*a\.toml") as e:
        load_recipe(folder / "a.toml")
    assert e.value.key == "extends"
    (folder / "self.toml").write_text('extends = "self.toml"\n')
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(folder / "self.toml")
    (folder / "c.toml").write_text('extends = "nope.toml"\n')
    with pytest.raises(RecipeError, match=r"extends: base recipe not found: .*nope\.toml"):
        load_recipe(folder / "c.toml")


def test_extends_reports_every_problem_of_the_merged_recipe(folder):
    write(folder, BASE.replace("seed = 1", "seed = 1\nsede = 2"))
    (folder / "d.toml").write_text(textwrap.dedent("""
        extends = "r.toml"
        [[source]]
        name = "vqa"
        layuot = "qa"
        [[source]]
        name = "ghost"
        remove = true
        [[source]]
        name = "chat"
        remove = true
        weight = 2
    """))
    with pytest.raises(RecipeError) as e:
        load_recipe(folder / "d.toml")
    keys = [p.split(":")[0] for p in e.value.problems]
    assert {"recipe.sede", "source[0].layuot", "source[1].remove", "source[2]"} <= set(keys), e.value.problems
    assert "r.toml has no source named 'ghost' to remove" in str(e.value)
    assert "extends" in str(e.value).splitlines()[0]  # the report names the chain of files


def test_remove_needs_extends(folder):
    with pytest.raises(RecipeError, match=r"source\[0\]\.remove: only a recipe with `extends`"):
        load_recipe(write(folder, BASE.replace('name = "chat"', 'name = "chat"\nremove = true')))


def test_extends_replaces_the_image_rule_whole(folder):
    """A child's grid rule must not merge under the base's fixed count (count would win)."""
    _, other = two_folders(folder)
    child = other / "grid.toml"
    child.write_text('extends = "../r.toml"\n[model]\nimage = { placeholder = "<image>", token = "<image>", patch = 14, merge = 2 }\n')
    image = load_recipe(child).model.image
    assert image is not None and image.count is None and (image.patch, image.merge) == (14, 2)
    # Other tables still merge key by key: the base's tokenizer stays.
    assert load_recipe(child).model.tokenizer == load_recipe(folder / "r.toml").model.tokenizer


def test_extends_names_the_files_of_a_table_set_in_part(folder):
    """A child that switches lengthen.rephrase to templates keeps the base's prompt: the
    problem says the prompt came from the base and the method from the child."""
    write(folder, lengthen(BASE))
    (folder / "d.toml").write_text('extends = "r.toml"\n[lengthen.rephrase]\nmethod = "template"\ntemplates = ["It is {answer}."]\n')
    with pytest.raises(RecipeError) as e:
        load_recipe(folder / "d.toml")
    [problem] = e.value.problems
    assert problem.startswith("lengthen.rephrase.prompt: method \"template\" takes templates or pool, not a prompt")
    assert "lengthen.rephrase merges keys of two files: model, prompt from r.toml, method, templates from d.toml" in problem
    # A source set in part: its index in the merged recipe, its own keys from each file.
    write(folder, BASE)
    (folder / "e.toml").write_text('extends = "r.toml"\n[[source]]\nname = "vqa"\nlayout = "caption"\n'
                                   'short_answer = "word"\nfields = { caption = "answers[0]" }\n')
    with pytest.raises(RecipeError) as e:
        load_recipe(folder / "e.toml")
    [problem] = e.value.problems
    assert problem.startswith("source[1].short_answer: only applies to the 'qa' layout")
    assert ("source[1] merges keys of two files: path, instructions, image_root from r.toml, "
            "name, layout, short_answer, fields from e.toml") in problem
    # A key the child sets again is the child's.
    write(folder, lengthen(BASE))
    (folder / "f.toml").write_text('extends = "r.toml"\n[lengthen.rephrase]\nmethod = "template"\ntemplates = ["{answer}."]\nprompt = "x"\n')
    with pytest.raises(RecipeError) as e:
        load_recipe(folder / "f.toml")
    assert "keys of two files: model from r.toml, method, templates, prompt from f.toml" in str(e.value)


def test_every_value_outside_its_choices_is_named_with_the_choices(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(f'extends = "{DEMO}"\n[model]\ntokenizer_engine = "fst"\n[output]\npacking = "tigth"\ntrain_on = "everything"\n')
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    text = str(e.value)
    assert "3 problems" in text
    assert "model.tokenizer_engine: 'fst' is not one of: auto, hf, fast (did you mean 'fast'?)" in text
    assert "output.packing: 'tigth' is not one of: tight, bfd, none (did you mean 'tight'?)" in text
    assert "output.train_on: 'everything' is not one of: assistant, last_assistant, all" in text
