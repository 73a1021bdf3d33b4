"""The recipe language as typed structs: what a TOML recipe may say, with defaults. Parsing
and checking live in `load` and `validate`; `plan` resolves a checked recipe once."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import msgspec

class _Spec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pass


class RecipeMeta(_Spec, kw_only=True, forbid_unknown_fields=True):
    name: str
    version: str = "0.0.0"
    seed: int = 0
    description: str = ""


class ImageSpec(_Spec, kw_only=True, forbid_unknown_fields=True):
    """How images become tokens: `count` per image, or computed from the image size."""

    placeholder: str = "<image>"
    token: str = "<image>"
    count: int | None = None
    patch: int = 14
    merge: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    start: str | None = None
    end: str | None = None


class AudioSpec(_Spec, kw_only=True, forbid_unknown_fields=True):
    """How audio clips become tokens, from the length their file header states: `count`
    per clip, or the Whisper rule (a mel frame per `hop_length` samples at
    `sampling_rate`, the clip padded or cut to a `chunk_seconds` window, the encoder's
    stride-2 convolution, then an average pool of `pool`: Qwen2-Audio's is 2). A clip
    longer than the window: an error, or cut to it (`long = "truncate"`)."""

    rule: Literal["whisper"] = "whisper"
    placeholder: str = "<audio>"
    token: str = "<|AUDIO|>"
    count: int | None = None
    sampling_rate: int = 16_000
    chunk_seconds: int = 30
    hop_length: int = 160
    pool: int = 2
    long: Literal["error", "truncate"] = "error"
    start: str | None = None
    end: str | None = None


class VideoSpec(_Spec, kw_only=True, forbid_unknown_fields=True):
    """How video clips become tokens, from their container's metadata (frame count, frame
    rate, frame size, rotation): `count` per clip, or the Qwen2-VL rule of transformers'
    `Qwen2VLVideoProcessor` (frames sampled at `fps`, between `min_frames` and
    `max_frames`, floored to a multiple of `temporal_patch`; each frame resized under
    `min_pixels`/`max_pixels` as images are, optionally under an even share of
    `max_video_tokens` worth of pixels with `cap_pixels_per_frame`). A clip giving more
    than `max_tokens` is an error naming it. The defaults are the processor's."""

    rule: Literal["qwen2-vl"] = "qwen2-vl"
    placeholder: str = "<video>"
    token: str = "<|video_pad|>"
    count: int | None = None
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 768 * 28 * 28
    patch: int = 14
    merge: int = 2
    temporal_patch: int = 2
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = 128_000
    max_tokens: int = 32_768
    start: str | None = None
    end: str | None = None


class ModelSpec(_Spec, kw_only=True, forbid_unknown_fields=True):
    tokenizer: str
    chat_template: str = "model"
    image: ImageSpec | None = None
    audio: AudioSpec | None = None
    video: VideoSpec | None = None
    # Special tokens appended to the tokenizer as it is loaded (HF `add_special_tokens`, in
    # order), e.g. a video model's <|video_pad|>, so that no tokenizer copy is needed.
    added_tokens: list[str] = []
    # Which encoder turns text into ids: "fast" (the core's own byte-level BPE, for the
    # tokenizer shapes it knows), "hf" (HF tokenizers), or "auto" (fast where it applies).
    # The ids are the same either way, so it is not part of the release's identity.
    tokenizer_engine: Literal["auto", "hf", "fast"] = "auto"


class OutputSpec(_Spec, kw_only=True, forbid_unknown_fields=True):
    seq_len: int = 4096
    # "tight": best-fit decreasing, replaced by the refill or pattern packer where one
    # needs fewer sequences; "bfd": best-fit decreasing alone; "none": one sample per row.
    packing: Literal["tight", "bfd", "none"] = "tight"
    # Images per sequence at most (samples with more are dropped and counted).
    max_images: int | None = None
    # "images": image counts per sequence as even as the packing allows.
    balance: Literal["none", "images"] = "none"
    train_on: Literal["assistant", "last_assistant", "all"] = "assistant"
    train_on_eos: bool = True
    overlong: Literal["drop", "truncate", "split_turns"] = "drop"
    shuffle: bool = True
    shard_sequences: int = 4096
    # Parts of the release, each with its own templates, subset, order and packing drawn by
    # (seed, epoch); the loader's set_epoch(e) reads part e.
    epochs: int = 1


class MixtureSpec(_Spec, kw_only=True, forbid_unknown_fields=True):
    """`total`: "natural" (every usable row once), { samples = N } or { tokens = N }.
    `alpha`: temperature sampling, a source's share ∝ weight × rows^alpha."""

    total: str | dict[str, int] = "natural"
    alpha: float = 0.0


# "asr": a clip and its transcript (fields audio and text), the transcript trained.
Layout = Literal["qa", "caption", "conversation", "alpaca", "asr"]
# "webdataset": tar shards of {key}.jpg|jpeg|png|webp + {key}.txt|json (sources/containers.py).
# "tsv": tab-separated with a header and no quoting (Common Voice's validated.tsv).
Format = Literal["jsonl", "json", "parquet", "csv", "tsv", "webdataset"]

# Fields a layout consumes itself; any other mapped field is available to templates
# (and `text`, the transcript, under the asr layout: see LAYOUT_FIELDS).
RESERVED_FIELDS = frozenset(
    {"image", "images", "question", "answer", "caption", "conversations", "instruction", "input", "output", "audio", "audios",
     "video", "videos"}
)


# Fields one layout consumes beyond RESERVED_FIELDS.
LAYOUT_FIELDS = {"asr": frozenset({"text"})}


class JoinSpec(_Spec, kw_only=True, forbid_unknown_fields=True):
    """A second table joined to the source's rows: each row gets the columns of the one
    record whose `right_on` equals the row's `left_on` (VQAv2 annotations by
    question_id, COCO images by image_id = id). `path` defaults to the source's file."""

    left_on: str
    right_on: str
    path: str | None = None
    format: Format | None = None
    json_key: str | None = None


class SourceSpec(_Spec, kw_only=True, forbid_unknown_fields=True):
    name: str
    path: str | list[str]
    layout: Layout
    format: Format | None = None
    json_key: str | None = None
    join: JoinSpec | None = None
    # "image": all questions about one image become one multi-turn conversation (qa only).
    group_by: Literal["image"] | None = None
    fields: dict[str, str] = {}
    roles: dict[str, str] = {}
    instructions: str | list[str] | None = None
    image_root: str | None = None
    # The folder audio paths are relative to (default: the source file's folder).
    audio_root: str | None = None
    # The folder video paths are relative to (default: the source file's folder).
    video_root: str | None = None
    weight: float = 1.0
    max_epochs: float | None = None
    short_answer: Literal["word", "sentence"] | None = None
    # A [lengthen.NAME] table that rewrites this source's answers (qa only).
    lengthen: str | None = None
    on_error: Literal["fail", "skip"] = "fail"


class LLMSpec(_Spec, kw_only=True, forbid_unknown_fields=True):
    """An OpenAI-compatible chat endpoint and how to call it. Everything that shapes a
    reply (model, system prompt, sampling parameters) is part of each call's cache key;
    how it is called (endpoint, concurrency, timeout, retries) is not."""

    endpoint: str = "http://127.0.0.1:8080/v1"
    model: str | None = None
    # The name of an environment variable holding the API key (never the key itself).
    api_key_env: str | None = None
    system: str | None = None
    temperature: float = 0.7
    top_p: float | None = None
    max_tokens: int = 256
    # Sent with each call; default: the recipe seed.
    seed: int | None = None
    concurrency: int = 4
    timeout: float = 120.0
    retries: int = 3
    backoff: float = 1.0
    # JSON Lines of finished calls, relative to the recipe; default cache/<table>.jsonl.
    cache: str | None = None


class PoolGenerateSpec(LLMSpec, kw_only=True, forbid_unknown_fields=True):
    """`[pool.NAME] generate = {...}`: more instructions written by an LLM in the style of
    hand-written seeds. Calls k = 0, 1, ... (call seed = seed + k, the seeds shown as the
    model's earlier replies, from the k-th on) each ask for `per_call` instructions, one
    per line, until `count` new ones survive the filters (duplicates, near duplicates,
    unknown or missing placeholders) or `max_calls` calls were made; the pool is the
    templates, the seeds and the first `count` survivors, in that order."""

    seeds: list[str]
    count: int = 40
    # One per call suits small models best; larger ones can write ten at once.
    per_call: int = 1
    # Default: 3 calls per `per_call` asked, plus 2.
    max_calls: int | None = None
    # The user turn of each call, after the seeds; {per_call} and {task} are filled in.
    prompt: str | None = None
    # A candidate whose ROUGE-L (word LCS F1) against an instruction already in the pool
    # is above this is a near duplicate (Self-Instruct's 0.7); 1.0 keeps all but duplicates.
    max_similarity: float = 0.7
    temperature: float = 0.9
    max_tokens: int = 512
    # A failed call: recorded, and the next call asked ("drop"), or the build stops.
    on_error: Literal["drop", "fail"] = "drop"


class PoolSpec(_Spec, kw_only=True, forbid_unknown_fields=True):
    templates: list[str] = []
    description: str = ""
    task: str = ""
    generate: PoolGenerateSpec | None = None


class LengthenSpec(LLMSpec, kw_only=True, forbid_unknown_fields=True):
    """`[lengthen.NAME]`: rewrite a qa source's short answers. method "llm" asks the
    endpoint with `prompt` filled from the row's fields; method "template" restates the
    answer with a sentence template from `templates` or `pool`, chosen per row."""

    method: Literal["llm", "template"] = "llm"
    prompt: str | None = None
    templates: list[str] | None = None
    pool: str | None = None
    # A failed call: keep the original answer, drop the sample, or stop the build.
    on_error: Literal["keep", "drop", "fail"] = "keep"


class GenerateSpec(LLMSpec, kw_only=True, forbid_unknown_fields=True):
    """`[[generate]]`: conversations written by an LLM from symbolic image context
    (captions, boxes) and hand-written seed examples, LLaVA-style; the result is a
    conversation source named `name`, mixed like any other."""

    name: str
    path: str | list[str]
    format: Format | None = None
    # For a JSON file whose records are a list under a key.
    json_key: str | None = None
    fields: dict[str, str] = {}
    # The user turn of each call: a template over `fields`.
    context: str
    # JSON Lines of examples: {"context": ..., "conversation": [{from, value}, ...]}.
    seeds: str | None = None
    reply: Literal["qa", "json"] = "qa"
    min_turns: int = 1
    conversations: int = 1
    image_root: str | None = None
    weight: float = 1.0
    max_epochs: float | None = None
    on_error: Literal["drop", "fail"] = "drop"


class Recipe(_Spec, kw_only=True, forbid_unknown_fields=True):
    recipe: RecipeMeta
    model: ModelSpec
    output: OutputSpec = msgspec.field(default_factory=OutputSpec)
    mixture: MixtureSpec = msgspec.field(default_factory=MixtureSpec)
    source: list[SourceSpec]
    pool: dict[str, PoolSpec] = {}
    lengthen: dict[str, LengthenSpec] = {}
    generate: list[GenerateSpec] = []
    # Set by `load_recipe`, not by the TOML file: the recipe file, and the files it
    # extends (nearest first).
    path: Path | None = None
    bases: list[Path] = []


