#!/usr/bin/env python3
"""FlashAttention check of the flattened batch, for a CUDA machine with flash-attn:
tiny random LLaVA and Qwen2-VL models (bf16) get the `[1, T]` batch of
`dataloader(..., flatten=True)` with `attn_implementation="flash_attention_2"` for the
text model, and the loss is compared with the padded packed batch under sdpa.

    python examples/flash_varlen_check.py [RELEASE_LLAVA] [RELEASE_GRID]

Without releases it builds the demo (count rule) and its grid-rule variant. Each line
says which vision attention was used: FlashAttention in the vision tower receives the
text's varlen kwargs too (transformers passes the model's kwargs on to it), which this
script reports rather than hides. Exits 0 and prints "skipped" without CUDA or flash-attn;
exits 1 if the text-flash / vision-sdpa loss differs from sdpa by more than the bf16
tolerance.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TOLERANCE = 2e-2  # bf16 logits; the same model in float64 agrees to 1e-9 (tests/test_vlm_models.py)


def example():
    spec = importlib.util.spec_from_file_location("train_vlm", HERE / "train_vlm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def losses(model, release: Path, processor, recipe_dir: Path) -> list[tuple[str, float | str]]:
    from mmrecipe.torch import dataloader

    def loss_of(batch, attn) -> float | str:
        try:
            model.set_attn_implementation(attn)
            with torch.no_grad():
                return model(**batch.to("cuda")).loss.float().item()
        except Exception as e:  # noqa: BLE001 - reported, not hidden
            return f"error: {type(e).__name__}: {str(e)[:160]}"
        finally:
            model.set_attn_implementation("sdpa")

    ds_rows = list(range(4))
    padded = dataloader(release, batch_size=4, image_processor=processor, recipe_dir=recipe_dir)
    flat = dataloader(release, batch_size=4, flatten=True, image_processor=processor, recipe_dir=recipe_dir)
    items = [padded.dataset[i] for i in ds_rows]
    p, f = padded.collate_fn(items), flat.collate_fn(items)
    no_varlen = type(f)({k: v for k, v in f.items() if not k.startswith(("cu_seq_lens", "max_length"))})
    return [
        ("padded, sdpa", loss_of(p, "sdpa")),
        ("flatten, sdpa", loss_of(f, "sdpa")),
        ("flatten, text flash_attention_2 + vision sdpa", loss_of(f, {"text_config": "flash_attention_2", "vision_config": "sdpa"})),
        ("flatten without varlen kwargs, all flash_attention_2", loss_of(no_varlen, "flash_attention_2")),
        ("flatten, all flash_attention_2", loss_of(f, "flash_attention_2")),
    ]


def main(argv: list[str]) -> int:
    if not torch.cuda.is_available():
        print("skipped: no CUDA device")
        return 0
    if importlib.util.find_spec("flash_attn") is None:
        print("skipped: flash-attn is not installed")
        return 0
    train = example()
    from mmrecipe.torch import PackedDataset
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(train.RECIPES / "models" / "smollm2")) + 4
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        llava_release = Path(argv[0]) if len(argv) > 0 else train.build_demo(Path(tmp) / "a", grid=False)
        grid_release = Path(argv[1]) if len(argv) > 1 else train.build_demo(Path(tmp) / "b", grid=True)
        torch.manual_seed(0)
        cases = [
            ("llava", llava_release, train.tiny_llava, train.CLIPImages(size=32, patch=4)),
            ("qwen2-vl", grid_release, train.tiny_qwen2_vl, "qwen2-vl"),
        ]
        for name, release, make, processor in cases:
            model = make(vocab, PackedDataset(release).image_token_id).to("cuda", torch.bfloat16).eval()
            results = losses(model, release, processor, train.RECIPES)
            reference = results[0][1]
            for label, value in results:
                print(f"{name:9s} {label:52s} {value}")
            checked = results[2][1]
            if not isinstance(checked, float) or not isinstance(reference, float) or abs(checked - reference) > TOLERANCE:
                failed = True
                print(f"{name}: text flash_attention_2 + vision sdpa does not give the sdpa loss")
    print("FAILED" if failed else "ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
