"""Dataset items to the batch contract (README, "Loading it in PyTorch"). Packed rows get
no 2-D attention mask and `use_cache=False`, so that transformers detects the packing from
`position_ids` restarting per segment; `attention="4d"` adds a block-diagonal causal mask
instead; `flatten=True` gives the padding-free `[1, T]` form with transformers' varlen
kwargs. Pixels, grids and mRoPE positions come with the images of the batch's rows, audio
features (loader/audio.py) with its clips, video pixels and grids (loader/video.py) with its
videos, whose runs take their mRoPE positions among the images' in token order."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import recipe_error
from .audio import Audio, audio_records, features_checked, load_clips
from .batch import Batch, packed
from .pixels import Pixels, open_image, upright_size
from .records import media_records, rooted, unreadable
from .release_info import ImageRule
from .rope import mrope_positions, segment_starts, vision_runs
from .video import Video, frames_checked, load_videos, video_records

IGNORE_INDEX = -100
ATTENTION = ("packed", "4d")
ON_MISSING = ("error", "skip_row")


@dataclass
class Images:
    """What collate needs to know about a release's images."""

    sources: list[str]
    roots: dict[str, Path | None]
    rule: ImageRule | None
    pixels: Pixels | None = None
    on_missing_image: str = "error"

    def path(self, source: str, path: str) -> str:
        return rooted(self.roots, source, path)


def row_arrays(item: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """labels, position_ids and segment_ids (from 1) of one packed row."""
    ids = item["input_ids"]
    lengths = item["segment_lengths"]
    labels = np.where(item["loss_mask"], ids, IGNORE_INDEX)
    starts = segment_starts(lengths)
    labels[starts[lengths > 0]] = IGNORE_INDEX
    seg = np.repeat(np.arange(1, len(lengths) + 1), lengths)
    pos = np.arange(len(ids)) - np.repeat(starts, lengths)
    return labels, pos, seg


def image_segments(item: dict[str, Any]) -> np.ndarray:
    """The segment (index within the row) of each image of a row."""
    per = item.get("segment_images")
    if per is not None:
        return np.repeat(np.arange(len(per)), per)
    ends = np.cumsum(item["segment_lengths"])
    return np.searchsorted(ends, item["image_positions"], side="right")


def records(item: dict[str, Any], images: Images | None) -> list[dict[str, Any]]:
    """One record per image of a row: source, source row, segment, path (resolved against
    the source's image root where known), row-relative position and token length."""
    out = media_records(item, image_segments(item), item["image_paths"], item["image_positions"], item["image_lengths"],
                        images.sources if images is not None else None, images.roots if images is not None else None)
    for rec in out:
        rec["grid"] = None
    stored = item.get("image_grids")
    if stored is not None and len(stored) == len(out):
        for rec, g in zip(out, stored):
            rec["grid"] = tuple(int(x) for x in g)
    return out



def _grid(h: int, w: int, rule: ImageRule) -> tuple[int, int, int]:
    """The Qwen2-VL `smart_resize` grid (t, h, w in patches) of an image, as the build counts it."""
    f = rule.patch * rule.merge
    hb, wb = max(f, round(h / f) * f), max(f, round(w / f) * f)
    if hb * wb > rule.max_pixels:
        beta = (h * w / rule.max_pixels) ** 0.5
        hb, wb = max(f, int(h / beta // f) * f), max(f, int(w / beta // f) * f)
    elif hb * wb < rule.min_pixels:
        beta = (rule.min_pixels / (h * w)) ** 0.5
        hb, wb = int(-(-h * beta // f)) * f, int(-(-w * beta // f)) * f
    return 1, hb // rule.patch, wb // rule.patch


def _load(items: list[dict[str, Any]], recs: list[list[dict[str, Any]]], images: Images, decode: bool):
    """The rows whose images all open (all rows, or an error, under on_missing_image =
    "error"), each with its opened images (decode) or their upright sizes."""
    kept, opened, skipped = [], [], []
    for item, row in zip(items, recs):
        got = []
        try:
            for rec in row:
                got.append(open_image(rec["path"]) if decode else upright_size(rec["path"]))
        except Exception as err:  # noqa: BLE001 - any unreadable file is the same data error
            if images.on_missing_image == "error":
                raise unreadable(item, rec, err, "image") from err
            skipped.append(int(item.get("index", -1)))
            continue
        kept.append((item, row))
        opened.append(got)
    return kept, opened, skipped


class Collator:
    """A picklable collate function: dataset items to a `Batch`."""

    def __init__(self, pad_token_id: int = 0, flatten: bool = False, pad_to: int | None = None, *,
                 attention: str = "packed", mask_dtype: torch.dtype = torch.float32,
                 images: Images | None = None, mrope: bool | None = None, audio: Audio | None = None,
                 video: Video | None = None):
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, not {attention!r}")
        if flatten and attention == "4d":
            raise ValueError("attention='4d' is for the padded form; flatten=True attends through varlen kwargs")
        if images is not None and images.on_missing_image not in ON_MISSING:
            raise ValueError(f"on_missing_image must be one of {ON_MISSING}, not {images.on_missing_image!r}")
        if audio is not None and audio.on_missing not in ON_MISSING:
            raise ValueError(f"on_missing_audio must be one of {ON_MISSING}, not {audio.on_missing!r}")
        if video is not None and video.on_missing not in ON_MISSING:
            raise ValueError(f"on_missing_video must be one of {ON_MISSING}, not {video.on_missing!r}")
        if video is not None and video.tokens_per_second is not None and video.frames is None:
            raise ValueError("video_tokens_per_second spaces frames by each clip's sampled frame rate: give a video_processor too")
        self.audio, self.video = audio, video
        rule = images.rule if images is not None else None
        self.pad_token_id, self.flatten, self.pad_to = pad_token_id, flatten, pad_to
        self.attention, self.mask_dtype, self.images = attention, mask_dtype, images
        grid = rule is not None and rule.grid
        grid_video = video is not None and video.rule.grid
        self.mrope = bool(grid or (rule is None and grid_video)) if mrope is None else mrope
        if self.mrope and (rule is not None and not rule.grid or rule is None and not grid_video):
            raise ValueError("mRoPE positions need a release with the grid image rule (model.image.patch/merge) or videos")
        # One spatial merge for the row's positions: the model has one.
        merges = {m for m in (rule.merge if grid else None, video.rule.merge if grid_video else None) if m}
        if len(merges) > 1:
            raise ValueError(f"model.image.merge and model.video.merge differ ({sorted(merges)}); a Qwen2-VL model merges both alike")

    def __call__(self, batch: Sequence[dict[str, Any]]) -> Batch:
        items = list(batch)
        skipped: list[int] = []
        extra: dict[str, Any] = {}
        clips: dict[int, list[Any]] = {}  # id(item): its decoded clips
        audio = self.audio
        if audio is not None and audio.features is not None:
            arecs = [audio_records(it, audio) for it in items]
            kept, decoded, skipped = load_clips(items, arecs, audio)
            items = [k[0] for k in kept]
            clips = {id(k[0]): got for k, got in zip(kept, decoded)}
        videos: dict[int, list[Any]] = {}  # id(item): its sampled clips
        video = self.video
        if video is not None and video.frames is not None:
            vrecs = [video_records(it, video) for it in items]
            kept, decoded, skipped_videos = load_videos(items, vrecs, video)
            skipped = sorted(skipped + skipped_videos)
            items = [k[0] for k in kept]
            videos = {id(k[0]): got for k, got in zip(kept, decoded)}
        recs = [records(it, self.images) for it in items]
        grids: list[list[tuple[int, ...]]] = [[] for _ in items]
        images = self.images
        recorded = all(rec["grid"] is not None for row in recs for rec in row)
        if images is not None and images.pixels is None and self.mrope and recorded:
            grids = [[rec["grid"] for rec in row] for row in recs]  # the release's grids: no file opened
        elif images is not None and (images.pixels is not None or self.mrope) and any(recs):
            decode = images.pixels is not None
            kept, opened, skipped_images = _load(items, recs, images, decode)
            skipped = sorted(skipped + skipped_images)
            items, recs = [k[0] for k in kept], [k[1] for k in kept]
            grids = self._grids(items, recs, opened, extra) if decode else [
                [_grid(h, w, images.rule) for h, w in sizes] for sizes in opened]  # type: ignore[arg-type]
            for row, row_grids in zip(recs, grids):
                for rec, g in zip(row, row_grids):
                    rec["grid"] = tuple(int(x) for x in g) if g is not None else None
        audio_recs = [audio_records(it, audio) for it in items]
        if clips:  # the features of the rows kept (after the images' skips, too)
            extra.update(features_checked(items, audio_recs, [clips[id(it)] for it in items], audio))  # type: ignore[arg-type]
        video_recs = [video_records(it, video) for it in items]
        if videos:  # the frames of the rows kept (after the images' skips, too)
            extra.update(frames_checked(items, video_recs, [videos[id(it)] for it in items], video))  # type: ignore[arg-type]
        per_row = [row_arrays(it) for it in items]
        fields = {"images": recs, "rows": [int(it.get("index", -1)) for it in items], "skipped": skipped,
                  "audio": audio_recs, "videos": video_recs}
        if self.flatten:
            return self._flat(items, per_row, grids, extra, fields)
        return self._padded(items, per_row, grids, extra, fields)

    def _grids(self, items, recs, opened, extra) -> list[list[Any]]:
        """Pixels for the images of the kept rows, in the order the model scatters them,
        checked against the release's run lengths; the grid of each image."""
        pixels = self.images.pixels if self.images is not None else None
        assert pixels is not None
        flat = [img for row in opened for img in row]
        if not flat:
            return [[] for _ in items]
        out = pixels(flat)
        extra.update(out)
        sizes = [(img.height, img.width) for img in flat]
        counts = pixels.counts(out, sizes)
        thw = out.get("image_grid_thw")
        grids = thw.tolist() if thw is not None else [None] * len(flat)
        if counts is not None:
            at = 0
            for item, row in zip(items, recs):
                for rec in row:
                    if counts[at] != rec["length"]:
                        msg = pixels.mismatch(counts[at], rec["length"], rec["path"], grids[at])
                        raise recipe_error(f"release row {item.get('index', '?')}: {msg}", key="model.image")
                    got = tuple(int(x) for x in grids[at]) if grids[at] is not None else None
                    if got is not None and rec["grid"] is not None and got != rec["grid"]:
                        raise recipe_error(
                            f"release row {item.get('index', '?')}: the image processor gives image {rec['path']} the "
                            f"grid {got}, the release recorded {rec['grid']} for it (t, h, w patches); the image "
                            "changed since the build, or the processor's settings differ from model.image", key="model.image")
                    at += 1
        it = iter(grids)
        return [[next(it) for _ in row] for row in recs]

    def _merge(self) -> int:
        images = self.images
        if images is not None and images.rule is not None and images.rule.grid:
            return images.pixels.merge if images.pixels is not None else images.rule.merge
        assert self.video is not None
        return self.video.rule.merge

    def _positions(self, item, pos, grids_row, video_row) -> np.ndarray:
        if not self.mrope:
            return pos
        video_row = [r for r in video_row if r["grid"] is not None]  # a fixed count's clips have no grid
        tps = self.video.tokens_per_second if self.video is not None else None
        # Qwen2.5-VL's interval, in float32 as the model multiplies it
        spaced = None if tps is None else np.float32(tps) * np.array([r["seconds_per_grid"] for r in video_row], np.float32)
        starts, grids, intervals = vision_runs(
            np.asarray(item["image_positions"], dtype=np.int64), np.asarray(grids_row, np.int64).reshape(-1, 3),
            np.array([r["position"] for r in video_row], np.int64), np.array([r["grid"] for r in video_row], np.int64), spaced)
        return mrope_positions(item["segment_lengths"], starts, grids, self._merge(), intervals)

    def _mm_types(self, item) -> np.ndarray:
        """1 on image tokens, 2 on video tokens (the models' mm_token_type_ids)."""
        types = np.zeros(len(item["input_ids"]), np.int64)
        for p, n in zip(item["image_positions"], item["image_lengths"]):
            types[p : p + n] = 1
        for p, n in zip(item.get("video_positions", ()), item.get("video_lengths", ())):
            types[p : p + n] = 2
        return types

    def _padded(self, items, per_row, grids, extra, fields) -> Batch:
        width = self.pad_to or max((len(it["input_ids"]) for it in items), default=0)
        n, planes = len(items), 4 if self.mrope else 1
        ids = np.full((n, width), self.pad_token_id, np.int64)
        labels = np.full((n, width), IGNORE_INDEX, np.int64)
        positions = np.zeros((planes, n, width), np.int64)
        seg = np.zeros((n, width), np.int64)
        types = np.zeros((n, width), np.int64)
        for r, (it, (lab, pos, sid)) in enumerate(zip(items, per_row)):
            k = len(it["input_ids"])
            if k > width:
                raise ValueError(f"row of {k} tokens does not fit pad_to={width}")
            ids[r, :k], labels[r, :k], seg[r, :k] = it["input_ids"], lab, sid
            positions[:, r, :k] = self._positions(it, pos, grids[r], fields["videos"][r])
            if self.mrope:
                types[r, :k] = self._mm_types(it)
        arrays = {"input_ids": (True, ids, "int64"), "labels": (True, labels, "int64"),
                  "position_ids": (True, positions if self.mrope else positions[0], "int64"),
                  "segment_ids": (False, seg, "int64"), "padding_mask": (False, (seg > 0).astype(np.int64), "int64")}
        if self.mrope:
            arrays["mm_token_type_ids"] = (True, types, "int64")
        lengths = np.concatenate([it["segment_lengths"] for it in items]) if items else np.zeros(0, np.int64)
        arrays["cu_seqlens"] = (False, np.concatenate([[0], np.cumsum(lengths)]), "int32")
        fields["max_seqlen"] = int(lengths.max()) if len(lengths) else 0
        batch = packed(arrays, {"use_cache": False, **extra}, fields)
        if self.attention == "4d":
            s = batch.segment_ids
            allowed = (s[:, :, None] == s[:, None, :]) & torch.ones(width, width, dtype=torch.bool).tril()
            mask = torch.zeros(n, 1, width, width, dtype=self.mask_dtype)
            batch["attention_mask"] = mask.masked_fill_(~allowed[:, None], torch.finfo(self.mask_dtype).min)
        return batch

    def _flat(self, items, per_row, grids, extra, fields) -> Batch:
        total = sum(len(it["input_ids"]) for it in items)
        planes = 4 if self.mrope else 1
        positions = np.zeros((planes, 1, total), np.int64)
        at = 0
        shift_recs: list[dict[str, Any]] = []
        shift_audio: list[dict[str, Any]] = []
        shift_videos: list[dict[str, Any]] = []
        for r, (it, (_, pos, _)) in enumerate(zip(items, per_row)):
            k = len(it["input_ids"])
            positions[:, 0, at : at + k] = self._positions(it, pos, grids[r], fields["videos"][r])
            shift_recs += [{**rec, "position": rec["position"] + at, "row": r} for rec in fields["images"][r]]
            shift_audio += [{**rec, "position": rec["position"] + at, "row": r} for rec in fields["audio"][r]]
            shift_videos += [{**rec, "position": rec["position"] + at, "row": r} for rec in fields["videos"][r]]
            at += k
        cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64))
        seg_offsets = np.cumsum([0] + [len(it["segment_lengths"]) for it in items])[:-1]
        lengths = cat([it["segment_lengths"] for it in items])
        cu = np.concatenate([[0], np.cumsum(lengths)])
        longest = int(lengths.max()) if len(lengths) else 0
        arrays = {"input_ids": (True, cat([it["input_ids"] for it in items])[None], "int64"),
                  "labels": (True, cat([p[0] for p in per_row])[None], "int64"),
                  "position_ids": (True, positions if self.mrope else positions[0], "int64"),
                  "segment_ids": (False, cat([p[2] + o for p, o in zip(per_row, seg_offsets)])[None], "int64"),
                  "cu_seq_lens_q": (True, cu, "int32"), "cu_seq_lens_k": (True, cu, "int32"),
                  "cu_seqlens": (False, cu, "int32")}
        if self.mrope:
            arrays["mm_token_type_ids"] = (True, cat([self._mm_types(it) for it in items])[None], "int64")
        fields.update(images=shift_recs, audio=shift_audio, videos=shift_videos, max_seqlen=longest)
        items_out = {"use_cache": False, "max_length_q": longest, "max_length_k": longest, **extra}
        return packed(arrays, items_out, fields)
