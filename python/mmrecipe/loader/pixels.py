"""Pixels for a batch: images opened as the model's processors expect them (PIL, RGB, EXIF
orientation applied) and turned into model inputs by an image processor. `Pixels` wraps
any of: a transformers image processor (or a full processor, whose image part is used and
which knows the model's token count per image), a name or folder for
`AutoProcessor` / `AutoImageProcessor.from_pretrained`, a plain callable (list of PIL images -> tensor or
mapping of model inputs), or the built-in `CLIPImages`, which needs no transformers."""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from .. import imageref
from .release_info import ImageRule

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def open_image(path: str) -> Any:
    """The image at `path` decoded, upright (EXIF orientation) and RGB. `path` may be a
    container reference (`mmrecipe.imageref`): a tar member or a parquet cell."""
    from PIL import Image, ImageOps

    with imageref.opened(path) as src, Image.open(src) as img:
        img.load()
        return ImageOps.exif_transpose(img).convert("RGB")


@functools.lru_cache(maxsize=1 << 16)  # datasets ask about the same image many times
def upright_size(path: str) -> tuple[int, int]:
    """(height, width) of an image as `open_image` gives it, from the header only."""
    from PIL import Image

    with imageref.opened(path, header_only=True) as src, Image.open(src) as img:
        w, h = img.size
        if img.getexif().get(0x0112) in (5, 6, 7, 8):  # rotated by 90 degrees
            w, h = h, w
    return h, w


class CLIPImages:
    """CLIP-style pixels: the short side resized to `size` (bicubic), a centred `size` x
    `size` crop, scaled to [0, 1] and normalized. The tower sees (size / patch)^2 patches,
    plus one if it keeps its CLS token."""

    def __init__(self, size: int = 336, patch: int = 14, mean: Sequence[float] = CLIP_MEAN,
                 std: Sequence[float] = CLIP_STD, keep_cls: bool = False):
        if size % patch:
            raise ValueError(f"size {size} is not a multiple of the patch size {patch}")
        self.size, self.patch, self.keep_cls = size, patch, keep_cls
        self.mean = np.asarray(mean, np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, np.float32).reshape(3, 1, 1)
        self.tokens_per_image = (size // patch) ** 2 + int(keep_cls)

    @classmethod
    def for_count(cls, count: int, patch: int = 14, **kwargs: Any) -> "CLIPImages":
        """The pixels for a release whose image rule is `count` tokens, a square grid."""
        side = round(count ** 0.5)
        if side * side != count:
            raise ValueError(f"model.image.count = {count} is not a square number of patches: give CLIPImages(size=..., patch=...) yourself")
        return cls(size=side * patch, patch=patch, **kwargs)

    def one(self, image: Any) -> np.ndarray:
        from PIL import Image

        w, h = image.size
        s = self.size
        oh, ow = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
        arr = np.asarray(image.resize((ow, oh), Image.Resampling.BICUBIC), np.float32).transpose(2, 0, 1)
        top, left = (oh - s) // 2, (ow - s) // 2
        arr = arr[:, top : top + s, left : left + s] / np.float32(255)
        return (arr - self.mean) / self.std

    def __call__(self, images: Sequence[Any]) -> dict[str, torch.Tensor]:
        out = np.empty((len(images), 3, self.size, self.size), np.float32)
        for i, image in enumerate(images):
            out[i] = self.one(image)
        return {"pixel_values": torch.from_numpy(out)}


def _grid_processor(rule: ImageRule) -> Any:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(patch_size=rule.patch, merge_size=rule.merge,
                                    min_pixels=rule.min_pixels, max_pixels=rule.max_pixels)


class Pixels:
    """An image processor behind one interface: `__call__(images)` gives the model inputs
    for a list of PIL images, `counts(...)` the model's tokens per image where it can be
    known (None where not)."""

    def __init__(self, processor: Any, rule: ImageRule):
        self.rule = rule
        self.full = None  # a transformers processor that pairs the image processor with a tokenizer
        if isinstance(processor, str):
            processor = self._named(processor, rule)
        if hasattr(processor, "image_processor") and hasattr(processor, "_get_num_multimodal_tokens"):
            self.full, processor = processor, processor.image_processor
        if not callable(processor):
            raise TypeError(f"image_processor must be callable (an image processor or a function), not {type(processor).__name__}")
        self.processor: Callable[..., Any] = processor
        self.hf = type(processor).__module__.startswith("transformers.")
        self.merge = int(getattr(processor, "merge_size", rule.merge) or rule.merge)
        self.counted: bool | None = None  # whether the last batch's token counts were known

    @staticmethod
    def _named(name: str, rule: ImageRule) -> Any:
        if name == "clip":
            if rule.grid:
                raise ValueError("image_processor='clip' is for a fixed model.image.count; this release uses the grid rule (try 'qwen2-vl')")
            return CLIPImages.for_count(int(rule.count or 0))
        if name == "qwen2-vl":
            if not rule.grid:
                raise ValueError(f"image_processor='qwen2-vl' is for the grid rule; this release has {rule.describe()}")
            return _grid_processor(rule)
        from transformers import AutoImageProcessor, AutoProcessor

        try:  # the full processor knows the model's tokens per image; not every folder has one
            full = AutoProcessor.from_pretrained(name)
            if hasattr(full, "image_processor"):
                return full
        except Exception:  # noqa: BLE001 - fall back to the image processor alone
            pass
        return AutoImageProcessor.from_pretrained(name)

    def __call__(self, images: Sequence[Any]) -> dict[str, torch.Tensor]:
        out = self.processor(images=list(images), return_tensors="pt") if self.hf else self.processor(list(images))
        if isinstance(out, torch.Tensor):
            return {"pixel_values": out}
        if not isinstance(out, Mapping) or "pixel_values" not in out:
            raise TypeError("the image processor must return a tensor or a mapping with 'pixel_values'")
        return {k: v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v)) for k, v in out.items()}

    def counts(self, out: Mapping[str, torch.Tensor], sizes: Sequence[tuple[int, int]]) -> list[int] | None:
        """The model's tokens for each image of `out` (sizes: (height, width) as opened);
        `counted` says afterwards whether they could be known."""
        found = self._counts(out, sizes)
        self.counted = found is not None
        return found

    def _counts(self, out: Mapping[str, torch.Tensor], sizes: Sequence[tuple[int, int]]) -> list[int] | None:
        if "image_grid_thw" in out:
            return (out["image_grid_thw"].prod(-1) // self.merge**2).tolist()
        if self.full is not None:
            counted = self.full._get_num_multimodal_tokens(image_sizes=[list(s) for s in sizes])
            return list(counted.num_image_tokens)
        fixed = getattr(self.processor, "tokens_per_image", None)
        if callable(fixed):
            return [int(fixed(h, w)) for h, w in sizes]
        if fixed is not None:
            return [int(fixed)] * len(sizes)
        return None

    def mismatch(self, got: int, want: int, path: str, grid: Sequence[int] | None) -> str:
        """The message for a processor whose token count is not the release's."""
        if not self.rule.grid:
            return (f"the image processor gives {got} tokens per image ({path}), the release has {want} "
                    f"(recipe key model.image.count = {want}): set model.image.count = {got} in the recipe and "
                    f"rebuild, or make the model give {want} (a CLIP tower that keeps its CLS token gives one "
                    "more: vision_feature_select_strategy = 'default' drops it)")
        t, h, w = (int(x) for x in grid) if grid is not None else (0, 0, 0)
        return (f"the image processor gives {got} tokens for {path} (grid {t}x{h}x{w}, merge {self.merge}), the "
                f"release has {want}: the processor's patch_size, merge_size, min_pixels and max_pixels must be "
                f"the recipe's ({self.rule.describe()}); image_processor='qwen2-vl' builds one from the release")
