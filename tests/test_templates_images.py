"""Built-in chat templates against Jinja2 itself, image tokens (fixed, dynamic, wrapped),
placeholder checks, over-long conversations split at turns, and `recipe preview`."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import DEMO, MODEL, RECIPES, small_recipe
from hypothesis import given
from jinja2.sandbox import ImmutableSandboxedEnvironment
from strategies import conversations

from mmrecipe import DataError, _core, build
from mmrecipe.encode import ChatEncoder
from mmrecipe.recipe import ImageSpec

IMAGE_ID = 49152
CONV_SOURCE = 'name = "conv"\npath = "c.json"\nlayout = "conversation"'
_ENCODERS: dict = {}


def encoder(name: str) -> ChatEncoder:
    return _ENCODERS.setdefault(name, ChatEncoder(MODEL, chat_template=name))


def jinja_render(source: str, messages, bos="<|im_start|>", eos="<|im_end|>") -> str:
    """Render as transformers does: a sandboxed Jinja2 with trim_blocks and lstrip_blocks."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(source).render(messages=messages, bos_token=bos, eos_token=eos, add_generation_prompt=False)


@pytest.mark.parametrize("name", ["chatml", "llama3", "vicuna", "alpaca", "plain"])
@given(msgs=conversations())
def test_builtin_templates_render_like_jinja2(name, msgs):
    got = encoder(name).encode([msgs])[0]
    assert got.text == jinja_render(_core.builtin_template(name), msgs)
    # Something is trained unless every response is blank (llama3's <|eot_id|> is no
    # special token in this vocabulary, so there is no end-of-turn token to train then).
    assert got.loss_mask.any() or all(not m["content"].strip() for m in msgs if m["role"] == "assistant")


def test_models_own_template_renders_like_jinja2():
    source = (MODEL / "chat_template.jinja").read_text()
    msgs = [{"role": "user", "content": " Hi "}, {"role": "assistant", "content": "Hello\n"}]
    assert encoder("model").encode([msgs])[0].text == jinja_render(source, msgs)


def smart_resize(h: int, w: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280):
    """Qwen2-VL's rule, transcribed from its image processor."""
    h_bar = max(factor, round(h / factor) * factor)
    w_bar = max(factor, round(w / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((h * w) / max_pixels)
        h_bar = max(factor, math.floor(h / beta / factor) * factor)
        w_bar = max(factor, math.floor(w / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        h_bar = math.ceil(h * beta / factor) * factor
        w_bar = math.ceil(w * beta / factor) * factor
    return h_bar, w_bar


def test_dynamic_image_tokens_follow_qwen2_vl(tmp_path):
    from PIL import Image

    text = DEMO.read_text().replace('count = 64 }', "patch = 14, merge = 2, min_pixels = 3136, max_pixels = 50176 }")
    text = text.replace('"models/smollm2"', f'"{MODEL}"').replace('"demo/data', f'"{RECIPES}/demo/data')
    recipe = tmp_path / "dyn.toml"
    recipe.write_text(text)
    out = build(recipe, tmp_path / "out", progress=False).path
    root = RECIPES / "demo" / "data"
    seen = 0
    for shard in sorted((out / "data").glob("*.parquet")):
        for row in pq.read_table(shard).to_pylist():
            ids = np.array(row["input_ids"])
            assert (ids == IMAGE_ID).sum() == sum(row["image_lengths"])
            for path, n in zip(row["image_paths"], row["image_lengths"]):
                w, h = Image.open(root / path).size
                hb, wb = smart_resize(h, w, max_pixels=50176)
                assert n == (hb // 14) * (wb // 14) // 4 == _core.image_token_count(w, h, max_pixels=50176)
                seen += 1
    assert seen > 100


def test_image_wrappers_and_placeholder_checks():
    spec = ImageSpec(placeholder="<image>", token="<image>", count=3, start="<repo_name>", end="<file_sep>")
    enc = ChatEncoder(MODEL, image=spec)
    start, end = enc.token_id("<repo_name>"), enc.token_id("<file_sep>")
    msgs = [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "A cat."}]
    got = enc.encode([msgs], image_counts=[[3]])[0]
    (pos, n), = got.image_runs
    assert n == 3 and got.input_ids[pos - 1] == start and got.input_ids[pos + n] == end
    assert (got.input_ids[pos : pos + n] == IMAGE_ID).all() and not got.loss_mask[pos - 1 : pos + n + 1].any()
    from mmrecipe import TemplateError

    with pytest.raises(TemplateError, match="more .<image>. placeholders than the sample has images"):
        enc.encode([[{"role": "user", "content": "<image><image> x"}, msgs[1]]], image_counts=[[3]])


def test_placeholder_mismatch_names_source_and_row(tmp_path):
    from PIL import Image

    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    rows = [
        {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "ok"}]},
        {"image": "a.png", "conversations": [{"from": "human", "value": "<image> and <image>"}, {"from": "gpt", "value": "two?"}]},
    ]
    (tmp_path / "c.json").write_text(json.dumps(rows))
    (tmp_path / "r.toml").write_text(small_recipe(CONV_SOURCE, model="image = { count = 4 }"))
    with pytest.raises(DataError) as e:
        build(tmp_path / "r.toml", tmp_path / "out", progress=False)
    assert (e.value.source, e.value.row, e.value.field) == ("conv", 1, "messages")
    assert "placeholders than the sample has images" in str(e.value)


def test_split_turns_keeps_the_image_in_every_part(tmp_path):
    from PIL import Image

    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    turns = [{"from": "human", "value": "<image>\nDescribe."}]
    for k in range(6):
        turns += [{"from": "gpt", "value": f"Answer {k}: " + "detail " * 40}, {"from": "human", "value": f"More {k}?"}]
    turns.append({"from": "gpt", "value": "Done."})
    (tmp_path / "c.json").write_text(json.dumps([{"image": "a.png", "conversations": turns}]))
    (tmp_path / "r.toml").write_text(
        small_recipe(CONV_SOURCE, model="image = { count = 16 }", output='seq_len = 200\noverlong = "split_turns"')
    )
    out = build(tmp_path / "r.toml", tmp_path / "out", progress=False)
    rows = [r for s in sorted((out.path / "data").glob("*.parquet")) for r in pq.read_table(s).to_pylist()]
    parts = sorted(p for r in rows for p in r["segment_part"])
    assert len(parts) >= 3 and parts == list(range(len(parts)))
    for r in rows:
        assert len(r["input_ids"]) <= 200
        assert sum(r["image_lengths"]) == 16 * len(r["segment_part"])


def test_preview_terminal_and_html(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mmrecipe", "preview", str(DEMO), "-n", "1", "--source", "vqa", "--no-color"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "vqa row 0 · template" in r.stdout and "«" in r.stdout and "<image> × 64 tokens" in r.stdout
    page = tmp_path / "p.html"
    r = subprocess.run([sys.executable, "-m", "mmrecipe", "preview", str(DEMO), "-n", "2", "--html", str(page)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    html = page.read_text()
    assert html.count("<span class=trained>") >= 8 and "llava row" in html
    bad = subprocess.run([sys.executable, "-m", "mmrecipe", "preview", str(DEMO), "--source", "nope"], capture_output=True, text=True)
    assert bad.returncode == 1 and "no source named 'nope'" in bad.stderr


GRID_RULE = 'image = { placeholder = "<image>", token = "<image>", patch = 14, merge = 2, min_pixels = 3136, max_pixels = 50176 }'


def test_recorded_grids_equal_the_qwen2_vl_processor_on_upright_images(tmp_path):
    """Each image's (t, h, w) in the release is what transformers' Qwen2-VL processor gives
    the image as the loader opens it (EXIF orientation applied), for JPEG, PNG and WebP
    files turned by 90° (orientations 5-8: the grid transposed) or not."""
    from PIL import Image, ImageOps
    from transformers import Qwen2VLImageProcessor

    rows, expected = [], []
    sizes = [(300, 120), (97, 411), (640, 480), (57, 57), (1000, 90)]
    for k, (w, h) in enumerate(sizes):
        for fmt in ("jpeg", "png", "webp"):
            for orientation in (1, 6, 3, 8):
                name = f"i{k}-{orientation}.{fmt}"
                exif = Image.Exif()
                exif[0x0112] = orientation
                Image.new("RGB", (w, h), (k * 40, 90, 200)).save(tmp_path / name, exif=exif.tobytes())
                rows.append({"question": "What is it?", "answer": "A square.", "image": name})
                expected.append(ImageOps.exif_transpose(Image.open(tmp_path / name)).convert("RGB"))
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = ('name = "q"\npath = "q.jsonl"\nlayout = "qa"\nimage_root = "."\n'
              'fields = { question = "question", answer = "answer", image = "image" }')
    recipe = tmp_path / "r.toml"
    recipe.write_text(small_recipe(source, GRID_RULE, "seq_len = 1024\npacking = \"none\""))
    out = build(recipe, tmp_path / "out", progress=False).path
    processor = Qwen2VLImageProcessor(patch_size=14, merge_size=2, min_pixels=3136, max_pixels=50176)
    reference = {r["image"]: img for r, img in zip(rows, expected)}
    seen = 0
    for shard in sorted((out / "data").glob("*.parquet")):
        for row in pq.read_table(shard).to_pylist():
            for path, n, t, h, w in zip(row["image_paths"], row["image_lengths"], row["image_grid_t"],
                                        row["image_grid_h"], row["image_grid_w"]):
                thw = processor(images=[reference[path]], return_tensors="np")["image_grid_thw"][0].tolist()
                assert [t, h, w] == thw, path
                assert n == t * h * w // 4
                seen += 1
    assert seen == len(rows)
    assert any(r["image"].endswith(("-6.png", "-8.webp")) for r in rows)  # turned images of each format were built
