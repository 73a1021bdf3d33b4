"""One table of the bounds every number of a recipe must keep, checked where the recipe is
checked, so that nothing reaches the core that it cannot take (a `seq_len` of 10**12, a
negative seed, an infinite weight, an image rule of a billion tokens). Each bound says
why it is where it is."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

U63 = 2**63 - 1


class Limit(NamedTuple):
    low: float
    high: float
    low_open: bool = False  # low itself not allowed (a weight must be > 0)


# What every LLM table calls with ([lengthen.NAME] and [[generate]] alike).
_LLM = {
    "temperature": Limit(0, 10),
    "top_p": Limit(0, 1, low_open=True),
    "max_tokens": Limit(1, 1_000_000),
    "seed": Limit(0, U63),
    "concurrency": Limit(1, 1024),
    "timeout": Limit(0, 86_400, low_open=True),
    "retries": Limit(0, 100),
    "backoff": Limit(0, 3600),
}
# How much of a source (written, or generated) goes into the mixture.
_SHARE = {
    "weight": Limit(0, 1e12, low_open=True),
    "max_epochs": Limit(0, 1e6, low_open=True),
}

# The key path of each number, with `*` for every source, lengthen table or generate table.
LIMITS: dict[str, Limit] = {
    "recipe.seed": Limit(0, U63),  # the counter-based generator is keyed by a u64
    "output.seq_len": Limit(16, 1 << 20),  # token positions are u32; a row is kept in memory
    "output.shard_sequences": Limit(1, 1_000_000),
    "output.epochs": Limit(1, 1000),  # each epoch is a full copy of the release's shards
    "output.max_images": Limit(1, 65_536),  # image-room classes the packer keeps per bin
    "mixture.total.samples": Limit(1, 10**12),
    "mixture.total.tokens": Limit(1, 10**15),
    "mixture.alpha": Limit(0, 10),  # share ∝ rows^alpha: beyond 10 one source takes all
    **{f"source.*.{k}": v for k, v in _SHARE.items()},
    "model.image.count": Limit(1, 16_384),  # image tokens per image, as the core's budget
    "model.image.patch": Limit(1, 1024),
    "model.image.merge": Limit(1, 64),
    "model.image.min_pixels": Limit(1, 1 << 28),
    "model.image.max_pixels": Limit(1, 1 << 28),  # 268 M pixels: beyond any vision tower
    # Audio and video rules: the core keeps them in u32/u64 and multiplies them, so each is
    # bounded far beyond any encoder (rust/audio.rs, rust/video.rs) and never wraps there.
    # (`count` and video `max_tokens` are checked in validate.py against the core's most
    # tokens per clip, and a video count against max_tokens.)
    "model.audio.sampling_rate": Limit(1, 1_000_000),  # 1 MHz: beyond any speech encoder's input
    "model.audio.chunk_seconds": Limit(1, 3600),  # the window one clip is padded or cut to
    "model.audio.hop_length": Limit(1, 1_000_000),
    "model.audio.pool": Limit(1, 1024),
    "model.video.fps": Limit(0, 1000, low_open=True),  # frames sampled per second of the clip
    "model.video.min_frames": Limit(0, 1 << 20),
    "model.video.max_frames": Limit(1, 1 << 20),
    "model.video.min_pixels": Limit(0, 1 << 28),  # per frame, as images
    "model.video.max_pixels": Limit(1, 1 << 28),
    "model.video.patch": Limit(1, 1024),
    "model.video.merge": Limit(1, 64),
    "model.video.temporal_patch": Limit(1, 64),
    "model.video.max_video_tokens": Limit(1, 1 << 40),
    **{f"lengthen.*.{k}": v for k, v in _LLM.items()},
    **{f"generate.*.{k}": v for k, v in _LLM.items()},
    "generate.*.conversations": Limit(1, 1000),
    "generate.*.min_turns": Limit(1, 1000),
    **{f"generate.*.{k}": v for k, v in _SHARE.items()},
}
# Threads of one build (the CLI's --threads and build(threads=...)): 0 means one per core.
MAX_THREADS = 1024


def _show(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) or float(value).is_integer() else f"{value:g}"


def problem(key: str, value: Any, limit: Limit) -> str | None:
    """The message for a value outside its limit, or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None  # a type problem: the schema reports it
    if isinstance(value, float) and not math.isfinite(value):
        return f"{key}: must be a finite number, got {value}"
    low_ok = value > limit.low if limit.low_open else value >= limit.low
    if low_ok and value <= limit.high:
        return None
    low = f"> {_show(limit.low)}" if limit.low_open else f"at least {_show(limit.low)}"
    return f"{key}: must be {low} and at most {_show(limit.high)}, got {_show(value)}"


def _values(data: Any, parts: list[str], where: str) -> list[tuple[str, Any]]:
    """(key path, value) of every place a LIMITS key names in the raw recipe data."""
    if not parts:
        return [(where, data)]
    head, rest = parts[0], parts[1:]
    if head == "*":
        if isinstance(data, list):
            items = [(f"{where}[{i}]", v) for i, v in enumerate(data)]
        elif isinstance(data, dict):
            items = [(f"{where}.{k}", v) for k, v in data.items()]
        else:
            return []
        return [found for key, v in items for found in _values(v, rest, key)]
    if not isinstance(data, dict) or head not in data:
        return []
    return _values(data[head], rest, f"{where}.{head}" if where else head)


def limit_problems(data: dict[str, Any]) -> list[str]:
    """Every number of the raw recipe data that is outside its bound, with its key path."""
    out = []
    for key, limit in LIMITS.items():
        for where, value in _values(data, key.split("."), ""):
            text = problem(where, value, limit)
            if text:
                out.append(text)
    return out


def threads_problem(threads: Any) -> str | None:
    if isinstance(threads, bool) or not isinstance(threads, int) or not 0 <= threads <= MAX_THREADS:
        return f"--threads: {threads!r} is out of range (0 for one per core, or 1 to {MAX_THREADS})"
    return None
