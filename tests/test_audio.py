"""Audio: clip lengths from file headers against soundfile, token counts against
transformers' Whisper feature extractor and Qwen2-Audio's encoder formula, the <audio>
runs and masks in releases, ids against the HF tokenizer, bad clips, the shipped ASR
recipe and tokenizer, and audio features through the loader."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import RECIPES, ROOT, sources_moved
from hypothesis import given, settings
from hypothesis import strategies as st

from mmrecipe import DataError, RecipeError, build, load_recipe

sf = pytest.importorskip("soundfile")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer, WhisperFeatureExtractor  # noqa: E402
from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder  # noqa: E402

ASR = ROOT / "tests" / "fixtures" / "data" / "asr"
CLIPS = sorted((ASR / "clips").iterdir())
MODEL = RECIPES / "models" / "smollm2-audio"
WHISPER = "audio = { rule = \"whisper\" }"


def qwen2_audio_tokens(samples: int) -> int:
    """Tokens of a 16 kHz clip as transformers computes them: the Whisper feature
    extractor's attention mask (30 s window), then Qwen2-Audio's encoder lengths."""
    fe = WhisperFeatureExtractor()
    out = fe(np.zeros(samples, np.float32), sampling_rate=16_000, return_attention_mask=True, return_tensors="pt")
    frames = out["attention_mask"].sum(-1)
    return int(Qwen2AudioEncoder._get_feat_extract_output_lengths(None, frames)[1][0])


def recipe(folder: Path, source: str, model: str = WHISPER, output: str = "seq_len = 2048") -> Path:
    text = f'[recipe]\nname = "a"\n[model]\ntokenizer = "{MODEL}"\n{model}\n[output]\n{output}\n[[source]]\n{source}\n'
    (folder / "r.toml").write_text(text)
    return folder / "r.toml"


def manifest(folder: Path, paths: list[str], root: Path | None = None) -> str:
    """An asr source over clips `paths` (relative to `root`, default `folder`)."""
    with open(folder / "m.jsonl", "w") as f:
        for k, p in enumerate(paths):
            f.write(json.dumps({"audio": p, "text": f"clip number {k}"}) + "\n")
    at = f'\naudio_root = "{root}"' if root is not None else ""
    return f'name = "s"\npath = "{folder / "m.jsonl"}"\nlayout = "asr"\nfields = {{ audio = "audio", text = "text" }}{at}'


def release_rows(out: Path) -> list[dict]:
    rows = []
    for part in sorted((out / "data").glob("*.parquet")):
        rows += pq.read_table(part).to_pylist()
    return rows


def clips_of(out: Path) -> dict[str, tuple[int, int]]:
    """path -> (samples, tokens) of every clip in a release."""
    found = {}
    for row in release_rows(out):
        for p, n, length in zip(row["audio_paths"], row["audio_samples"], row["audio_lengths"]):
            found[p] = (n, length)
    return found


def expected_samples(path: Path, rate: int = 16_000) -> int:
    info = sf.info(path)
    return info.frames if info.samplerate == rate else math.ceil(info.frames * rate / info.samplerate)


# -- header lengths and token counts ---------------------------------------------------


def test_fixture_headers_and_tokens_match_soundfile_and_transformers(tmp_path):
    assert {p.suffix for p in CLIPS} == {".wav", ".flac"} and len(CLIPS) == 6
    out = tmp_path / "out"
    build(recipe(tmp_path, manifest(tmp_path, [p.name for p in CLIPS], CLIPS[0].parent)), out, progress=False)
    found = clips_of(out)
    assert len(found) == len(CLIPS)
    for path in CLIPS:
        samples, tokens = found[path.name]
        assert samples == expected_samples(path)
        assert tokens == qwen2_audio_tokens(samples) > 0


@settings(max_examples=15)
@given(st.lists(st.tuples(st.sampled_from([8_000, 11_025, 16_000, 22_050, 44_100, 48_000]),
                          st.integers(1, 2), st.floats(0.05, 40.0), st.sampled_from(["WAV", "FLAC"])),
                min_size=1, max_size=4))
def test_generated_clip_headers(clips):
    """Random rates, channels, lengths (some past the 30 s window, cut by long = "truncate")
    and containers: the header's length is soundfile's, the tokens transformers'."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = []
        for k, (rate, channels, seconds, fmt) in enumerate(clips):
            path = folder / f"c{k}.{fmt.lower()}"
            sf.write(path, np.zeros((max(1, int(rate * seconds)), channels), np.int16), rate, format=fmt, subtype="PCM_16")
            paths.append(path)
        model = 'audio = { rule = "whisper", long = "truncate" }'
        build(recipe(folder, manifest(folder, [p.name for p in paths]), model), folder / "out", progress=False, cache=False)
        found = clips_of(folder / "out")
        assert len(found) == len(paths)
        for path in paths:
            samples, tokens = found[path.name]
            assert samples == expected_samples(path)
            assert tokens == qwen2_audio_tokens(min(samples, 480_000))


def test_ogg_and_mp3_headers(tmp_path):
    """Ogg Vorbis, Ogg Opus (whose encoder delay the length leaves out) and MP3 as
    soundfile reads them (encoded by libsndfile)."""
    paths = []
    for name, fmt, sub, rate, n in (("v.ogg", "OGG", "VORBIS", 16_000, 24_000), ("o.ogg", "OGG", "OPUS", 48_000, 100_001),
                                    ("m.mp3", "MP3", "MPEG_LAYER_III", 16_000, 24_000)):
        try:
            noise = np.random.default_rng(n).standard_normal(n).astype(np.float32) * 0.1
            sf.write(tmp_path / name, noise, rate, format=fmt, subtype=sub)
        except Exception:  # noqa: BLE001 - a libsndfile built without the codec
            continue
        paths.append(tmp_path / name)
    if not paths:
        pytest.skip("libsndfile writes neither Ogg Vorbis nor MP3 here")
    build(recipe(tmp_path, manifest(tmp_path, [p.name for p in paths])), tmp_path / "out", progress=False)
    found = clips_of(tmp_path / "out")
    for path in paths:
        assert found[path.name][0] == expected_samples(path)


def test_fixed_count(tmp_path):
    build(recipe(tmp_path, manifest(tmp_path, [p.name for p in CLIPS], CLIPS[0].parent), "audio = { count = 7 }"), tmp_path / "out", progress=False)
    assert {tokens for _, tokens in clips_of(tmp_path / "out").values()} == {7}


# -- the release: runs, masks, ids -----------------------------------------------------


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """recipes/asr-alignment.toml built on the fixture (as tests/test_release_ids.py lays it out)."""
    folder = tmp_path_factory.mktemp("asr")
    shutil.copytree(RECIPES, folder / "recipes")
    shutil.copytree(ROOT / "tests" / "fixtures", folder / "fixtures")
    body = sources_moved(folder / "recipes" / "asr-alignment.toml", "../fixtures", 40)
    path = folder / "recipes" / "asr-alignment-fixtures.toml"
    path.write_text('extends = "asr-alignment.toml"\n' + body)
    result = build(path, folder / "out", progress=False, offline=True)
    return result, path


def test_audio_runs_and_masks(shipped):
    result, _ = shipped
    token = result.manifest.audio["token_id"]
    rows = release_rows(result.path)
    runs = 0
    for row in rows:
        ids, mask = np.array(row["input_ids"]), np.array(row["loss_mask"])
        is_audio = ids == token
        assert is_audio.sum() == sum(row["audio_lengths"])  # no audio token outside a recorded run
        ends = np.cumsum(row["segment_lengths"])
        for pos, n in zip(row["audio_positions"], row["audio_lengths"]):
            run = slice(pos, pos + n)
            assert n > 0 and is_audio[run].all() and not mask[run].any()
            assert pos == 0 or not is_audio[pos - 1]
            assert pos + n == len(ids) or not is_audio[pos + n]
            seg = int(np.searchsorted(ends, pos, side="right"))
            assert pos + n <= ends[seg]  # inside its segment: packing never cuts a run
            runs += 1
        assert mask.any()
    assert runs >= 40  # every sample has a clip; the conversations have one or two


def test_ids_equal_the_hf_tokenizer_with_the_runs_expanded(shipped):
    result, path = shipped
    plan_sources = load_recipe(path).source
    hf = AutoTokenizer.from_pretrained(MODEL)
    pool = __import__("tomllib").loads((ROOT / "python" / "mmrecipe" / "pools" / "asr.toml").read_text())["templates"]
    data = {
        "librispeech": [json.loads(line) for line in (ASR / "librispeech.jsonl").read_text().splitlines()],
        "common-voice": [line.split("\t") for line in (ASR / "validated.tsv").read_text().splitlines()[1:]],
        "audio-chat": [json.loads(line) for line in (ASR / "conversations.jsonl").read_text().splitlines()],
    }
    names = [s.name for s in plan_sources]
    checked = set()
    for row in release_rows(result.path):
        at, k = 0, 0
        for n, src, srow, tpl in zip(row["segment_lengths"], row["segment_source"], row["segment_row"], row["segment_template"]):
            ids = row["input_ids"][at : at + n]
            lengths = [length for p, length in zip(row["audio_positions"], row["audio_lengths"]) if at <= p < at + n]
            name = names[src]
            if name == "audio-chat":
                rec = data[name][srow]
                user, answer = rec["conversations"][0]["value"], rec["conversations"][1]["value"]
                for length in lengths:
                    user = user.replace("<audio>", "<|AUDIO|>" * length, 1)
            else:
                answer = data[name][srow]["text"] if name == "librispeech" else data[name][srow][2]
                user = "<|AUDIO|>" * lengths[0] + "\n" + pool[tpl]
            text = hf.apply_chat_template([{"role": "user", "content": user}, {"role": "assistant", "content": answer}], tokenize=False)
            assert ids == hf(text, add_special_tokens=False)["input_ids"], (name, srow)
            checked.add(name)
            at += n
            k += len(lengths)
    assert checked == set(names)


def test_manifest_records_the_rule_and_roots(shipped):
    result, _ = shipped
    m = result.manifest
    assert m.audio["token"] == "<|AUDIO|>" and m.audio["token_id"] == 49153 and m.audio["pool"] == 2
    assert set(m.audio_roots) == {"librispeech", "common-voice", "audio-chat"}
    assert m.audio_roots["common-voice"].endswith("fixtures/data/asr/clips")


def test_a_release_without_audio_has_no_audio_keys(demo_release):
    raw = json.loads((demo_release / "manifest.json").read_text())
    assert "audio" not in raw and "audio_roots" not in raw and "audio" not in raw["recipe"]["model"]
    assert all("audio_root" not in s for s in raw["recipe"]["source"])
    names = pq.read_schema(next((demo_release / "data").glob("*.parquet"))).names
    assert not [n for n in names if n.startswith("audio")]


def test_shipped_tokenizer_is_current(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_audio", RECIPES / "models" / "make_smollm2_audio.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write(tmp_path)
    for f in sorted(MODEL.iterdir()):
        assert (tmp_path / f.name).read_bytes() == f.read_bytes(), f.name
    assert AutoTokenizer.from_pretrained(MODEL).convert_tokens_to_ids("<|AUDIO|>") == 49153


# -- overlong samples: runs kept whole -------------------------------------------------


def test_truncation_never_cuts_a_run(tmp_path):
    rows = [{"audio": [CLIPS[0].name, CLIPS[1].name], "conversations": [
        {"from": "human", "value": "<audio> then <audio> " + "and more words " * k},
        {"from": "gpt", "value": "an answer " * 30}]} for k in range(12)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = f'name = "c"\npath = "{tmp_path / "c.jsonl"}"\nlayout = "conversation"\nfields = {{ audios = "audio" }}\naudio_root = "{ASR / "clips"}"'
    out = tmp_path / "out"
    result = build(recipe(tmp_path, source, output='seq_len = 200\noverlong = "truncate"'), out, progress=False)
    full = {p.name: qwen2_audio_tokens(expected_samples(p)) for p in CLIPS[:2]}
    token = result.manifest.audio["token_id"]
    seen = 0
    for row in release_rows(out):
        ids = np.array(row["input_ids"])
        assert (ids == token).sum() == sum(row["audio_lengths"])
        for p, n in zip(row["audio_paths"], row["audio_lengths"]):
            assert n == full[p]
            seen += 1
    assert result.summary["sources"][0]["truncated"] > 0 and seen > 0


# -- bad input -------------------------------------------------------------------------


@pytest.fixture
def bad_clips(tmp_path):
    sf.write(tmp_path / "ok.wav", np.zeros(16_000, np.int16), 16_000)
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x10\0\0\0WAVEjunkjunk")
    sf.write(tmp_path / "long.wav", np.zeros(16_000 * 31, np.int16), 16_000)
    sf.write(tmp_path / "a.aiff", np.zeros(8_000, np.int16), 8_000, format="AIFF")
    return tmp_path


@pytest.mark.parametrize("name, message", [
    ("corrupt.wav", "cannot read audio .*corrupt.wav: not a WAV, FLAC, Ogg or MP3 file"),
    ("long.wav", r"long.wav: the clip is 31.00 s long, more than the 30 s window .*long = \"truncate\""),
    ("a.aiff", "cannot read audio .*a.aiff: not a WAV, FLAC, Ogg or MP3 file the header reader knows"),
    ("missing.wav", "cannot read audio .*missing.wav"),
])
def test_bad_clips_name_file_and_row(bad_clips, name, message):
    source = manifest(bad_clips, ["ok.wav", name])
    with pytest.raises(DataError, match=message) as e:
        build(recipe(bad_clips, source), bad_clips / "out", progress=False)
    assert (e.value.source, e.value.row, e.value.field) == ("s", 1, "audio")


def test_bad_clips_are_counted_skips(bad_clips):
    source = manifest(bad_clips, ["ok.wav", "corrupt.wav", "long.wav", "a.aiff", "missing.wav", "ok.wav"])
    result = build(recipe(bad_clips, source + '\non_error = "skip"'), bad_clips / "out", progress=False)
    stats = result.summary["sources"][0]
    assert (stats["rows"], stats["skipped"], stats["usable"]) == (6, 4, 2)
    assert [e.split(",")[0] for e in stats["skipped_examples"]] == ["row 1", "row 2", "row 3", "row 4"]
    truncated = recipe(bad_clips, source + '\non_error = "skip"', 'audio = { rule = "whisper", long = "truncate" }')
    assert clips_of(build(truncated, bad_clips / "out2", progress=False).path)["long.wav"] == (496_000, 750)


def test_placeholder_and_clip_counts_must_agree(tmp_path):
    sf.write(tmp_path / "a.wav", np.zeros(16_000, np.int16), 16_000)
    rows = [
        {"audio": ["a.wav"], "conversations": [{"from": "human", "value": "<audio>\nhi"}, {"from": "gpt", "value": "ok"}]},
        {"audio": ["a.wav"], "conversations": [{"from": "human", "value": "<audio> and <audio>"}, {"from": "gpt", "value": "two?"}]},
    ]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = f'name = "c"\npath = "{tmp_path / "c.jsonl"}"\nlayout = "conversation"\nfields = {{ audios = "audio" }}'
    with pytest.raises(DataError, match="placeholders") as e:
        build(recipe(tmp_path, source), tmp_path / "out", progress=False)
    assert (e.value.source, e.value.row) == ("c", 1)


def test_path_escaping_the_audio_root(tmp_path):
    with pytest.raises(Exception, match="escapes the source's audio_root"):
        build(recipe(tmp_path, manifest(tmp_path, ["../x.wav"])), tmp_path / "out", progress=False)


@pytest.mark.parametrize("model, source_extra, message", [
    ("", "", r"source\[0\]: source 's' has audio, but \[model\] sets no audio rule"),
    ("audio = { count = 0 }", "", r"model.audio.count: 0 is not between 1 and 16384"),
    ("audio = { hop_length = 0 }", "", r"model.audio.hop_length: must be at least 1 and at most 1,000,000, got 0"),
    ("audio = { long = \"cut\" }", "", r"model.audio.long: 'cut' is not one of: error, truncate"),
    (WHISPER, 'layout = "qa"', r"source\[0\].fields.question"),
])
def test_recipe_problems_name_the_key(tmp_path, model, source_extra, message):
    source = manifest(tmp_path, ["a.wav"])
    if source_extra:
        source = source.replace('layout = "asr"', source_extra)
    with pytest.raises(RecipeError, match=message):
        load_recipe(recipe(tmp_path, source, model))


def test_tsv_keeps_quotes(tmp_path):
    shutil.copy(CLIPS[0], tmp_path / "a.wav")
    (tmp_path / "v.tsv").write_text('path\tsentence\na.wav\tShe said "hi", then left.\n')
    source = f'name = "cv"\npath = "{tmp_path / "v.tsv"}"\nlayout = "asr"\nfields = {{ audio = "path", text = "sentence" }}'
    result = build(recipe(tmp_path, source), tmp_path / "out", progress=False)
    hf = AutoTokenizer.from_pretrained(MODEL)
    text = hf.decode(release_rows(result.path)[0]["input_ids"])
    assert 'She said "hi", then left.' in text


# -- the loader ------------------------------------------------------------------------


def test_loader_gives_whisper_features(shipped):
    from mmrecipe.torch import dataloader

    result, path = shipped
    loader = dataloader(result.path, batch_size=2, audio_processor=WhisperFeatureExtractor(), recipe_dir=path.parent)
    clips = 0
    for batch in loader:
        records = [r for row in batch.audio for r in row]
        feats, mask = batch["input_features"], batch["feature_attention_mask"]
        assert feats.shape == (len(records), 80, 3000) and mask.shape == (len(records), 3000)
        tokens = Qwen2AudioEncoder._get_feat_extract_output_lengths(None, mask.sum(-1))[1].tolist()
        assert tokens == [r["length"] for r in records]
        for r in records:  # the decoded clip is as long as the header said
            assert math.ceil(sf.info(r["path"]).frames * 16_000 / sf.info(r["path"]).samplerate) == r["samples"]
        clips += len(records)
    assert clips >= 40


def test_loader_refuses_a_processor_that_counts_otherwise(tmp_path):
    from mmrecipe.torch import dataloader

    model = 'audio = { rule = "whisper", hop_length = 320 }'
    out = build(recipe(tmp_path, manifest(tmp_path, [CLIPS[0].name], CLIPS[0].parent), model), tmp_path / "out", progress=False).path
    with pytest.raises(RecipeError, match="the feature extractor gives .* tokens; the release has"):
        dataloader(out, audio_processor=WhisperFeatureExtractor(), recipe_dir=tmp_path)


def test_loader_without_audio_rule_refuses_an_audio_processor(demo_release):
    from mmrecipe.torch import dataloader

    with pytest.raises(ValueError, match="no audio rule"):
        dataloader(demo_release, audio_processor=WhisperFeatureExtractor())


def test_exports_refuse_audio_rather_than_lose_it(shipped, tmp_path):
    from mmrecipe import ReleaseError
    from mmrecipe.export import export

    result, _ = shipped
    with pytest.raises(ReleaseError, match="the release has audio"):
        export(result.path, "hf", tmp_path / "hf")
