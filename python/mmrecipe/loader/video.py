"""Video for a batch: what a release says about its clips (`VideoRule`, from the manifest's
`video`), each clip's frames sampled as transformers' Qwen2VLVideoProcessor samples them
(the rule's fps, min_frames and max_frames over the container's frame count and rate),
only those frames decoded with PyAV, and the frames turned into model inputs by a video
processor. `Frames` wraps a transformers video processor (Qwen2VLVideoProcessor:
`pixel_values_videos` and `video_grid_thw`), a full processor (its video processor is
used), "qwen2-vl" for one built from the release's rule, a name or folder for
`AutoVideoProcessor.from_pretrained`, or a plain callable (list of uint8 `[frames, H, W,
3]` arrays -> tensor or mapping of model inputs). Each clip's grid from the processor is
checked against the one the release recorded."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from .. import _core
from ..errors import DataError, recipe_error
from .records import media_records, rooted, unreadable
from .release_info import media_roots


@dataclass(frozen=True)
class VideoRule:
    """`model.video` as built: Qwen2-VL's frame sampling and patch grid (each frame's
    pixels capped by an even share of `max_video_tokens` under `cap_pixels_per_frame`),
    or a fixed `count` of tokens per clip (frames still sampled by fps; no grid)."""

    token_id: int | None
    count: int | None
    fps: float
    min_frames: int
    max_frames: int
    min_pixels: int
    max_pixels: int
    patch: int
    merge: int
    temporal_patch: int
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = 128_000

    @property
    def grid(self) -> bool:
        return self.count is None

    def describe(self) -> str:
        cap = f", cap_pixels_per_frame, max_video_tokens = {self.max_video_tokens}" if self.cap_pixels_per_frame else ""
        return (f"model.video: fps = {self.fps:g}, min_frames = {self.min_frames}, max_frames = {self.max_frames}, "
                f"patch = {self.patch}, merge = {self.merge}, temporal_patch = {self.temporal_patch}, "
                f"min_pixels = {self.min_pixels}, max_pixels = {self.max_pixels}{cap}")


def video_rule(raw: Mapping[str, Any]) -> VideoRule | None:
    video = raw.get("video")
    if not video:
        return None
    return VideoRule(
        token_id=video.get("token_id"),
        count=video.get("count"),
        fps=float(video.get("fps", 2.0)),
        min_frames=int(video.get("min_frames", 4)),
        max_frames=int(video.get("max_frames", 768)),
        min_pixels=int(video.get("min_pixels", 128 * 28 * 28)),
        max_pixels=int(video.get("max_pixels", 768 * 28 * 28)),
        patch=int(video.get("patch", 14)),
        merge=int(video.get("merge", 2)),
        temporal_patch=int(video.get("temporal_patch", 2)),
        cap_pixels_per_frame=bool(video.get("cap_pixels_per_frame", False)),
        max_video_tokens=int(video.get("max_video_tokens", 128_000)),
    )


def video_roots(raw: Mapping[str, Any], sources: list[str], given: Mapping[str, str | Path] | None,
                recipe_dir: str | Path | None) -> dict[str, Path | None]:
    """Each source's video root: `given`, else the manifest's (relative to `recipe_dir`)."""
    return media_roots("video", raw, sources, given, recipe_dir)


@dataclass(frozen=True)
class ClipInfo:
    """A clip's container metadata, as transformers' PyAV reader takes it."""

    frames: int
    fps: float
    height: int
    width: int

    def metadata(self, indices: np.ndarray) -> Any:
        """transformers' VideoMetadata of the clip sampled at `indices`."""
        from transformers.video_utils import VideoMetadata

        return VideoMetadata(total_num_frames=self.frames, fps=self.fps, width=self.width, height=self.height,
                             duration=self.frames / self.fps if self.fps else 0.0, video_backend="pyav",
                             frames_indices=indices.tolist())


def clip_info(path: str) -> ClipInfo:
    """The clip's metadata as the build read it (the core's header reader: the frame count,
    average rate and coded size it counted the clip's tokens from), so that the frames
    sampled here are the ones the release counted. PyAV's own figures differ where a
    container keeps no count (Matroska, WebM, fragmented MP4: 0 frames) or keeps only its
    first fragment's."""
    frames, (num, den), width, height, _ = _core.video_metadata(path)
    return ClipInfo(int(frames), num / den if den else 0.0, int(height), int(width))


def sampled_indices(info: ClipInfo, rule: VideoRule) -> np.ndarray:
    """The frames Qwen2VLVideoProcessor.sample_frames takes at the rule's fps: the clip's
    seconds times fps, within [min_frames, max_frames] and the clip's frames, rounded
    down to whole temporal patches, spread evenly from frame 0."""
    tp = rule.temporal_patch
    most = math.floor(min(rule.max_frames, info.frames) / tp) * tp
    wanted = info.frames / info.fps * rule.fps if info.fps else 0
    n = math.floor(min(max(wanted, rule.min_frames), most, info.frames) / tp) * tp
    if n <= 0:
        raise ValueError(f"{info.frames} frames at {info.fps:g} fps give no whole temporal patch of {tp} frames")
    # torch's float arange, truncated, exactly as the processor computes it
    return torch.arange(0, info.frames, info.frames / n).int().numpy().astype(np.int64)


def upright(frame: Any) -> np.ndarray:
    """A decoded frame as RGB, turned as its display matrix says (as players and FFmpeg's
    autorotate show it, and as the build counts its grid: the upright picture)."""
    rgb = frame.to_ndarray(format="rgb24")
    turns = round(float(getattr(frame, "rotation", 0) or 0) / 90) % 4  # counterclockwise quarter turns
    return np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb


def load_video(path: str, rule: VideoRule) -> tuple[np.ndarray, ClipInfo, np.ndarray]:
    """The sampled frames of the clip at `path` as uint8 `[n, H, W, 3]` RGB upright, its
    metadata and the frame indices; only frames up to the last sampled one are decoded."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        info = clip_info(path)
        indices = sampled_indices(info, rule)
        wanted, last = set(indices.tolist()), int(indices[-1])
        frames = []
        for i, frame in enumerate(container.decode(stream)):
            if i > last:
                break
            if i in wanted:
                frames.append(upright(frame))
    if len(frames) != len(indices):
        raise ValueError(f"the container says {info.frames} frames, {len(frames)} of the {len(indices)} sampled "
                         "ones could be decoded")
    height, width = frames[0].shape[:2]
    return np.stack(frames), ClipInfo(info.frames, info.fps, height, width), indices


def _named(name: str, rule: VideoRule) -> Any:
    if name == "qwen2-vl":
        from transformers import Qwen2VLVideoProcessor

        return Qwen2VLVideoProcessor(patch_size=rule.patch, merge_size=rule.merge, temporal_patch_size=rule.temporal_patch,
                                     min_pixels=rule.min_pixels, max_pixels=rule.max_pixels,
                                     cap_pixels_per_frame=rule.cap_pixels_per_frame, max_video_tokens=rule.max_video_tokens)
    from transformers import AutoProcessor, AutoVideoProcessor

    try:
        full = AutoProcessor.from_pretrained(name)
        if hasattr(full, "video_processor"):
            return full.video_processor
    except Exception:  # noqa: BLE001 - fall back to the video processor alone
        pass
    return AutoVideoProcessor.from_pretrained(name)


class Frames:
    """A video processor behind one interface: `__call__(clips, infos, indices)` gives the
    model inputs for a list of sampled clips."""

    def __init__(self, processor: Any, rule: VideoRule):
        self.rule = rule
        if isinstance(processor, str):
            processor = _named(processor, rule)
        if hasattr(processor, "video_processor") and not hasattr(processor, "sample_frames"):
            processor = processor.video_processor  # a full processor: its video part
        if not callable(processor):
            raise TypeError(f"video_processor must be callable (a video processor or a function), not {type(processor).__name__}")
        self.processor: Callable[..., Any] = processor
        self.hf = type(processor).__module__.startswith("transformers.")
        self.merge = int(getattr(processor, "merge_size", rule.merge) or rule.merge)

    def __call__(self, clips: Sequence[np.ndarray], infos: Sequence[ClipInfo], indices: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
        if self.hf:
            meta = [info.metadata(ix) for info, ix in zip(infos, indices)]
            out = dict(self.processor(videos=list(clips), video_metadata=meta, do_sample_frames=False, return_tensors="pt"))
        else:
            out = self.processor(list(clips))
        if isinstance(out, torch.Tensor):
            return {"pixel_values_videos": out}
        if not isinstance(out, Mapping) or "pixel_values_videos" not in out:
            raise TypeError("the video processor must return a tensor or a mapping with 'pixel_values_videos'")
        return {k: v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v)) for k, v in out.items()
                if k != "video_metadata"}


@dataclass
class Video:
    """What collate needs to know about a release's videos."""

    sources: list[str]
    roots: dict[str, Path | None]
    rule: VideoRule
    frames: Frames | None = None
    on_missing: str = "error"
    # Qwen2.5-VL (its vision_config.tokens_per_second): frames' temporal positions spaced
    # by this times each clip's seconds per temporal patch, given as `second_per_grid_ts`.
    tokens_per_second: float | None = None

    def path(self, source: str, path: str) -> str:
        return rooted(self.roots, source, path)


def video_records(item: dict[str, Any], video: Video | None) -> list[dict[str, Any]]:
    """One record per clip of a row: source, source row, segment, path (resolved against
    the source's video root where known), row-relative position, token length, the patch
    grid (t, h, w) and the frames the release counted."""
    if "video_positions" not in item:
        return []
    segs = np.searchsorted(np.cumsum(item["segment_lengths"]), item["video_positions"], side="right")
    out = media_records(item, segs, item["video_paths"], item["video_positions"], item["video_lengths"],
                        video.sources if video is not None else None, video.roots if video is not None else None)
    grid = video is None or video.rule.grid
    for rec, thw, frames in zip(out, item["video_grids"], item["video_frames"]):
        rec["grid"] = tuple(int(x) for x in thw) if grid else None  # a fixed count records 0s
        rec["frames"] = int(frames)
    return out


def load_videos(items: list[dict[str, Any]], recs: list[list[dict[str, Any]]], video: Video):
    """The rows whose clips all decode (all rows, or an error, under on_missing = "error"),
    each with its clips as (frames, info, indices), and the release rows skipped."""
    kept, clips, skipped = [], [], []
    for item, row in zip(items, recs):
        got = []
        try:
            for rec in row:
                got.append(load_video(rec["path"], video.rule))
        except Exception as err:  # noqa: BLE001 - any unreadable file is the same data error
            if video.on_missing == "error":
                raise unreadable(item, rec, err, "video") from err
            skipped.append(int(item.get("index", -1)))
            continue
        kept.append((item, row))
        clips.append(got)
    return kept, clips, skipped


def frames_checked(items: list[dict[str, Any]], recs: list[list[dict[str, Any]]], clips: list[list[Any]],
                   video: Video) -> dict[str, torch.Tensor]:
    """The model inputs for every clip of the rows, in order. Each clip's sampled frames
    must be the release's count, and its grid from the processor the release's grid.
    Each record gets `seconds_per_grid`: the temporal patch over the sampled frame rate."""
    assert video.frames is not None
    flat = [c for row in clips for c in row]
    if not flat:
        return {}
    at = 0
    for item, row in zip(items, recs):
        for rec in row:
            n, info = len(flat[at][2]), flat[at][1]
            rec["seconds_per_grid"] = video.rule.temporal_patch / (n / info.frames * info.fps) if info.fps else 1.0
            if n != rec["frames"]:
                err = DataError(f"release row {item.get('index', '?')}: {rec['path']} samples {n} frames "
                                f"({flat[at][1].frames} frames at {flat[at][1].fps:g} fps), the release counted "
                                f"{rec['frames']}: the clip changed since the build")
                err.source, err.row, err.field = rec["source"], rec["source_row"], "video"
                raise err
            at += 1
    out = video.frames([c[0] for c in flat], [c[1] for c in flat], [c[2] for c in flat])
    if video.tokens_per_second is not None:
        out["second_per_grid_ts"] = torch.tensor([rec["seconds_per_grid"] for row in recs for rec in row], dtype=torch.float32)
    thw = out.get("video_grid_thw")
    if not video.rule.grid:
        return out
    if thw is None:  # a plain callable: the release's grids
        out["video_grid_thw"] = torch.tensor([rec["grid"] for row in recs for rec in row], dtype=torch.int64)
        return out
    got = [tuple(int(x) for x in g) for g in thw.tolist()]
    at = 0
    for item, row in zip(items, recs):
        for rec in row:
            t, h, w = got[at]
            if got[at] != rec["grid"] or t * h * w // video.frames.merge**2 != rec["length"]:
                raise recipe_error(
                    f"release row {item.get('index', '?')}: the video processor gives {rec['path']} the grid {t}x{h}x{w} "
                    f"(t, h, w patches; {t * h * w // video.frames.merge**2} tokens), the release recorded "
                    f"{'x'.join(map(str, rec['grid']))} ({rec['length']} tokens): the processor's patch_size, merge_size, "
                    f"temporal_patch_size, min_pixels and max_pixels must be the recipe's ({video.rule.describe()}); "
                    "video_processor='qwen2-vl' builds one from the release", key="model.video")
            at += 1
    return out
