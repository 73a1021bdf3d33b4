"""PyTorch access to a release: a map-style `PackedDataset` that reads shards lazily
(memory-mapped Parquet, one row group decoded at a time), `collate`, which turns its items
into a `Batch` that a transformers model takes as `model(**batch)` (the contract is the
table in the README's "Loading it in PyTorch"), and `dataloader`, which puts them together
with pixels from an image processor, audio features from a feature extractor and video
frames through a video processor, all opened in the DataLoader workers. `ReleaseSampler`
splits a release across the ranks of a distributed job and resumes mid-epoch."""

from __future__ import annotations

import bisect
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, Sized

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset, Sampler

from .errors import ReleaseError
from .loader.audio import Audio, Features, audio_roots, audio_rule
from .loader.batch import Batch
from .loader.collate import IGNORE_INDEX, Collator, Images, records
from .loader.image_runs import checked_starts, infer_token_id
from .loader.pixels import Pixels
from .loader.release_info import image_roots, image_rule, missing_roots_error, raw_manifest, recorded_token_id
from .loader.video import Frames, Video, video_roots, video_rule
from .release.format import read_manifest, read_stats

__all__ = ["IGNORE_INDEX", "Batch", "Collator", "EpochWrapWarning", "PackedDataset", "ReleaseSampler", "collate", "dataloader"]

COLUMNS = ("input_ids", "loss_mask", "segment_lengths", "segment_source", "segment_row",
           "image_positions", "image_lengths", "image_paths")
IMAGE_COLUMNS = ("segment_images",)  # needed once a release has images
AUDIO_COLUMNS = ("audio_positions", "audio_lengths", "audio_paths", "audio_samples")  # with an audio rule
VIDEO_COLUMNS = ("video_positions", "video_lengths", "video_paths", "video_grid_t", "video_grid_h", "video_grid_w",
                 "video_frames")  # with a video rule


class EpochWrapWarning(UserWarning):
    """`set_epoch(e)` past the epochs a release holds: epoch e % epochs is read again."""


class PackedDataset(Dataset):
    """One item per packed sequence of a release. `image_positions` of an item are
    row-relative, read from the image token's runs and checked against the release's
    records; `index` is the release row.

    A release built with `[output] epochs = N` holds N epochs, each with its own
    templates, subset, order and packing (and so its own length): `set_epoch(e)` (or
    `epoch=`) reads epoch e, and past N wraps to e % N with an `EpochWrapWarning`."""

    def __init__(self, release: str | Path, image_token_id: int | None = None, epoch: int = 0):
        self.root = Path(release)
        self.release_manifest = read_manifest(self.root)
        self.epochs = self.release_manifest.epoch_count
        self.raw = raw_manifest(self.root)
        self.pad_token_id = self.release_manifest.pad_token_id
        self.seq_len = self.release_manifest.seq_len
        self.rule = image_rule(self.raw)
        self.audio_rule = audio_rule(self.raw)
        self.video_rule = video_rule(self.raw)
        self.epoch = -1
        self.set_epoch(epoch)
        self.image_token_id = image_token_id if image_token_id is not None else recorded_token_id(self.raw)
        if self.image_token_id is None and self.rule is not None:
            self.image_token_id = self._infer_token_id()

    def set_epoch(self, epoch: int) -> None:
        """Reads epoch `epoch` of the release from now on (e % epochs past the last, with
        an EpochWrapWarning). Call it before iterating each epoch; DataLoader workers
        started before the call keep the epoch they had (see `dataloader`)."""
        if epoch < 0:
            raise ValueError(f"epochs count from 0, got {epoch}")
        if epoch >= self.epochs:
            warnings.warn(f"{self.root} holds {self.epochs} epoch(s); epoch {epoch} reads its epoch {epoch % self.epochs} again "
                          f"(build it with [output] epochs = {epoch + 1} or more for fresh samples)", EpochWrapWarning, stacklevel=2)
        part = epoch % self.epochs
        if part == self.epoch:
            return
        self.epoch = part
        self.manifest = self.release_manifest.epoch(part)
        self._groups: list[tuple[int, int]] = []  # (shard, row group)
        starts = [0]
        for s, shard in enumerate(self.manifest.shards):
            pf = pq.ParquetFile(self.root / shard.path)
            self._check_columns(shard.path, pf.schema_arrow.names)
            for g in range(pf.metadata.num_row_groups):
                self._groups.append((s, g))
                starts.append(starts[-1] + pf.metadata.row_group(g).num_rows)
        self._starts = starts
        self._files: dict[int, pq.ParquetFile] = {}
        self._cached: tuple[int, dict[str, Any]] | None = None

    def _check_columns(self, shard: str, names: list[str]) -> None:
        wanted = (COLUMNS + (IMAGE_COLUMNS if self.rule is not None else ()) + (AUDIO_COLUMNS if self.audio_rule is not None else ())
                  + (VIDEO_COLUMNS if self.video_rule is not None else ()))
        lacking = [c for c in wanted if c not in names]
        if lacking:
            raise ReleaseError(f"{self.root}: shard {shard} lacks the column(s) {lacking}, which this loader needs; "
                               "the release was built by an older mmrecipe: rebuild it")

    def _infer_token_id(self) -> int | None:
        rows = []
        for index in range(len(self)):
            raw = self._raw(index)
            if len(raw["image_lengths"]):
                rows.append((raw["input_ids"], raw["image_lengths"]))
                token = infer_token_id(rows)
                if token is not None or len(rows) >= 16:
                    if token is None:
                        break
                    return token
        if rows:
            raise ReleaseError(f"{self.root}: the manifest does not record the image token id and no single token's "
                               "runs match the rows' image lengths; rebuild the release (or pass image_token_id=)")
        return None

    def __len__(self) -> int:
        return self._starts[-1]

    def _group(self, g: int) -> dict[str, Any]:
        if self._cached is not None and self._cached[0] == g:
            return self._cached[1]
        shard, group = self._groups[g]
        if shard not in self._files:
            self._files[shard] = pq.ParquetFile(self.root / self.manifest.shards[shard].path, memory_map=True)
        table = self._files[shard].read_row_group(group)
        cols: dict[str, Any] = {}
        for name in table.column_names:
            arr = table.column(name).combine_chunks()
            offsets = arr.offsets.to_numpy()
            values = arr.values.to_numpy(zero_copy_only=False)
            cols[name] = (offsets, values)
        self._cached = (g, cols)
        return cols

    def _raw(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        g = bisect.bisect_right(self._starts, index) - 1
        cols = self._group(g)
        i = index - self._starts[g]

        def get(name: str, dtype: Any = np.int64) -> Any:
            if name not in cols:
                return None
            offsets, values = cols[name]
            v = values[offsets[i] : offsets[i + 1]]
            return v.astype(dtype) if dtype is not None else list(v)

        item = {name: get(name) for name in ("input_ids", "segment_lengths", "image_positions", "image_lengths",
                                             "segment_source", "segment_row", "segment_images")}
        item["loss_mask"] = get("loss_mask", bool)
        item["image_paths"] = get("image_paths", None)
        item["index"] = index
        if item["segment_images"] is None:
            del item["segment_images"]
        if self.audio_rule is not None:
            for name in ("audio_positions", "audio_lengths", "audio_samples"):
                item[name] = get(name)
            item["audio_paths"] = get("audio_paths", None)
        if self.video_rule is not None:
            for name in ("video_positions", "video_lengths", "video_frames"):
                item[name] = get(name)
            item["video_paths"] = get("video_paths", None)
            item["video_grids"] = np.stack([get(f"video_grid_{axis}") for axis in "thw"], axis=1).reshape(-1, 3)
        thw = [get(f"image_grid_{axis}") for axis in "thw"]
        if all(g is not None for g in thw) and self.rule is not None and self.rule.grid:
            item["image_grids"] = np.stack(thw, axis=1)  # (images, 3); releases before format 3 lack it
        return item

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self._raw(index)
        if len(item["image_lengths"]):
            self._fix_positions(item)
        if self.video_rule is not None and len(item["video_lengths"]):
            self._check_video_runs(item)
        return item

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return [self[i] for i in indices]

    def _fix_positions(self, item: dict[str, Any]) -> None:
        if self.image_token_id is None:
            raise ReleaseError(f"{self.root}: release row {item['index']} has images but the release's recipe has no "
                               "image rule (model.image) and no image token id; rebuild the release")
        starts = checked_starts(item["input_ids"], item["image_lengths"], item["image_positions"],
                                self.image_token_id, item["index"])
        per = item.get("segment_images")
        if per is not None:
            ends = np.cumsum(item["segment_lengths"])
            seg = np.repeat(np.arange(len(per)), per)
            if len(seg) != len(starts) or (len(seg) and not ((starts + item["image_lengths"] <= ends[seg]).all()
                                                              and (starts >= ends[seg] - item["segment_lengths"][seg]).all())):
                raise ReleaseError(f"{self.root}: release row {item['index']}: its segment_images {per.tolist()} do not "
                                   f"place the images at {starts.tolist()} inside their segments; rebuild the release")
        item["image_positions"] = starts

    def _check_video_runs(self, item: dict[str, Any]) -> None:
        """Every recorded video run is a run of the video token, inside the row."""
        token = self.video_rule.token_id if self.video_rule is not None else None
        if token is None:
            return
        ids, n = item["input_ids"], len(item["input_ids"])
        for pos, length in zip(item["video_positions"].tolist(), item["video_lengths"].tolist()):
            if pos + length > n or not (ids[pos : pos + length] == token).all():
                raise ReleaseError(f"{self.root}: release row {item['index']}: its video run at {pos} of {length} tokens is "
                                   f"not a run of the video token (id {token}); the release is inconsistent: rebuild it")


def collate(batch: Sequence[dict[str, Any]], pad_token_id: int = 0, flatten: bool = False,
            pad_to: int | None = None, **options: Any) -> Batch:
    """Dataset items to a `Batch` (see `Collator` for the options)."""
    return Collator(pad_token_id, flatten, pad_to, **options)(batch)


class ReleaseSampler(Sampler[int]):
    """The indices of one rank of a distributed job. Every epoch is a permutation of the
    release drawn from (seed, epoch) alone, so all ranks agree on it without talking; rank
    r takes positions r, r + world_size, ... of it. With `drop_last` the tail that does not
    divide evenly is left out, so the ranks' slices are disjoint and equally long; without
    it the permutation wraps around to fill the last round (a few samples twice), as
    `DistributedSampler` does.

    Call `set_epoch(epoch)` before each epoch. `state_dict()` records the epoch and how many
    indices this sampler has yielded in it; `load_state_dict()` makes the next iteration
    yield exactly the rest. A DataLoader fetches indices ahead of the batches it has handed
    out (prefetching, worker queues), so to resume at a training step, save
    `{**sampler.state_dict(), "yielded": batches_done_this_epoch * batch_size}` rather than the sampler's
    own count.

    Over a multi-epoch `PackedDataset`, `set_epoch(e)` also sets the dataset's epoch (each
    epoch of a release has its own length), so one call per epoch does both."""

    def __init__(
        self,
        dataset: Sized | int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ):
        self.dataset = None if isinstance(dataset, int) else dataset
        size = dataset if isinstance(dataset, int) else len(dataset)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1} (world_size {world_size})")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, not {seed}")
        self.size, self.rank, self.world_size = size, rank, world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self._resize(size)
        self.epoch = 0
        self.yielded = 0

    def _resize(self, size: int) -> None:
        self.size = size
        self.num_samples = size // self.world_size if self.drop_last else -(-size // self.world_size)

    def _follow(self, epoch: int) -> None:
        """The dataset at `epoch` too, where it has epochs of its own."""
        if hasattr(self.dataset, "set_epoch") and getattr(self.dataset, "epochs", 1) > 1:
            self.dataset.set_epoch(epoch)
            self._resize(len(self.dataset))

    def set_epoch(self, epoch: int) -> None:
        # Setting the epoch already in progress keeps the position, so a resumed run can
        # call set_epoch at the top of its loop like any other.
        if epoch != self.epoch:
            self.epoch, self.yielded = epoch, 0
        self._follow(epoch)

    def indices(self) -> list[int]:
        """All of this rank's indices for the current epoch."""
        if self.shuffle:
            # One independent stream per (seed, epoch): no two pairs collide.
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.size).tolist()
        else:
            order = list(range(self.size))
        total = self.num_samples * self.world_size
        if total > len(order) and order:
            order += (order * (total // len(order) + 1))[: total - len(order)]
        return order[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[int]:
        if self.yielded >= self.num_samples:  # a finished epoch iterated again starts over
            self.yielded = 0
        for index in self.indices()[self.yielded :]:
            self.yielded += 1
            yield index

    def __len__(self) -> int:
        return self.num_samples

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "yielded": self.yielded, "seed": self.seed, "world_size": self.world_size, "size": self.size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # A different seed, world size or release would put other samples at each position.
        self._follow(int(state["epoch"]))  # a multi-epoch release's size is its epoch's
        for key in ("seed", "world_size", "size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"cannot resume: the saved {key} is {state[key]}, this sampler's is {getattr(self, key)}")
        self.epoch, self.yielded = int(state["epoch"]), int(state["yielded"])




def _images(ds: PackedDataset, image_processor: Any, roots: Mapping[str, str | Path] | None,
            recipe_dir: str | Path | None, on_missing_image: str) -> Images | None:
    if ds.rule is None:
        if image_processor is not None:
            raise ValueError(f"{ds.root}: the release has no image rule (model.image), so there are no pixels to load")
        return None
    found = image_roots(ds.raw, ds.manifest.sources, roots, recipe_dir)
    pixels = Pixels(image_processor, ds.rule) if image_processor is not None else None
    return Images(ds.manifest.sources, found, ds.rule, pixels, on_missing_image)


def _audio(ds: PackedDataset, audio_processor: Any, roots: Mapping[str, str | Path] | None,
           recipe_dir: str | Path | None, on_missing_audio: str) -> Audio | None:
    if ds.audio_rule is None:
        if audio_processor is not None:
            raise ValueError(f"{ds.root}: the release has no audio rule (model.audio), so there is no audio to load")
        return None
    found = audio_roots(ds.raw, ds.manifest.sources, roots, recipe_dir)
    features = Features(audio_processor, ds.audio_rule) if audio_processor is not None else None
    return Audio(ds.manifest.sources, found, ds.audio_rule, features, on_missing_audio)


def _video(ds: PackedDataset, video_processor: Any, roots: Mapping[str, str | Path] | None,
           recipe_dir: str | Path | None, on_missing_video: str, tokens_per_second: float | None) -> Video | None:
    if ds.video_rule is None:
        if video_processor is not None or tokens_per_second is not None:
            raise ValueError(f"{ds.root}: the release has no video rule (model.video), so there are no videos to load")
        return None
    found = video_roots(ds.raw, ds.manifest.sources, roots, recipe_dir)
    frames = Frames(video_processor, ds.video_rule) if video_processor is not None else None
    return Video(ds.manifest.sources, found, ds.video_rule, frames, on_missing_video, tokens_per_second)


def _first_image_row(ds: PackedDataset) -> int | None:
    for index in range(len(ds)):
        if len(ds._raw(index)["image_lengths"]):
            return index
    return None


def preflight(ds: PackedDataset, collator: Collator) -> None:
    """Before the first batch: the roots of the images are known, and the processor's
    token count for the first image of the release equals its run length (the collator
    raises a RecipeError naming both numbers otherwise)."""
    audio = collator.audio
    if audio is not None and audio.features is not None:
        lacking = sorted({n for n in (ds.raw.get("audio_roots") or {}) if audio.roots.get(n) is None})
        if lacking:
            raise ReleaseError(f"{ds.root}: cannot tell where the audio of source(s) {lacking} is; the manifest records "
                               "it relative to the recipe: pass recipe_dir=THE_RECIPE_FOLDER, or audio_roots={...}")
        first = next((i for i in range(len(ds)) if len(ds._raw(i)["audio_lengths"])), None)
        if first is not None:
            collator([ds[first]])  # the feature extractor's token count checked on a real clip
    video = collator.video
    if video is not None and video.frames is not None:
        lacking = sorted({n for n in (ds.raw.get("video_roots") or {}) if video.roots.get(n) is None})
        if lacking:
            raise ReleaseError(f"{ds.root}: cannot tell where the videos of source(s) {lacking} are; the manifest records "
                               "them relative to the recipe: pass recipe_dir=THE_RECIPE_FOLDER, or video_roots={...}")
        first = next((i for i in range(len(ds)) if len(ds._raw(i)["video_lengths"])), None)
        if first is not None:
            collator([ds[first]])  # the processor's grid checked on a real clip
    images = collator.images
    if images is None or (images.pixels is None and not collator.mrope):
        return
    index = _first_image_row(ds)
    if index is None:
        return
    item = ds[index]
    with_images = {r["source"] for r in records(item, images) if not Path(r["path"]).is_absolute()}
    try:  # stats.json counts each source's images
        with_images |= {s["name"] for s in read_stats(ds.root)["sources"] if s.get("images")}
    except (OSError, KeyError, TypeError, ValueError):
        pass
    lacking = sorted(name for name in with_images if images.roots.get(name) is None)
    if lacking:
        raise missing_roots_error(ds.root, lacking, ds.raw)
    collator([item])
    if images.pixels is not None and images.pixels.counted is False:
        warnings.warn("the token count per image of this image processor is unknown, so it is not checked against "
                      "the release's; pass the full transformers processor (AutoProcessor.from_pretrained) or a "
                      "callable with a `tokens_per_image` attribute", stacklevel=3)


def dataloader(
    release: str | Path,
    batch_size: int = 8,
    flatten: bool = False,
    *,
    image_processor: Any = None,
    image_roots: Mapping[str, str | Path] | None = None,
    recipe_dir: str | Path | None = None,
    on_missing_image: str = "error",
    attention: str = "packed",
    mask_dtype: torch.dtype = torch.float32,
    mrope: bool | None = None,
    pad_to: int | None = None,
    image_token_id: int | None = None,
    audio_processor: Any = None,
    audio_roots: Mapping[str, str | Path] | None = None,
    on_missing_audio: str = "error",
    video_processor: Any = None,
    video_roots: Mapping[str, str | Path] | None = None,
    on_missing_video: str = "error",
    video_tokens_per_second: float | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    seed: int = 0,
    epoch: int = 0,
    **kwargs: Any,
) -> torch.utils.data.DataLoader:
    """A DataLoader over a release whose batches go to a transformers model as
    `model(**batch)`. `image_processor` (a transformers image processor or processor, a
    name or folder for AutoImageProcessor, a callable, `CLIPImages`, or "clip" /
    "qwen2-vl" for one built from the release's image rule) adds `pixel_values` (and
    `image_grid_thw`) from images opened in the workers; their folders come from
    `image_roots={"source": "/path"}`, the manifest, or the recipe embedded in it resolved
    against `recipe_dir`. `on_missing_image="skip_row"` leaves out rows with an unreadable
    image (listed in `batch.skipped`) instead of raising. `attention="4d"` adds a
    block-diagonal mask of `mask_dtype`. `audio_processor` (a transformers feature extractor
    such as WhisperFeatureExtractor, a processor, a name or folder, or a callable) adds
    `input_features` (and `feature_attention_mask`) from clips decoded with soundfile in the
    workers, their folders from `audio_roots=` or the manifest; `on_missing_audio` as
    `on_missing_image`. `video_processor` (a transformers video processor such as
    Qwen2VLVideoProcessor, a processor, a name or folder, a callable, or "qwen2-vl" for one
    built from the release's video rule) adds `pixel_values_videos` and `video_grid_thw`
    from clips decoded with PyAV in the workers (frames sampled as the rule says), each
    clip's grid checked against the release's; `video_roots=` and `on_missing_video` as
    for audio. For Qwen2.5-VL, `video_tokens_per_second=` (its
    `vision_config.tokens_per_second`) spaces the frames' temporal positions as the model
    does and adds `second_per_grid_ts`. Given `rank` and `world_size`, it reads through a
    `ReleaseSampler` (shuffled unless `shuffle=False`, drop_last) reachable as
    `loader.sampler`: call `loader.sampler.set_epoch(epoch)`.

    A multi-epoch release (`[output] epochs = N`) starts at `epoch`; call
    `loader.sampler.set_epoch(e)` (with rank/world_size) or `loader.dataset.set_epoch(e)`
    before iterating epoch e. Workers copy the dataset when an iteration starts, so
    `persistent_workers=True` (which would keep the first epoch) is refused for it."""
    ds = PackedDataset(release, image_token_id=image_token_id, epoch=epoch)
    if ds.epochs > 1 and kwargs.get("persistent_workers"):
        raise ValueError(f"{ds.root} holds {ds.epochs} epochs: persistent DataLoader workers would keep reading the epoch "
                         "they started with; leave persistent_workers off (workers then copy each epoch's dataset)")
    if (rank is None) != (world_size is None):
        raise ValueError("give both rank and world_size, or neither")
    collator = Collator(ds.pad_token_id, flatten, pad_to, attention=attention, mask_dtype=mask_dtype,
                        images=_images(ds, image_processor, image_roots, recipe_dir, on_missing_image), mrope=mrope,
                        audio=_audio(ds, audio_processor, audio_roots, recipe_dir, on_missing_audio),
                        video=_video(ds, video_processor, video_roots, recipe_dir, on_missing_video, video_tokens_per_second))
    preflight(ds, collator)
    if world_size is not None:
        shuffle = kwargs.pop("shuffle", True)
        kwargs["sampler"] = ReleaseSampler(ds, rank=int(rank or 0), world_size=world_size, seed=seed, shuffle=shuffle)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=collator, **kwargs)
