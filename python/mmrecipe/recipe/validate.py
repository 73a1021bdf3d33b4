"""Every problem of a recipe at once, each with its key path (``source[1].fields.answer``)
and what was expected: unknown keys (with a suggestion for typos), types, and the rules
that span keys."""

from __future__ import annotations

import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any

import msgspec

from .pools import builtin_pool_path, builtin_pools
from .schema import RESERVED_FIELDS, LLMSpec, PoolGenerateSpec, Recipe, SourceSpec

_NOT_FROM_TOML = ("path", "bases")


def _struct_fields(tp: Any) -> dict[str, Any] | None:
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        hints = typing.get_type_hints(tp)
        return {f: hints[f] for f in tp.__struct_fields__ if not (tp is Recipe and f in _NOT_FROM_TOML)}
    return None


def _choices(tp: Any) -> tuple[str, ...] | None:
    """The allowed strings of a `Literal[...]` type (or of `Literal[...] | None`)."""
    if typing.get_origin(tp) is typing.Literal:
        return tuple(a for a in typing.get_args(tp) if isinstance(a, str))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for a in typing.get_args(tp):
            if typing.get_origin(a) is typing.Literal:
                return _choices(a)
    return None


def unknown_keys(data: Any, tp: Any, where: str, out: list[str]) -> None:
    """Collects every unknown key under `data`, and every string that is not one of its
    key's choices, each with a suggestion for likely typos."""
    fields = _struct_fields(tp)
    if fields is not None and isinstance(data, dict):
        for key, value in list(data.items()):
            path = f"{where + '.' if where else ''}{key}"
            if key not in fields:
                close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
                hint = f" (did you mean '{close[0]}'?)" if close else f" (expected one of: {', '.join(fields)})"
                out.append(f"{path}: unknown key{hint}")
                del data[key]  # so the remaining checks can still run
            elif isinstance(value, str) and (choices := _choices(fields[key])) is not None and value not in choices:
                close = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.6)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                out.append(f"{path}: '{value}' is not one of: {', '.join(choices)}{hint}")
                del data[key]  # the default stands in, so the remaining checks can still run
            else:
                unknown_keys(value, fields[key], f"{where + '.' if where else ''}{key}", out)
        return
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is list and isinstance(data, list):
        for i, item in enumerate(data):
            unknown_keys(item, args[0], f"{where}[{i}]", out)
    elif origin is dict and isinstance(data, dict) and len(args) == 2:
        for k, v in data.items():
            unknown_keys(v, args[1], f"{where}.{k}", out)
    elif args:  # unions: check against the struct member, if any
        for a in args:
            if _struct_fields(a) is not None and isinstance(data, dict):
                unknown_keys(data, a, where, out)


def msgspec_path(err: msgspec.ValidationError) -> tuple[str, str]:
    text = str(err)
    message, _, at = text.partition(" - at `")
    key = at.rstrip("`").removeprefix("$").lstrip(".")
    return key, message


def name_table_key(key: str, data: dict[str, Any]) -> str:
    """msgspec writes a key of a top-level table of tables as `[...]`
    (`lengthen[...].on_error`): name the entry that fails (`lengthen.rephrase.on_error`)."""
    head, sep, rest = key.partition("[...]")
    hint = typing.get_type_hints(Recipe).get(head) if sep else None
    tables = data.get(head)
    if hint is None or typing.get_origin(hint) is not dict or not isinstance(tables, dict):
        return key
    value_type = typing.get_args(hint)[1]
    for name, value in tables.items():
        try:
            msgspec.convert(value, value_type)
        except msgspec.ValidationError:
            return f"{head}.{name}{rest}"
    return key


def semantic_problems(r: Recipe) -> list[str]:
    p: list[str] = []
    total = r.mixture.total
    if isinstance(total, str):
        if total != "natural":
            p.append(f"mixture.total: '{total}' is not a mixture total (expected \"natural\" or {{ samples = N }})")
    else:
        keys = set(total)
        if len(keys) != 1 or not keys <= {"samples", "tokens"}:
            p.append(f"mixture.total: expected {{ samples = N }} or {{ tokens = N }}, got keys {sorted(keys)}")
    if r.output.balance == "images" and r.output.packing == "none":
        p.append('output.balance: "images" balances packed sequences; packing = "none" packs nothing (use "tight")')
    if (r.output.max_images is not None or r.output.balance == "images") and r.model.image is None:
        key = "max_images" if r.output.max_images is not None else "balance"
        p.append(f"output.{key}: counts images, but the recipe has no [model] image rule")
    if not r.source:
        p.append("source: the recipe has no [[source]]")
    seen: dict[str, int] = {}
    for i, s in enumerate(r.source):
        if s.name in seen:
            p.append(f"source[{i}].name: duplicate source name '{s.name}' (also source[{seen[s.name]}])")
        seen.setdefault(s.name, i)
        if not s.name.strip():
            p.append(f"source[{i}].name: must not be empty")
        if s.short_answer and s.layout != "qa":
            p.append(f"source[{i}].short_answer: only applies to the 'qa' layout")
        p += _group_by_problems(s, i)
        if s.join is not None and s.join.path is None and (isinstance(s.path, list) or is_glob(s.path)):
            p.append(f"source[{i}].join.path: source '{s.name}' reads several files; name the one file to join")
        required = {"qa": ("question", "answer"), "caption": ("caption",), "alpaca": (), "conversation": (), "asr": ("audio", "text")}[s.layout]
        for f in required:
            if f not in s.fields:
                p.append(f"source[{i}].fields.{f}: the '{s.layout}' layout needs a '{f}' field path")
        if isinstance(s.instructions, str) and s.instructions not in r.pool and builtin_pool_path(s.instructions) is None:
            names = sorted(set(r.pool) | set(builtin_pools()))
            close = difflib.get_close_matches(s.instructions, names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known pools: {', '.join(names)})"
            p.append(f"source[{i}].instructions: no pool named '{s.instructions}'{hint}")
    for name, pool in r.pool.items():
        if pool.generate is not None:
            p += _pool_generate_problems(pool.generate, f"pool.{name}.generate")
        elif not pool.templates:
            p.append(f"pool.{name}.templates: the pool is empty (list templates, or generate = {{ seeds = [...], ... }})")
        for j, t in enumerate(pool.templates):
            if (problem := template_problem(t)) is not None:
                p.append(f"pool.{name}.templates[{j}]: {problem}")
    p += _lengthen_problems(r)
    p += _generate_problems(r, seen)
    p += _audio_problems(r)
    p += _video_problems(r)
    seen_tokens: set[str] = set()
    for j, token in enumerate(r.model.added_tokens):
        if not token or token in seen_tokens:
            p.append(f"model.added_tokens[{j}]: {token!r} is {'empty' if not token else 'listed twice'}")
        seen_tokens.add(token)
    return p


# What the core accepts for the Whisper rule (rust/audio.rs): at most this many tokens a clip.
MAX_AUDIO_TOKENS = 16_384


def _audio_problems(r: Recipe) -> list[str]:
    """The [model] audio rule, and sources whose audio it must expand."""
    p: list[str] = []
    audio = r.model.audio
    for i, s in enumerate(r.source):
        uses = s.layout == "asr" or "audio" in s.fields or "audios" in s.fields
        if uses and audio is None:
            p.append(f"source[{i}]: source '{s.name}' has audio, but [model] sets no audio rule "
                     '(audio = { rule = "whisper" } or audio = { count = N })')
        if "audio" in s.fields and "audios" in s.fields:
            p.append(f"source[{i}].fields: map one of audio (one clip) or audios (a list), not both")
        if uses and s.group_by is not None:
            p.append(f"source[{i}].group_by: grouping by image does not carry a sample's audio; remove group_by")
        if s.audio_root is not None and not uses:
            p.append(f"source[{i}].audio_root: source '{s.name}' maps no audio (fields.audio or fields.audios)")
    if audio is None:
        return p
    where = "model.audio"
    if audio.count is not None:
        if not 1 <= audio.count <= MAX_AUDIO_TOKENS:
            p.append(f"{where}.count: {audio.count} is not between 1 and {MAX_AUDIO_TOKENS}")
    else:
        for key in ("sampling_rate", "chunk_seconds", "hop_length", "pool"):
            if getattr(audio, key) < 1:
                p.append(f"{where}.{key}: {getattr(audio, key)} must be at least 1")
    if not audio.placeholder:
        p.append(f"{where}.placeholder: must not be empty")
    if r.model.image is not None and r.model.image.placeholder == audio.placeholder:
        p.append(f"{where}.placeholder: '{audio.placeholder}' is also the image placeholder")
    return p


# What the core accepts (rust/video.rs): the most tokens any rule may let one clip take.
MAX_VIDEO_TOKENS = 1 << 20


def _video_problems(r: Recipe) -> list[str]:
    """The [model] video rule, and sources whose video it must expand."""
    p: list[str] = []
    video = r.model.video
    for i, s in enumerate(r.source):
        uses = "video" in s.fields or "videos" in s.fields
        if uses and video is None:
            p.append(f"source[{i}]: source '{s.name}' has video, but [model] sets no video rule "
                     '(video = { rule = "qwen2-vl" } or video = { count = N })')
        if "video" in s.fields and "videos" in s.fields:
            p.append(f"source[{i}].fields: map one of video (one clip) or videos (a list), not both")
        if uses and s.group_by is not None:
            p.append(f"source[{i}].group_by: grouping by image does not carry a sample's video; remove group_by")
        if s.video_root is not None and not uses:
            p.append(f"source[{i}].video_root: source '{s.name}' maps no video (fields.video or fields.videos)")
    if video is None:
        return p
    where = "model.video"
    if not 1 <= video.max_tokens <= MAX_VIDEO_TOKENS:
        p.append(f"{where}.max_tokens: {video.max_tokens} is not between 1 and {MAX_VIDEO_TOKENS}")
    if video.count is not None:
        if not 1 <= video.count <= min(video.max_tokens, MAX_VIDEO_TOKENS):
            p.append(f"{where}.count: {video.count} is not between 1 and max_tokens = {video.max_tokens}")
    else:
        for key in ("patch", "merge", "temporal_patch", "max_frames", "max_video_tokens"):
            if getattr(video, key) < 1:
                p.append(f"{where}.{key}: {getattr(video, key)} must be at least 1")
        if not (video.fps > 0 and video.fps != float("inf")):
            p.append(f"{where}.fps: {video.fps} is not a positive frame rate")
        if video.min_frames < 0 or video.min_frames > video.max_frames:
            p.append(f"{where}.min_frames: {video.min_frames} is not between 0 and max_frames = {video.max_frames}")
        if video.min_pixels < 0 or video.min_pixels > video.max_pixels:
            p.append(f"{where}.min_pixels: {video.min_pixels} is not between 0 and max_pixels = {video.max_pixels}")
    if not video.placeholder:
        p.append(f"{where}.placeholder: must not be empty")
    others = {"image": r.model.image, "audio": r.model.audio}
    for name, spec in others.items():
        if spec is not None and spec.placeholder == video.placeholder:
            p.append(f"{where}.placeholder: '{video.placeholder}' is also the {name} placeholder")
    return p


_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")


def placeholders(template: str) -> list[str]:
    """The `{field}` names of a template (`{{` and `}}` are literal braces)."""
    return [m.group(1).strip() for m in _PLACEHOLDER.finditer(template) if m.group(1) is not None]


def template_problem(template: str) -> str | None:
    """Why `template` is not a valid instruction template (None when it is): the rules of
    the core's template parser, a brace that is neither `{{`, `}}` nor a `{field}`."""
    for m in _TEMPLATE_PIECE.finditer(template):
        piece = m.group(0)
        if piece in ("{{", "}}"):
            continue
        if piece == "}":
            return f"lone '}}' at character {m.start()} (write '}}}}' for a literal brace)"
        if piece == "{":
            return f"unclosed '{{' at character {m.start()} (write '{{{{' for a literal brace)"
        name = piece[1:-1].strip()
        if not name or not all(c.isalnum() or c == "_" for c in name):
            return f"'{piece}' is not a field placeholder (use letters, digits and '_')"
    return None


_TEMPLATE_PIECE = re.compile(r"\{\{|\}\}|\{[^}]*\}|\{|\}")

def _pool_generate_problems(g: PoolGenerateSpec, where: str) -> list[str]:
    p = _llm_problems(g, where)
    if not g.seeds:
        p.append(f"{where}.seeds: list a few hand-written instructions for the LLM to follow")
    for j, t in enumerate(g.seeds):
        if (problem := template_problem(t)) is not None:
            p.append(f"{where}.seeds[{j}]: {problem}")
    if not 1 <= g.count <= 10_000:
        p.append(f"{where}.count: {g.count} is not between 1 and 10000")
    if not 1 <= g.per_call <= 200:
        p.append(f"{where}.per_call: {g.per_call} is not between 1 and 200")
    if g.max_calls is not None and not 1 <= g.max_calls <= 10_000:
        p.append(f"{where}.max_calls: {g.max_calls} is not between 1 and 10000")
    if not 0.0 < g.max_similarity <= 1.0:
        p.append(f"{where}.max_similarity: {g.max_similarity} is not in (0, 1]")
    if g.prompt is not None and not g.prompt.strip():
        p.append(f"{where}.prompt: an empty prompt asks for nothing (leave it out for the default)")
    return p


def _llm_problems(spec: LLMSpec, where: str) -> list[str]:
    p = []
    if not spec.model:
        p.append(f"{where}.model: name the model the endpoint serves")
    if not re.match(r"https?://", spec.endpoint):
        p.append(f"{where}.endpoint: expected an http:// or https:// URL, got {spec.endpoint!r}")
    return p


def lengthen_fields(spec: SourceSpec) -> list[str]:
    """The placeholders a lengthening prompt or template may use on a qa source."""
    return ["question", "answer", *[k for k in spec.fields if k not in ("question", "answer")]]


def _lengthen_problems(r: Recipe) -> list[str]:
    p: list[str] = []
    for name, spec in r.lengthen.items():
        where = f"lengthen.{name}"
        if spec.method == "llm":
            if not spec.prompt:
                p.append(f"{where}.prompt: method \"llm\" needs a prompt, e.g. \"Question: {{question}}\\nAnswer: {{answer}}\\nRewrite the answer as one sentence.\"")
            if spec.templates is not None or spec.pool is not None:
                p.append(f"{where}: templates and pool belong to method \"template\"")
            p += _llm_problems(spec, where)
        else:
            if spec.prompt is not None:
                p.append(f"{where}.prompt: method \"template\" takes templates or pool, not a prompt")
            if (spec.templates is None) == (spec.pool is None):
                p.append(f"{where}: method \"template\" needs one of templates = [...] or pool = \"answer-sentence\"")
            elif spec.templates is not None and not spec.templates:
                p.append(f"{where}.templates: the list is empty")
            elif spec.pool is not None and spec.pool not in r.pool and builtin_pool_path(spec.pool) is None:
                p.append(f"{where}.pool: no pool named '{spec.pool}' (built-in: {', '.join(builtin_pools())})")
            if spec.on_error == "drop":
                p.append(f"{where}.on_error: a template cannot fail; on_error applies to method \"llm\"")
    for i, s in enumerate(r.source):
        if s.lengthen is None:
            continue
        where = f"source[{i}].lengthen"
        if s.lengthen not in r.lengthen:
            close = difflib.get_close_matches(s.lengthen, list(r.lengthen), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (tables: {', '.join(r.lengthen) or 'none; add [lengthen.NAME]'})"
            p.append(f"{where}: no [lengthen.{s.lengthen}] table{hint}")
            continue
        if s.layout != "qa":
            p.append(f"{where}: only a 'qa' source has short answers to lengthen (source '{s.name}' is '{s.layout}')")
            continue
        if s.short_answer:
            p.append(f"{where}: a lengthened answer is not short; remove short_answer from source '{s.name}'")
        spec = r.lengthen[s.lengthen]
        texts = [spec.prompt or ""] if spec.method == "llm" else list(spec.templates or [])
        known = lengthen_fields(s)
        for t in texts:
            for f in placeholders(t):
                if f not in known:
                    p.append(f"{where}: lengthen.{s.lengthen} uses {{{f}}}, which source '{s.name}' does not map (fields: {', '.join(known)})")
    return p


def _generate_problems(r: Recipe, names: dict[str, int]) -> list[str]:
    p: list[str] = []
    for j, g in enumerate(r.generate):
        where = f"generate[{j}]"
        if g.name in names:
            p.append(f"{where}.name: '{g.name}' is already the name of a source")
        names.setdefault(g.name, j)
        if not g.name.strip():
            p.append(f"{where}.name: must not be empty")
        p += _llm_problems(g, where)
        for f in placeholders(g.context):
            if f not in g.fields:
                p.append(f"{where}.context: uses {{{f}}}, which fields does not map (fields: {', '.join(g.fields) or 'none'})")
        if not placeholders(g.context):
            p.append(f"{where}.context: the template uses no field, so every call would be the same")
    return p

def is_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


def _group_by_problems(s: SourceSpec, i: int) -> list[str]:
    if s.group_by is None:
        return []
    where = f"source[{i}].group_by"
    if s.layout != "qa":
        return [f"{where}: only applies to the 'qa' layout (questions about one image become one conversation)"]
    if "image" not in s.fields:
        return [f"{where}: grouping by image needs fields.image"]
    per_question = sorted(k for k in s.fields if k not in RESERVED_FIELDS)
    if per_question:
        # One conversation holds many questions, but a template field has one value per sample.
        return [f"{where}: template fields ({', '.join(per_question)}) cannot be combined with group_by; "
                "use templates with {question} only, or remove group_by"]
    return []



def name_merged_sources(problems: list[str], start: int, data: dict[str, Any], bases: list[Path]) -> None:
    """In a merged recipe, source[i] counts the merged sources: name the source, too."""
    sources = data.get("source")
    if not bases or not isinstance(sources, list):
        return
    for k in range(start, len(problems)):
        m = re.match(r"source\[(\d+)\]", problems[k])
        entry = sources[int(m.group(1))] if m and int(m.group(1)) < len(sources) else None
        if isinstance(entry, dict):
            problems[k] += f" (source {entry.get('name')!r} of the merged recipe)"



def report(where: str, problems: list[str]) -> str:
    head = f"{where}: {len(problems)} problem{'s' if len(problems) > 1 else ''} in the recipe"
    return head + "\n" + "\n".join(f"  - {p}" for p in problems)

