"""The loader's view of a release's images, without a model: positions read from the
token ids, image records, roots, pixels, the token-count check, bad input, and batches
crossing from DataLoader workers as whole buffers."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import RECIPES
from hypothesis import given
from hypothesis import strategies as st

from mmrecipe import DataError, RecipeError, ReleaseError
from mmrecipe.loader.image_runs import checked_starts, image_starts, infer_token_id
from mmrecipe.loader.pixels import CLIPImages, open_image, upright_size
from mmrecipe.torch import Batch, PackedDataset, collate, dataloader

IMAGE_ID = 49152  # "<image>" in the SmolLM2 tokenizer
DEMO_IMAGES = RECIPES / "demo" / "data" / "images"


def image_items(ds, n=None):
    items = [ds[i] for i in range(len(ds)) if len(ds._raw(i)["image_lengths"])]
    return items[:n] if n else items


def test_positions_are_row_relative_runs_of_the_image_token(demo_release):
    ds = PackedDataset(demo_release)
    assert ds.image_token_id == IMAGE_ID  # found from the rows: the manifest does not record it
    checked = 0
    for i in range(len(ds)):
        item, raw = ds[i], ds._raw(i)
        ids = item["input_ids"]
        assert (ids == IMAGE_ID).sum() == item["image_lengths"].sum()
        for pos, n in zip(item["image_positions"], item["image_lengths"]):
            run = ids[pos : pos + n]
            assert len(run) == n > 0 and (run == IMAGE_ID).all()
            checked += 1
        # The records agree up to one offset per row (the start of the row in its emitted
        # row group, for releases built before row-relative positions; else 0).
        offset = raw["image_positions"] - item["image_positions"]
        assert (offset == (offset[0] if len(offset) else 0)).all()
    assert checked > 100


def test_checked_starts_tolerates_only_a_row_offset():
    ids = np.array([5, 9, 9, 9, 7, 9, 9, 1])
    lengths = np.array([3, 2])
    assert image_starts(ids, lengths, 9).tolist() == [1, 5]
    assert checked_starts(ids, lengths, np.array([1, 5]), 9, row=0).tolist() == [1, 5]
    assert checked_starts(ids, lengths, np.array([101, 105]), 9, row=3).tolist() == [1, 5]  # pre-fix records
    with pytest.raises(ReleaseError, match="release row 3.*do not match"):
        checked_starts(ids, lengths, np.array([1, 6]), 9, row=3)
    with pytest.raises(ReleaseError, match="release row 4.*rebuild"):
        checked_starts(ids, np.array([2, 3]), np.array([1, 4]), 9, row=4)  # runs cut elsewhere
    # Two images with nothing between them are one run of the token, cut by the lengths.
    assert image_starts(np.array([9, 9, 9, 9, 9]), np.array([2, 3]), 9).tolist() == [0, 2]


@given(st.lists(st.tuples(st.integers(0, 6), st.integers(1, 5)), min_size=1, max_size=6), st.integers(0, 3))
def test_image_runs_are_found_whatever_the_text(pieces, noise):
    # Rows of text (ids 0..6, never the image id) and images of random lengths.
    rng = np.random.default_rng(noise)
    parts, starts, at = [], [], 0
    for text, n in pieces:
        parts += [rng.integers(0, 7, text), np.full(n, 9)]
        starts.append(at + text)
        at += text + n
    ids = np.concatenate(parts)
    lengths = np.array([n for _, n in pieces])
    assert image_starts(ids, lengths, 9).tolist() == starts
    assert infer_token_id([(ids, lengths)]) in (9, None)  # None only when another id fits as well


def test_image_records_name_source_row_and_resolved_path(demo_release):
    loader = dataloader(demo_release, batch_size=4, recipe_dir=RECIPES)
    sources = set(PackedDataset(demo_release).manifest.sources)
    seen = 0
    for batch in loader:
        for r, row in enumerate(batch.images):
            for rec in row:
                assert rec["source"] in sources and rec["source"] != "chat"
                # Resolved against the source's image root (recipes/demo/data for the demo).
                assert Path(rec["path"]).is_file() and Path(rec["path"]).resolve().parent == DEMO_IMAGES.resolve()
                seg = batch.segment_ids[r, rec["position"]]
                assert (batch.segment_ids[r, rec["position"] : rec["position"] + rec["length"]] == seg).all()
                seen += 1
    assert seen > 100


def test_image_roots_move_a_release(demo_release, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.copytree(RECIPES / "demo" / "data", moved)
    roots = {name: moved for name in ("vqa", "captions", "llava")}
    batch = next(iter(dataloader(demo_release, batch_size=2, image_roots=roots, image_processor=CLIPImages(32, 4))))
    assert all(rec["path"].startswith(str(moved)) for row in batch.images for rec in row)
    with pytest.raises(ValueError, match="not sources"):
        dataloader(demo_release, image_roots={"nope": moved})
    with pytest.raises(ReleaseError, match="recipe_dir=.*image_roots="):
        dataloader(demo_release, image_processor=CLIPImages(32, 4))  # roots unknown without recipe_dir


def test_missing_and_broken_images_name_release_row_source_row_and_path(demo_release, tmp_path):
    broken = tmp_path / "data"
    shutil.copytree(RECIPES / "demo" / "data", broken)
    ds = PackedDataset(demo_release)
    first = image_items(ds, 1)[0]
    victim = first["image_paths"][0]
    (broken / victim).write_bytes(b"not an image")
    roots = {name: broken for name in ("vqa", "captions", "llava")}
    with pytest.raises(DataError) as err:
        dataloader(demo_release, image_processor=CLIPImages(32, 4), image_roots=roots)
    msg = str(err.value)
    assert f"release row {first['index']}" in msg and str(broken / victim) in msg and "source '" in msg
    assert err.value.field == "image" and err.value.source in ("vqa", "captions", "llava")
    (broken / victim).unlink()  # now missing altogether
    loader = dataloader(demo_release, batch_size=len(ds), image_processor=CLIPImages(32, 4), image_roots=roots,
                        on_missing_image="skip_row")
    batch = next(iter(loader))
    uses = {int(it["index"]) for it in (ds[i] for i in range(len(ds))) if victim in it["image_paths"]}
    assert set(batch.skipped) == uses and len(uses) > 0
    assert len(batch.rows) == len(ds) - len(uses) == batch["input_ids"].shape[0]
    assert batch["pixel_values"].shape[0] == sum(len(r) for r in batch.images)


def test_a_release_lacking_a_column_says_rebuild(demo_release, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(demo_release, old)
    for shard in (old / "data").glob("*.parquet"):
        table = pq.read_table(shard)
        pq.write_table(table.drop_columns(["segment_images"]), shard)
    with pytest.raises(ReleaseError, match="lacks the column.*segment_images.*rebuild"):
        PackedDataset(old)


def test_an_image_token_id_that_does_not_fit_the_rows_says_rebuild(demo_release, tmp_path):
    odd = tmp_path / "odd"
    shutil.copytree(demo_release, odd)
    manifest = json.loads((odd / "manifest.json").read_text())
    assert manifest["image"]["token_id"] != 2  # the build records the image token's id
    manifest["image"]["token_id"] = 2  # <|im_end|>: its runs are not the images
    (odd / "manifest.json").write_text(json.dumps(manifest))
    ds = PackedDataset(odd)
    row = next(i for i in range(len(ds)) if len(ds._raw(i)["image_lengths"]))
    with pytest.raises(ReleaseError, match=f"release row {row}.*rebuild"):
        ds[row]


def test_builtin_clip_pixels_equal_transformers_clip_processor():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    images = [open_image(str(p)) for p in sorted(DEMO_IMAGES.glob("*.[jp][pn]g"))]
    assert len(images) >= 10
    ours = CLIPImages(size=56, patch=14)(images)["pixel_values"]
    theirs = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})(
        images=images, return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape == (len(images), 3, 56, 56)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def test_exif_orientation_is_applied(tmp_path):
    from PIL import Image

    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown rotated by 90 degrees
    path = tmp_path / "side.jpg"
    img.save(path, exif=exif)
    assert upright_size(str(path)) == (40, 20)
    assert open_image(str(path)).size == (20, 40)
    gray = tmp_path / "gray.png"
    Image.new("L", (8, 8)).save(gray)
    assert open_image(str(gray)).mode == "RGB"


def test_a_processor_with_another_token_count_is_a_recipe_error_naming_both(demo_release, tmp_path):
    from transformers import AutoTokenizer, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    with pytest.raises(RecipeError, match=r"gives 65 tokens.*has 64.*model\.image\.count = 64.*CLS") as err:
        dataloader(demo_release, image_processor=CLIPImages(32, 4, keep_cls=True), recipe_dir=RECIPES)
    assert err.value.key == "model.image"
    tokenizer = AutoTokenizer.from_pretrained(RECIPES / "models" / "smollm2")
    clip = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    for strategy, count in (("full", 65), ("default", 64)):
        full = LlavaProcessor(image_processor=clip, tokenizer=tokenizer, patch_size=4, image_token="<image>",
                              vision_feature_select_strategy=strategy, num_additional_image_tokens=1)
        if count == 64:
            batch = next(iter(dataloader(demo_release, batch_size=2, image_processor=full, recipe_dir=RECIPES)))
            assert batch["pixel_values"].shape[1:] == (3, 32, 32)
        else:
            with pytest.raises(RecipeError, match="gives 65 tokens per image.*the release has 64"):
                dataloader(demo_release, image_processor=full, recipe_dir=RECIPES)
            # A folder goes through AutoProcessor, which knows the count as well.
            full.save_pretrained(tmp_path / "proc")
            with pytest.raises(RecipeError, match="gives 65 tokens per image"):
                dataloader(demo_release, image_processor=str(tmp_path / "proc"), recipe_dir=RECIPES)
    # An image processor alone does not know the model's count: said, not silently skipped.
    with pytest.warns(UserWarning, match="token count per image of this image processor is unknown"):
        dataloader(demo_release, image_processor=clip, recipe_dir=RECIPES)

    def plain(images):  # a callable: list of PIL images -> pixel tensor
        return torch.zeros(len(images), 3, 8, 8)

    plain.tokens_per_image = 63
    with pytest.raises(RecipeError, match="gives 63 tokens per image"):
        dataloader(demo_release, image_processor=plain, recipe_dir=RECIPES)


def test_pixels_follow_the_rows_in_order(demo_release):
    loader = dataloader(demo_release, batch_size=3, image_processor=CLIPImages(32, 4), recipe_dir=RECIPES)
    batch = next(iter(loader))
    paths = [rec["path"] for row in batch.images for rec in row]
    expected = CLIPImages(32, 4)([open_image(p) for p in paths])["pixel_values"]
    assert len(paths) > 1 and torch.equal(batch["pixel_values"], expected)


def test_batch_holds_only_model_inputs_and_no_2d_mask(demo_release):
    ds = PackedDataset(demo_release)
    batch = collate([ds[0], ds[1]], pad_token_id=ds.pad_token_id)
    assert set(batch) == {"input_ids", "labels", "position_ids", "use_cache"} and batch["use_cache"] is False
    assert torch.equal(batch["segment_ids"], batch.segment_ids)  # the loader's own fields, read by name
    assert int(batch.padding_mask.sum()) == int(batch.cu_seqlens[-1])
    with pytest.raises(KeyError, match="packed-sequence detection"):
        batch["attention_mask"]
    four = collate([ds[0], ds[1]], pad_token_id=ds.pad_token_id, attention="4d", mask_dtype=torch.float64)
    mask = four["attention_mask"]
    seg = four.segment_ids
    assert mask.shape == (2, 1, seg.shape[1], seg.shape[1]) and mask.dtype == torch.float64
    open_ = mask[:, 0] == 0
    same = seg[:, :, None] == seg[:, None, :]
    assert torch.equal(open_, same & torch.ones_like(same[0]).tril())
    flat = collate([ds[0], ds[1]], flatten=True)
    assert torch.equal(flat["cu_seq_lens_q"], flat["cu_seq_lens_k"]) and flat["cu_seq_lens_q"].dtype == torch.int32
    assert flat["max_length_q"] == flat["max_length_k"] == int(flat["cu_seq_lens_q"].diff().max())
    assert "cu_seqlens" not in flat and "max_seqlen" not in flat  # a vision tower would take them as its own


def test_worker_batches_arrive_as_one_buffer_and_equal_in_process_ones(demo_release):
    kwargs = dict(batch_size=4, image_processor=CLIPImages(32, 4), recipe_dir=RECIPES)
    here = list(dataloader(demo_release, **kwargs))
    there = list(dataloader(demo_release, num_workers=2, **kwargs))
    assert len(here) == len(there) > 2
    for a, b in zip(here, there):
        assert set(a) == set(b)
        for key in a:
            assert torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key]
        assert a.images == b.images and a.rows == b.rows
        storage = b["input_ids"].untyped_storage().data_ptr()
        for t in (b["labels"], b["position_ids"], b.segment_ids, b.padding_mask):
            assert t.untyped_storage().data_ptr() == storage
    # A batch pickles as its buffer and the layout of the views.
    back = pickle.loads(pickle.dumps(here[0]))
    assert isinstance(back, Batch) and back["labels"].untyped_storage().data_ptr() == back["input_ids"].untyped_storage().data_ptr()
    assert torch.equal(back["labels"], here[0]["labels"]) and back.images == here[0].images
