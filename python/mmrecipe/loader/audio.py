"""Audio for a batch: what a release says about its clips (`AudioRule`, from the manifest's
`audio`), each clip decoded with soundfile (mono, at the rule's sampling rate) and turned
into model inputs by a feature extractor. `Features` wraps a transformers feature
extractor (WhisperFeatureExtractor: `input_features` and the `feature_attention_mask`
Qwen2-Audio takes), a full processor (its feature extractor is used), a name or folder
for `AutoFeatureExtractor.from_pretrained`, or a plain callable (list of float32 arrays ->
tensor or mapping of model inputs). The Whisper rule's token count is checked against
the feature extractor's mask on every clip."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..errors import recipe_error
from .records import media_records, rooted, unreadable
from .release_info import media_roots


@dataclass(frozen=True)
class AudioRule:
    """`model.audio` as built: a fixed `count` per clip, or the Whisper rule."""

    token_id: int | None
    sampling_rate: int
    count: int | None
    chunk_seconds: int
    hop_length: int
    pool: int

    def tokens(self, frames: np.ndarray) -> np.ndarray:
        """Tokens for clips of `frames` mel frames: the stride-2 convolution, then the pool."""
        conv = (frames - 1) // 2 + 1
        return np.where(conv >= self.pool, (conv - self.pool) // self.pool + 1, 0)


def audio_rule(raw: Mapping[str, Any]) -> AudioRule | None:
    audio = raw.get("audio")
    if not audio:
        return None
    return AudioRule(
        token_id=audio.get("token_id"),
        sampling_rate=int(audio.get("sampling_rate", 16_000)),
        count=audio.get("count"),
        chunk_seconds=int(audio.get("chunk_seconds", 30)),
        hop_length=int(audio.get("hop_length", 160)),
        pool=int(audio.get("pool", 2)),
    )


def audio_roots(raw: Mapping[str, Any], sources: list[str], given: Mapping[str, str | Path] | None,
                recipe_dir: str | Path | None) -> dict[str, Path | None]:
    """Each source's audio root: `given`, else the manifest's (relative to `recipe_dir`)."""
    return media_roots("audio", raw, sources, given, recipe_dir)


def load_audio(path: str, rate: int) -> np.ndarray:
    """The clip at `path` as mono float32 at `rate`: channels averaged, other rates
    resampled by linear interpolation to ⌈frames · rate / own rate⌉ samples, the length
    the build counted from the header (resample beforehand where quality matters)."""
    import soundfile

    data, own = soundfile.read(path, dtype="float32", always_2d=True)
    mono = data.mean(axis=1)
    if own == rate:
        return mono
    n = -(-len(mono) * rate // own)
    return np.interp(np.arange(n) * (own / rate), np.arange(len(mono)), mono).astype(np.float32)


class Features:
    """A feature extractor behind one interface: `__call__(clips)` gives the model inputs
    for a list of float32 arrays, and `frames(out)` the mel frames of each clip where the
    extractor says (its attention mask), for the token check."""

    def __init__(self, processor: Any, rule: AudioRule):
        self.rule = rule
        if isinstance(processor, str):
            from transformers import AutoFeatureExtractor

            processor = AutoFeatureExtractor.from_pretrained(processor)
        if hasattr(processor, "feature_extractor") and not hasattr(processor, "sampling_rate"):
            processor = processor.feature_extractor  # a full processor: its audio part
        if not callable(processor):
            raise TypeError(f"audio_processor must be callable (a feature extractor or a function), not {type(processor).__name__}")
        self.processor: Callable[..., Any] = processor
        self.hf = type(processor).__module__.startswith("transformers.")
        own = getattr(processor, "sampling_rate", None)
        if self.hf and own is not None and int(own) != rule.sampling_rate:
            raise recipe_error(f"the feature extractor takes {own} Hz audio, the release counted tokens at "
                               f"model.audio.sampling_rate = {rule.sampling_rate}", key="model.audio.sampling_rate")

    def __call__(self, clips: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
        if self.hf:
            out = self.processor(list(clips), sampling_rate=self.rule.sampling_rate, return_attention_mask=True,
                                 return_tensors="pt")
            out = dict(out)
            if "attention_mask" in out:  # Qwen2-Audio's name; the text's mask is another thing
                out["feature_attention_mask"] = out.pop("attention_mask")
        else:
            out = self.processor(list(clips))
        if isinstance(out, torch.Tensor):
            return {"input_features": out}
        if not isinstance(out, Mapping) or "input_features" not in out:
            raise TypeError("the audio processor must return a tensor or a mapping with 'input_features'")
        return {k: v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v)) for k, v in out.items()}

    @staticmethod
    def frames(out: Mapping[str, torch.Tensor]) -> np.ndarray | None:
        mask = out.get("feature_attention_mask")
        return None if mask is None else mask.sum(-1).numpy()


@dataclass
class Audio:
    """What collate needs to know about a release's audio."""

    sources: list[str]
    roots: dict[str, Path | None]
    rule: AudioRule
    features: Features | None = None
    on_missing: str = "error"

    def path(self, source: str, path: str) -> str:
        return rooted(self.roots, source, path)


def audio_records(item: dict[str, Any], audio: Audio | None) -> list[dict[str, Any]]:
    """One record per clip of a row: source, source row, segment, path (resolved against
    the source's audio root where known), row-relative position, token length, samples."""
    if "audio_positions" not in item:
        return []
    segs = np.searchsorted(np.cumsum(item["segment_lengths"]), item["audio_positions"], side="right")
    out = media_records(item, segs, item["audio_paths"], item["audio_positions"], item["audio_lengths"],
                        audio.sources if audio is not None else None, audio.roots if audio is not None else None)
    for rec, samples in zip(out, item["audio_samples"]):
        rec["samples"] = int(samples)
    return out


def load_clips(items: list[dict[str, Any]], recs: list[list[dict[str, Any]]], audio: Audio):
    """The rows whose clips all decode (all rows, or an error, under on_missing = "error"),
    each with its clips, and the release rows skipped."""
    kept, clips, skipped = [], [], []
    for item, row in zip(items, recs):
        got = []
        try:
            for rec in row:
                got.append(load_audio(rec["path"], audio.rule.sampling_rate))
        except Exception as err:  # noqa: BLE001 - any unreadable file is the same data error
            if audio.on_missing == "error":
                raise unreadable(item, rec, err, "audio") from err
            skipped.append(int(item.get("index", -1)))
            continue
        kept.append((item, row))
        clips.append(got)
    return kept, clips, skipped


def features_checked(items: list[dict[str, Any]], recs: list[list[dict[str, Any]]], clips: list[list[np.ndarray]],
                     audio: Audio) -> dict[str, torch.Tensor]:
    """The model inputs for every clip of the rows, in order; under the Whisper rule each
    clip's tokens from the extractor's mask must be the release's run length."""
    assert audio.features is not None
    flat = [c for row in clips for c in row]
    if not flat:
        return {}
    out = audio.features(flat)
    frames = Features.frames(out)
    if frames is not None and audio.rule.count is None:
        tokens = audio.rule.tokens(frames)
        at = 0
        for item, row in zip(items, recs):
            for rec in row:
                if int(tokens[at]) != rec["length"]:
                    raise recipe_error(
                        f"release row {item.get('index', '?')}: the feature extractor gives {rec['path']} "
                        f"{int(frames[at])} mel frames, {int(tokens[at])} tokens; the release has {rec['length']}: "
                        "its hop_length, chunk length and sampling rate must be model.audio's", key="model.audio")
                at += 1
    return out
