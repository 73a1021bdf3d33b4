"""[[generate]]: conversations written from symbolic image context and seed examples,
parsed and validated, cached, and mixed like any other source."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import small_recipe
from hypothesis import given
from hypothesis import strategies as st
from llm_stub import Stub

from mmrecipe import LLMError, SourceError, build, load_recipe
from mmrecipe.llm import replies
from mmrecipe.builder import normalize_source
from mmrecipe.recipe import resolve
from mmrecipe.sources.columns import CONTENTS, IMAGES, ROLES, ROW
from mmrecipe.llm.stages import LLMStages

CONTEXTS = [
    {"image": f"img{i}.png", "captions": [f"caption {i} one", f"caption {i} two"], "boxes": [{"label": "dog", "bbox": [i, 2, 3, 4]}]}
    for i in range(6)
]
SEEDS = [
    {"context": "Captions:\nA bus.", "conversation": [{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "A red bus."}]},
    {"context": "Captions:\nTwo dogs.", "reply": "Question: How many dogs?\nAnswer: Two."},
]


@pytest.fixture
def stub():
    s = Stub().start()
    yield s
    s.stop()


def qa_reply(prompt: str, attempt: int) -> str:
    """A two-exchange conversation about the context; context 3 gets prose, not turns."""
    first = prompt.splitlines()[1]
    if "caption 3" in first:
        return "I cannot write a conversation about this."
    return f"Sure, here it is.\nQuestion: What does it show?\nAnswer: {first}.\n===\nQuestion: Any dog?\nAnswer: Yes,\none dog."


def generate_recipe(folder: Path, stub: Stub, extra: str = "") -> Path:
    from PIL import Image

    for c in CONTEXTS:
        Image.new("RGB", (8, 8)).save(folder / c["image"])
    (folder / "ctx.jsonl").write_text("".join(json.dumps(c) + "\n" for c in CONTEXTS))
    (folder / "seeds.jsonl").write_text("".join(json.dumps(s) + "\n" for s in SEEDS))
    (folder / "chat.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}) + "\n")
    keys = {"name": '"convs"', "path": '"ctx.jsonl"', "fields": '{ image = "image", caption = "captions", boxes = "boxes" }',
            "context": '"Captions:\\n{caption}\\nObjects:\\n{boxes}"', "seeds": '"seeds.jsonl"', "system": '"Write a conversation."',
            "endpoint": f'"{stub.url}"', "model": '"stub"', "backoff": "0", "retries": "1", "timeout": "5"}
    keys.update(line.split(" = ", 1) for line in extra.splitlines() if line.strip())
    body = 'name = "chat"\npath = "chat.jsonl"\nlayout = "conversation"\n\n[[generate]]\n' + "".join(f"{k} = {v}\n" for k, v in keys.items())
    path = folder / "r.toml"
    path.write_text(small_recipe(body, model='image = { placeholder = "<image>", token = "<image>", count = 4 }', output="seq_len = 512"))
    return path


def generated(path: Path, mode: str = "online") -> list[tuple[int, list[int], list[str], list[str]]]:
    plan = resolve(load_recipe(path))
    with LLMStages(plan, mode=mode, progress=False) as stages:
        norm = normalize_source(plan, 1, stages)
    return list(norm.frame.select(ROW, ROLES, CONTENTS, IMAGES).iter_rows())


def test_conversations_from_context_and_seeds(tmp_path, stub):
    stub.behave = qa_reply
    rows = generated(generate_recipe(tmp_path, stub))
    # Context 3 got a reply that is no conversation: dropped.
    assert [r[0] for r in rows] == [0, 1, 2, 4, 5]
    row, roles, contents, images = rows[1]
    assert roles == [1, 2, 1, 2]
    assert contents == ["What does it show?", "caption 1 one.", "Any dog?", "Yes,\none dog."]
    assert images == ["img1.png"]
    # Each call: system prompt, the seed examples as earlier turns, then this context.
    messages = stub.requests[0]["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert messages[2]["content"] == "Question: What is it?\n\nAnswer: A red bus."
    assert messages[4]["content"] == "Question: How many dogs?\nAnswer: Two."
    assert {m["messages"][-1]["content"] for m in stub.requests} == {
        f'Captions:\ncaption {i} one\ncaption {i} two\nObjects:\n{{"label":"dog","bbox":[{i},2,3,4]}}' for i in range(6)
    }


def test_context_from_a_json_file_under_a_key(tmp_path, stub):
    stub.behave = qa_reply
    path = generate_recipe(tmp_path, stub, extra='path = "ctx.json"\njson_key = "images"')
    (tmp_path / "ctx.json").write_text(json.dumps({"info": {}, "images": CONTEXTS}))
    assert [r[0] for r in generated(path)] == [0, 1, 2, 4, 5]


def test_generated_source_builds_mixes_and_rebuilds_offline(tmp_path, stub):
    stub.behave = qa_reply
    path = generate_recipe(tmp_path, stub, extra="conversations = 2\nweight = 3")
    first = build(path, tmp_path / "a", progress=False)
    assert first.llm["generate.convs"] == {"rows": 12, "cached": 0, "called": 12, "failed": 0, "missing": 0}
    stats = json.loads((tmp_path / "a" / "stats.json").read_text())
    convs = stats["sources"][1]
    assert convs["name"] == "convs" and convs["rows"] == 10
    assert convs["notes"] == [
        "generate.convs: 10 conversations from 12 calls, 2 malformed replies dropped "
        "(first: row 3: 0 question-answer pairs, fewer than min_turns = 1)"
    ]
    # Two conversations per context, with different seeds, numbered row × 2 + k.
    assert sorted({r["seed"] for r in stub.requests}) == [0, 1]
    assert [r[0] for r in generated(path, mode="offline")] == [0, 1, 2, 3, 4, 5, 8, 9, 10, 11]
    roles = {i.role for i in first.manifest.inputs}
    assert {"cache:generate.convs", "seeds:generate.convs", "source:convs"} <= roles
    # The [[generate]] table is in the recipe; the source it becomes is not repeated.
    assert [s["name"] for s in first.manifest.recipe["source"]] == ["chat"]
    stub.stop()
    build(path, tmp_path / "b", progress=False, offline=True)
    for f in ("manifest.json", "stats.json", "data/part-00000.parquet"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_json_replies_and_failed_calls(tmp_path, stub):
    def reply(prompt: str, attempt: int) -> str:
        if "caption 2" in prompt:
            return "500"
        if "caption 4" in prompt:
            return '```json\n[{"question": "Q?", "answer": ""}]\n```'  # an empty answer: malformed
        return '```json\n[{"question": "What is shown?", "answer": "A dog."}]\n```'

    stub.behave = reply
    path = generate_recipe(tmp_path, stub, extra='reply = "json"')
    rows = generated(path)
    assert [r[0] for r in rows] == [0, 1, 3, 5]
    assert rows[0][2] == ["What is shown?", "A dog."]
    # Seed examples are shown in the reply format.
    assert json.loads(stub.requests[0]["messages"][2]["content"]) == [{"question": "What is it?", "answer": "A red bus."}]
    with pytest.raises(LLMError, match=r"generate\[0\]: .*source 'convs', row 2 failed: HTTP 500.*on_error = \"fail\"; \"drop\" would"):
        generated(generate_recipe(tmp_path, stub, extra='reply = "json"\non_error = "fail"\nseed = 9'))


def test_seed_file_errors_name_the_line(tmp_path, stub):
    path = generate_recipe(tmp_path, stub)
    (tmp_path / "seeds.jsonl").write_text(json.dumps(SEEDS[0]) + "\n" + '{"context": "x", "conversation": [{"from": "gpt", "value": "a"}]}\n')
    with pytest.raises(SourceError, match=r"generate\[0\].seeds: .*seeds.jsonl, line 2: a seed conversation alternates"):
        generated(path)
    (tmp_path / "seeds.jsonl").write_text('{"context": "x"}\n')
    with pytest.raises(SourceError, match=r"line 1: give one of conversation"):
        generated(path)


def test_preview_mode_makes_no_calls(tmp_path, stub):
    stub.behave = qa_reply
    path = generate_recipe(tmp_path, stub)
    assert generated(path, mode="cache") == []
    assert stub.requests == []


# Text that cannot be read as a turn marker or a separator line (a stricter test than the
# parser's own patterns).
LOOKS_LIKE_MARKUP = re.compile(r"(?i)^\s*(\*\*|##|={3}|-{3}|(question|answer|q|a|user|human|assistant|gpt)\b)")
turn_text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=40).filter(
    lambda t: t.strip() == t and not LOOKS_LIKE_MARKUP.match(t)
)
conversation = st.lists(st.tuples(turn_text, turn_text), min_size=1, max_size=5).map(
    lambda pairs: [turn for q, a in pairs for turn in (("user", q), ("assistant", a))]
)


@given(conversation, st.sampled_from(["qa", "json"]))
def test_reply_formats_round_trip(turns, fmt):
    assert replies.parse(replies.render(turns, fmt), fmt, min_turns=1) == turns


@given(conversation)
def test_truncated_reply_loses_its_last_exchange(turns):
    text = replies.render(turns, "qa")
    if len(turns) > 2:
        assert replies.parse(text, "qa", min_turns=1, truncated=True) == turns[:-2]
    else:
        with pytest.raises(replies.Malformed, match="fewer than min_turns"):
            replies.parse(text, "qa", min_turns=1, truncated=True)


@pytest.mark.parametrize("text,why", [
    ("Answer: first\nQuestion: then", "turn 1 is an answer"),
    ("Question: a\nQuestion: b\nAnswer: c", "turn 2 is a question"),
    ("Question: a\nAnswer:   ", "turn 2 is empty"),
    ("no turns at all", "0 question-answer pairs"),
])
def test_malformed_qa_replies(text, why):
    with pytest.raises(replies.Malformed, match=why):
        replies.parse(text, "qa", min_turns=1)


# The "qa" format defined independently, as the regular expressions it was first written
# with; the core matches markers by hand and must read every reply the same way.
REF_MARKER = re.compile(r"^\s*(?:\*\*|##\s*)?(question|answer|q|a|user|human|assistant|gpt)\s*(?:\*\*)?\s*:\s*(?:\*\*)?\s?(.*)$", re.I)
REF_SEPARATOR = re.compile(r"^\s*(?:={3,}|-{3,})\s*$")


def reference_parse(text: str) -> list[tuple[str, str]] | None:
    turns: list[list[str]] = []
    for line in text.split("\n"):
        m = REF_MARKER.match(line)
        if m:
            turns.append(["user" if m.group(1).lower() in ("question", "q", "user", "human") else "assistant", m.group(2)])
        elif turns and not REF_SEPARATOR.match(line):
            turns[-1][1] += "\n" + line
    out = [(role, content.strip()) for role, content in turns]
    if out and out[-1][0] == "user":
        out.pop()
    alternating = all(role == ("user" if i % 2 == 0 else "assistant") and content for i, (role, content) in enumerate(out))
    return out if len(out) // 2 >= 1 and alternating else None


marker_line = st.tuples(
    st.sampled_from(["", " ", "**", "## ", "##"]),
    st.sampled_from(["Question", "answer", "Q", "a", "User", "HUMAN", "gpt", "Assistant", "Questions", "Qué", "A1"]),
    st.sampled_from(["", " ", "**", " **"]),
    st.sampled_from([":", "", ";"]),
    st.sampled_from(["", " ", "**", " ** ", "  "]),
    st.text(alphabet=" abé*:=-", max_size=8),
).map("".join)
reply_line = st.one_of(marker_line, st.sampled_from(["===", "---", " ==== ", "==", "-=-", ""]), st.text(alphabet=" ab:*=-é#", max_size=10))


@given(st.lists(reply_line, max_size=10).map("\n".join))
def test_qa_parser_reads_replies_as_the_reference_does(text):
    try:
        got = replies.parse(text, "qa", min_turns=1)
    except replies.Malformed:
        got = None
    assert got == reference_parse(text)
