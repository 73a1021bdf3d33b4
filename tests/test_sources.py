"""Source readers: joins (VQAv2, COCO captions), grouping questions by image, and the
image checks of `recipe check`."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from conftest import MODEL

from mmrecipe import DataError, RecipeError, SourceError, load_recipe
from mmrecipe.check import SAMPLE_IMAGES, check
from mmrecipe.cli import main
from mmrecipe.builder import normalize_source as normalize
from mmrecipe.sources.columns import ASSISTANT, CONTENTS, IMAGES, ROLES, ROW, USER

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "data"
VQAV2 = FIXTURES / "vqav2"
COCO = FIXTURES / "coco"


def recipe_file(folder: Path, *sources: str, extra: str = "") -> Path:
    """A recipe in `folder` with the bundled tokenizer and the given [[source]] bodies."""
    text = f"""
        [recipe]
        name = "t"

        [model]
        tokenizer = "{MODEL}"
        image = {{ count = 4 }}
        {extra}
    """
    text = textwrap.dedent(text) + "".join("\n[[source]]\n" + textwrap.dedent(s) for s in sources)
    path = folder / "r.toml"
    path.write_text(text)
    return path


VQAV2_SOURCE = f"""
    name = "vqav2"
    path = "{VQAV2 / 'v2_OpenEnded_mscoco_train2014_questions.json'}"
    json_key = "questions"
    join = {{ path = "{VQAV2 / 'v2_mscoco_train2014_annotations.json'}", json_key = "annotations", left_on = "question_id", right_on = "question_id" }}
    layout = "qa"
    fields = {{ image = "{{image_id:012}}.jpg", question = "question", answer = "most_common(answers[*].answer)" }}
    image_root = "{COCO / 'train2017'}"
"""

COCO_SOURCE = f"""
    name = "captions"
    path = "{COCO / 'annotations' / 'captions_train2017.json'}"
    json_key = "annotations"
    join = {{ json_key = "images", left_on = "image_id", right_on = "id" }}
    layout = "caption"
    fields = {{ image = "file_name", caption = "caption" }}
    image_root = "{COCO / 'train2017'}"
"""


def fixture_json(path: Path, key: str) -> list[dict]:
    return json.loads(path.read_text())[key]


def norm(path: Path, index: int = 0):
    return normalize(load_recipe(path), index)


# --- joins ---------------------------------------------------------------------------------


def test_vqav2_questions_join_their_annotations(tmp_path):
    n = norm(recipe_file(tmp_path, VQAV2_SOURCE))
    questions = fixture_json(VQAV2 / "v2_OpenEnded_mscoco_train2014_questions.json", "questions")
    by_id = {a["question_id"]: a for a in fixture_json(VQAV2 / "v2_mscoco_train2014_annotations.json", "annotations")}
    frame = n.frame
    assert frame[ROW].to_list() == list(range(len(questions)))  # rows in question order
    assert [c[0] for c in frame[CONTENTS].to_list()] == [q["question"] for q in questions]
    # The annotations file lists the records in another order: answers follow the key.
    assert [c[1] for c in frame[CONTENTS].to_list()] == [by_id[q["question_id"]]["multiple_choice_answer"] for q in questions]
    assert frame[IMAGES].to_list() == [[f"{q['image_id']:012d}.jpg"] for q in questions]
    assert [f.name for f in n.source.all_files] == ["v2_OpenEnded_mscoco_train2014_questions.json", "v2_mscoco_train2014_annotations.json"]


def test_coco_captions_join_their_image_records_in_the_same_file(tmp_path):
    n = norm(recipe_file(tmp_path, COCO_SOURCE))
    data = json.loads((COCO / "annotations" / "captions_train2017.json").read_text())
    names = {im["id"]: im["file_name"] for im in data["images"]}
    assert n.frame[IMAGES].to_list() == [[names[a["image_id"]]] for a in data["annotations"]]
    assert [c[1] for c in n.frame[CONTENTS].to_list()] == [a["caption"] for a in data["annotations"]]
    assert len(n.source.all_files) == 1


def write_pair(folder: Path, questions: list[dict], annotations: list[dict]) -> None:
    (folder / "q.json").write_text(json.dumps({"questions": questions}))
    (folder / "a.json").write_text(json.dumps({"annotations": annotations}))


PAIR_SOURCE = """
    name = "pair"
    path = "q.json"
    json_key = "questions"
    join = { path = "a.json", json_key = "annotations", left_on = "qid", right_on = "qid" }
    layout = "qa"
    fields = { question = "question", answer = "answer" }
"""


def test_rows_without_a_match_fail_or_are_skipped(tmp_path):
    questions = [{"qid": i, "question": f"q{i}"} for i in range(4)]
    write_pair(tmp_path, questions, [{"qid": 0, "answer": "a0"}, {"qid": 3, "answer": "a3"}])
    with pytest.raises(DataError, match=r"source 'pair', row 1, field 'qid': no record in a\.json with qid = 1 \(2 of 4 rows") as e:
        norm(recipe_file(tmp_path, PAIR_SOURCE))
    assert (e.value.source, e.value.row, e.value.field) == ("pair", 1, "qid")
    assert 'on_error = "skip"' in str(e.value)
    n = norm(recipe_file(tmp_path, PAIR_SOURCE + 'on_error = "skip"\n'))
    assert n.frame[ROW].to_list() == [0, 3]  # row ids still count the rows of the file
    assert n.notes and "2 of 4 rows have no record in a.json" in n.notes[0]
    assert check(recipe_file(tmp_path, PAIR_SOURCE + 'on_error = "skip"\n'), images="none").warnings == n.notes


def test_join_keys_of_different_types_match_as_text(tmp_path):
    write_pair(tmp_path, [{"qid": "7", "question": "q"}], [{"qid": 7, "answer": "a"}])
    assert norm(recipe_file(tmp_path, PAIR_SOURCE)).frame[CONTENTS].to_list() == [["q", "a"]]


@pytest.mark.parametrize(
    "change,error,message",
    [
        (lambda s: s.replace('left_on = "qid"', 'left_on = "id"'), SourceError, r"source\[0\]\.join\.left_on: source 'pair' has no column 'id'"),
        (lambda s: s.replace('right_on = "qid"', 'right_on = "qud"'), SourceError, r"source\[0\]\.join\.right_on: a\.json has no column 'qud'"),
        (lambda s: s.replace('path = "a.json"', 'path = "b.json"'), SourceError, r"source\[0\]\.join\.path\): file not found"),
        (lambda s: s.replace('json_key = "annotations"', 'json_key = "anns"'), SourceError, "has no top-level key 'anns'"),
        (lambda s: s.replace('path = "q.json"', 'path = "*.json"').replace('path = "a.json", ', ""), RecipeError, r"source\[0\]\.join\.path: .* reads several files"),
        (lambda s: s.replace("left_on", "left"), RecipeError, r"source\[0\]\.join\.left: unknown key \(did you mean 'left_on'\?\)"),
    ],
    ids=["left_on", "right_on", "join file", "json_key", "glob without join.path", "typo"],
)
def test_join_problems_name_the_key(tmp_path, change, error, message):
    write_pair(tmp_path, [{"qid": 1, "question": "q"}], [{"qid": 1, "answer": "a"}])
    with pytest.raises(error, match=message):
        norm(recipe_file(tmp_path, change(PAIR_SOURCE)))


def test_a_joined_key_must_be_unique(tmp_path):
    write_pair(tmp_path, [{"qid": 1, "question": "q"}], [{"qid": 1, "answer": "a"}, {"qid": 1, "answer": "b"}])
    with pytest.raises(SourceError, match=r"join\.right_on: 'qid' = 1 appears 2 times in a\.json"):
        norm(recipe_file(tmp_path, PAIR_SOURCE))


# --- group_by = "image" ----------------------------------------------------------------------


def test_vqav2_grouped_by_image_keeps_the_order_of_the_rows(tmp_path):
    n = norm(recipe_file(tmp_path, VQAV2_SOURCE + 'group_by = "image"\n'))
    questions = fixture_json(VQAV2 / "v2_OpenEnded_mscoco_train2014_questions.json", "questions")
    firsts: dict[int, int] = {}
    for row, q in enumerate(questions):
        firsts.setdefault(q["image_id"], row)
    frame = n.frame
    assert frame[ROW].to_list() == sorted(firsts.values())  # one row per image, its first row
    assert frame[IMAGES].to_list() == [[f"{i:012d}.jpg"] for i in firsts]
    for image_id, turns, roles in zip(firsts, frame[CONTENTS].to_list(), frame[ROLES].to_list()):
        asked = [q["question"] for q in questions if q["image_id"] == image_id]
        assert turns[0::2] == asked  # the questions in their original order
        assert roles == [USER, ASSISTANT] * len(asked)


def test_group_by_on_interleaved_rows(tmp_path):
    rows = [("b", "q0"), ("a", "q1"), ("b", "q2"), ("c", "q3"), ("a", "q4"), ("b", "q5")]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps({"img": i, "q": q, "a": q.upper()}) + "\n" for i, q in rows))
    source = 'name = "g"\npath = "qa.jsonl"\nlayout = "qa"\nfields = { image = "img", question = "q", answer = "a" }\ngroup_by = "image"\n'
    frame = norm(recipe_file(tmp_path, source)).frame
    assert frame[ROW].to_list() == [0, 1, 3]
    assert frame[CONTENTS].to_list() == [["q0", "Q0", "q2", "Q2", "q5", "Q5"], ["q1", "Q1", "q4", "Q4"], ["q3", "Q3"]]
    assert frame[IMAGES].to_list() == [["b"], ["a"], ["c"]]
    (tmp_path / "qa.jsonl").write_text('{"img": "a", "q": "x", "a": "y"}\n{"img": null, "q": "x", "a": "y"}\n')
    with pytest.raises(DataError, match=r"source 'g', row 1, field 'image': missing value \(img\)") as e:
        norm(recipe_file(tmp_path, source))
    assert (e.value.source, e.value.row, e.value.field) == ("g", 1, "image")


@pytest.mark.parametrize("layout,fields", [
    ("qa", 'fields = { question = "q", answer = "a" }'),
    ("caption", 'fields = { caption = "a" }'),
])
def test_skip_drops_rows_without_a_value_and_counts_them(tmp_path, layout, fields):
    rows = [{"q": "x0", "a": "y0"}, {"q": "x1", "a": None}, {"q": "x2", "a": "y2"}, {"q": "x3"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = f'name = "s"\npath = "d.jsonl"\nlayout = "{layout}"\n{fields}\n'
    with pytest.raises(DataError, match=r"row 1, field '(answer|caption)': missing value"):
        norm(recipe_file(tmp_path, source))
    skipped = norm(recipe_file(tmp_path, source + 'on_error = "skip"\n'))
    assert skipped.frame[ROW].to_list() == [0, 2]
    assert any("2 rows without a value" in n and "first: row 1" in n for n in skipped.notes), skipped.notes


@pytest.mark.parametrize(
    "source,message",
    [
        ('layout = "caption"\nfields = { image = "i", caption = "c" }', "group_by: only applies to the 'qa' layout"),
        ('layout = "qa"\nfields = { question = "q", answer = "a" }', "group_by: grouping by image needs fields.image"),
        ('layout = "qa"\nfields = { image = "i", question = "q", answer = "a", options = "o" }', r"group_by: template fields \(options\) cannot be combined with group_by"),
    ],
)
def test_group_by_problems(tmp_path, source, message):
    with pytest.raises(RecipeError, match=r"source\[0\]\." + message):
        load_recipe(recipe_file(tmp_path, f'name = "g"\npath = "x.jsonl"\ngroup_by = "image"\n{source}\n'))


def test_grouped_source_builds_with_a_template_per_turn(tmp_path):
    from mmrecipe.preview import preview

    recipe = recipe_file(tmp_path, VQAV2_SOURCE + 'group_by = "image"\ninstructions = ["Q: {question}"]\nshort_answer = "word"\n')
    text = preview(recipe, n=1)[0].text
    assert text.count("Q: ") == 3 and text.count("single word or phrase") == 3


# --- recipe check --images -------------------------------------------------------------------


def image_source(folder: Path, names: list[str], on_error: str = "fail") -> Path:
    (folder / "qa.jsonl").write_text("".join(json.dumps({"image": n, "q": "q", "a": "a"}) + "\n" for n in names))
    return recipe_file(folder, f"""
        name = "imgs"
        path = "qa.jsonl"
        layout = "qa"
        fields = {{ image = "image", question = "q", answer = "a" }}
        on_error = "{on_error}"
    """)


def test_check_finds_missing_and_unreadable_images(tmp_path):
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    (tmp_path / "text.jpg").write_text("not an image")
    recipe = image_source(tmp_path, ["ok.png", "gone.jpg", "text.jpg", "ok.png"])
    with pytest.raises(DataError) as e:
        check(recipe)
    message = str(e.value)
    assert "source 'imgs': 2 of 4 checked images are unusable" in message
    assert "row 1, field 'image': gone.jpg: file not found" in message
    assert "row 2, field 'image': text.jpg: not an image PIL can read" in message
    assert (e.value.source, e.value.row, e.value.field) == ("imgs", 1, "image")
    report = check(image_source(tmp_path, ["ok.png", "gone.jpg", "text.jpg", "ok.png"], on_error="skip"))
    assert [(p.row, p.path) for p in report.images[0].problems] == [(1, "gone.jpg"), (2, "text.jpg")]
    assert len(report.warnings) == 1 and "the build skips these rows" in report.warnings[0]
    assert check(recipe, images="none").images == []


def test_check_samples_images_deterministically(tmp_path):
    names = [f"missing-{i}.png" for i in range(SAMPLE_IMAGES + 50)]
    recipe = image_source(tmp_path, names, on_error="skip")
    first = check(recipe).images[0]
    assert (first.total, first.checked, len(first.problems)) == (SAMPLE_IMAGES + 50, SAMPLE_IMAGES, SAMPLE_IMAGES)
    assert [p.row for p in check(recipe).images[0].problems] == [p.row for p in first.problems]
    assert first.problems[0].row == 0 and first.problems[-1].row > SAMPLE_IMAGES  # spread over all rows
    assert check(recipe, images="all").images[0].checked == SAMPLE_IMAGES + 50


def test_check_command_reports_images(tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    assert main(["check", str(image_source(tmp_path, ["ok.png", "ok.png"])), "--images", "all"]) == 0
    assert "2/2 ok" in capsys.readouterr().out
    assert main(["check", str(image_source(tmp_path, ["ok.png", "gone.png"]))]) == 1
    assert "gone.png: file not found" in capsys.readouterr().err
    assert main(["check", str(image_source(tmp_path, ["ok.png", "gone.png"], on_error="skip"))]) == 0
    assert "warning: source 'imgs': 1 of 2 checked images are unusable" in capsys.readouterr().err
    assert main(["check", str(image_source(tmp_path, ["gone.png"])), "--images", "none"]) == 0


def test_a_glob_reads_only_regular_files(tmp_path):
    import os

    (tmp_path / "a.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    (tmp_path / "sub.jsonl").mkdir()  # a folder the pattern names too: passed over
    assert len(norm(recipe_file(tmp_path, 'name = "c"\npath = "*.jsonl"\nlayout = "conversation"\n'))) == 1
    os.mkfifo(tmp_path / "b.jsonl")  # would block a reader forever
    with pytest.raises(SourceError, match=r"b.jsonl \(matched by '\*.jsonl'\) is not a regular file"):
        norm(recipe_file(tmp_path, 'name = "c"\npath = "*.jsonl"\nlayout = "conversation"\n'))


def test_json_key_naming_an_object_is_named(tmp_path):
    (tmp_path / "d.json").write_text('{"annotations": {"question": "q", "answer": "a"}}')
    source = 'name = "d"\npath = "d.json"\njson_key = "annotations"\nlayout = "qa"\nfields = { question = "question", answer = "answer" }\n'
    with pytest.raises(SourceError, match="'annotations' \\(json_key\\) is an object, not a list of records"):
        norm(recipe_file(tmp_path, source))
