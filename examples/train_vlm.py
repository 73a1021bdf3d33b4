#!/usr/bin/env python3
"""Train a tiny vision-language model on a release, on the CPU, with transformers' own
model code: a LLaVA-style model (a CLIP tower whose 64 patch features fill the demo's 64
image tokens per image) or a Qwen2-VL-style one (images cut into 14-pixel patches, the
grid rule). The glue is the model and the optimizer; the loader gives batches that the
model takes as `model(**batch)` (packed rows, pixels, mRoPE positions).

    recipe build recipes/demo.toml -o out/demo
    python examples/train_vlm.py out/demo --model llava --steps 5
    python examples/train_vlm.py --model qwen2-vl --steps 5   # builds a grid-rule demo first

Weights are random: the loss starts near ln(vocabulary) and falls as the model learns the
responses' tokens.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from mmrecipe.loader.pixels import CLIPImages
from mmrecipe.torch import PackedDataset, dataloader

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
# The grid rule with at most 16 image tokens per image keeps the CPU run short.
GRID_RULE = "patch = 14, merge = 2, min_pixels = 3136, max_pixels = 12544 }"


def tiny_llava(vocab_size: int, image_token_id: int, image_size: int = 32, patch: int = 4, hidden: int = 64) -> Any:
    """LLaVA: a 2-layer CLIP tower on `image_size` pixels ((image_size / patch)^2 patch
    features, CLS dropped), a 2-layer Llama."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=image_size, patch_size=patch)
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    return LlavaForConditionalGeneration(config)


def tiny_qwen2_vl(vocab_size: int, image_token_id: int, hidden: int = 64) -> Any:
    """Qwen2-VL: a 1-block vision tower on 14-pixel patches merged 2 x 2, a 2-layer Qwen2
    decoder with mRoPE (2 heads; half of each head's rotary frequencies for time, a quarter
    each for height and width)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    half = hidden // 2 // 2  # rotary frequencies per head
    text = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
                bos_token_id=None, eos_token_id=None,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [half // 2, half // 4, half - half // 2 - half // 4]})
    vision = dict(depth=1, embed_dim=32, hidden_size=hidden, num_heads=2, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    # Token ids the release never holds, for the video and vision start/end markers.
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=image_token_id,
                           video_token_id=vocab_size - 2, vision_start_token_id=vocab_size - 3,
                           vision_end_token_id=vocab_size - 4)
    return Qwen2VLForConditionalGeneration(config)


def build_demo(out: Path, grid: bool, seq_len: int = 2048, samples: int = 400) -> Path:
    """The demo release (with the grid image rule for Qwen2-VL)."""
    from mmrecipe import build

    text = (RECIPES / "demo.toml").read_text()
    if grid:
        text = text.replace("count = 64 }", GRID_RULE)
    text = text.replace("seq_len = 2048", f"seq_len = {seq_len}").replace("samples = 400", f"samples = {samples}")
    text = text.replace('"models/', f'"{RECIPES}/models/').replace('"demo/', f'"{RECIPES}/demo/')
    recipe = out / "demo.toml"
    recipe.write_text(text)
    return build(recipe, out / "release", progress=False).path


def forever(loader: Any) -> Any:
    while True:
        yield from loader


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("release", nargs="?", help="a release (default: build the demo into a temporary folder)")
    ap.add_argument("--model", choices=["llava", "qwen2-vl"], default="llava")
    ap.add_argument("--recipe-dir", default=None,
                    help="the folder of the release's recipe, where its relative image roots start "
                         "(default: the roots the release records, as absolute paths)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        release = Path(args.release) if args.release else build_demo(Path(tmp), grid=args.model == "qwen2-vl")
        from transformers import AutoTokenizer

        vocab = len(AutoTokenizer.from_pretrained(RECIPES / "models" / "smollm2")) + 4
        image_token = PackedDataset(release).image_token_id
        if image_token is None:
            ap.error(f"{release} has no images")
        if args.model == "llava":
            processor: Any = CLIPImages(size=32, patch=4)  # 8 x 8 = 64 patches: the demo's count
            model = tiny_llava(vocab, image_token)
        else:
            processor = "qwen2-vl"  # transformers' Qwen2-VL image processor set to the release's rule
            model = tiny_qwen2_vl(vocab, image_token)
        loader = dataloader(release, batch_size=args.batch_size, image_processor=processor, recipe_dir=args.recipe_dir,
                            shuffle=True, num_workers=args.workers, generator=torch.Generator().manual_seed(args.seed))
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
        model.train()
        for step, batch in enumerate(itertools.islice(forever(loader), args.steps)):
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            print(f"step {step:3d}  loss {loss.item():.4f}  rows {len(batch.rows)}  images {sum(map(len, batch.images))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
