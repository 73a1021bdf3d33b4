"""The proof with the models' own code: tiny randomly initialized LLaVA and Qwen2-VL from
transformers, float64 on the CPU. For a batch of packed rows, `model(**batch).loss` equals
the token-weighted mean of the same samples run one by one, unpacked, each with only its
own images and the model's default arguments (Qwen2-VL then computes its mRoPE positions
itself); in the padded form (sdpa and eager attention, no mask or a 4-D one) and in the
flattened form, whose varlen kwargs a reference varlen attention consumes."""

from __future__ import annotations

import importlib.util
import re
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmrecipe.loader.pixels import CLIPImages
from mmrecipe.loader.rope import mrope_positions
from mmrecipe.torch import IGNORE_INDEX, PackedDataset, dataloader

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def load_example():
    spec = importlib.util.spec_from_file_location("train_vlm", ROOT / "examples" / "train_vlm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("train_vlm", module)
    spec.loader.exec_module(module)
    return module


class Compact:
    """A compact vocabulary of the ids a release holds: the property under test is about
    attention, positions and pixels, not about which ids there are, and a small head keeps
    float64 logits small."""

    def __init__(self, ds: PackedDataset):
        ids = torch.unique(torch.cat([torch.from_numpy(ds[i]["input_ids"]) for i in range(len(ds))]))
        self.size = len(ids)
        self.lut = torch.full((int(ids.max()) + 1,), -1, dtype=torch.int64)
        self.lut[ids] = torch.arange(len(ids))
        self.image = int(self.lut[ds.image_token_id])

    def __call__(self, batch):
        labels = batch["labels"]
        batch["input_ids"] = self.lut[batch["input_ids"]]
        batch["labels"] = torch.where(labels == IGNORE_INDEX, labels, self.lut[labels.clamp(min=0)])
        return batch


def pick_rows(ds: PackedDataset, n: int = 2) -> list[int]:
    """Rows with images and several segments; the shortest one last, so the padded batch pads."""
    rows = [i for i in range(len(ds)) if len(ds[i]["image_lengths"]) and len(ds[i]["segment_lengths"]) > 2]
    rows.sort(key=lambda i: -len(ds[i]["input_ids"]))
    return rows[:n - 1] + rows[-1:]


def rows_of(batch):
    """(ids, labels, segment ids, image records) per row; the flattened form is one row."""
    flat = batch["input_ids"].shape[0] == 1 and (not batch.images or isinstance(batch.images[0], dict))
    images = [batch.images] if flat else batch.images
    return [(batch["input_ids"][r], batch["labels"][r], batch.segment_ids[r], images[r]) for r in range(len(images))]


def one_by_one(model, batch, image_id: int) -> tuple[float, int]:
    """Summed token loss and token count of every packed sample run alone, unpacked, with
    the model's defaults and only its own pixels."""
    total, count, at = 0.0, 0, 0
    pixels, grids = batch.get("pixel_values"), batch.get("image_grid_thw")
    ends = grids.prod(-1).cumsum(0).tolist() if grids is not None else None
    for ids_row, labels_row, seg, row in rows_of(batch):
        for s in [int(x) for x in seg.unique() if x > 0]:
            where = seg == s
            ids, labels = ids_row[where][None], labels_row[where][None]
            mine = [at + k for k, rec in enumerate(row) if seg[rec["position"]] == s]
            kwargs = {}
            if mine and ends is None:
                kwargs["pixel_values"] = pixels[mine[0] : mine[-1] + 1]
            elif mine:
                lo = ends[mine[0] - 1] if mine[0] else 0
                kwargs.update(pixel_values=pixels[lo : ends[mine[-1]]], image_grid_thw=grids[mine[0] : mine[-1] + 1],
                              mm_token_type_ids=(ids == image_id).long())
            with torch.no_grad():
                loss = model(input_ids=ids, labels=labels, **kwargs).loss
            n = int((labels[0, 1:] != IGNORE_INDEX).sum())
            if n:
                total, count = total + loss.item() * n, count + n
        at += len(row)
    return total, count


def packed_loss(model, batch, **override) -> float:
    with torch.no_grad():
        return model(**{**batch, **override}).loss.item()


def varlen_reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal attention within the segments named by transformers' varlen kwargs, as
    FlashAttention's varlen kernel computes it; it refuses to run without them."""
    cu_q, cu_k = kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"]
    assert kwargs["max_length_q"] == kwargs["max_length_k"] == int(cu_q.diff().max())
    assert torch.equal(cu_q, cu_k) and query.shape[0] == 1 and int(cu_q[-1]) == query.shape[2]
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    out = torch.empty_like(query)
    for lo, hi in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        out[:, :, lo:hi] = torch.nn.functional.scaled_dot_product_attention(
            query[:, :, lo:hi], key[:, :, lo:hi], value[:, :, lo:hi], is_causal=True, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def loss_keeping_dtype(logits, labels, vocab_size, ignore_index=IGNORE_INDEX, **kwargs):
    """transformers' causal LM loss (labels shifted by one, mean over the labelled tokens)
    without its cast of the logits to float32, so that float64 models compare to 1e-9."""
    shifted = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, vocab_size), shifted.reshape(-1), ignore_index=ignore_index)


def float64_model(model):
    model = model.double().eval()
    model.loss_function = loss_keeping_dtype
    return model


# Short rows keep the float64 forwards quick; the demo's data and image rules.
@pytest.fixture(scope="module")
def small_release(tmp_path_factory):
    return load_example().build_demo(tmp_path_factory.mktemp("small"), grid=False, seq_len=512, samples=60)


@pytest.fixture(scope="module")
def grid_release(tmp_path_factory):
    return load_example().build_demo(tmp_path_factory.mktemp("grid"), grid=True, seq_len=512, samples=60)


class Setup:
    """A tiny float64 model on a release, and the loss of that release's chosen rows run
    one by one (the reference, computed once per attention implementation)."""

    def __init__(self, model, compact: Compact, ds: PackedDataset, **loader_kwargs):
        self.model, self.compact, self.ds, self.kwargs = model, compact, ds, loader_kwargs
        self.rows = pick_rows(ds)
        self._alone: dict[str, tuple[float, int]] = {}

    def batch(self, **options):
        loader = dataloader(self.ds.root, **self.kwargs, **options)
        return self.compact(loader.collate_fn([self.ds[i] for i in self.rows]))

    def alone(self, attn: str) -> tuple[float, int]:
        """Summed loss and token count of the rows' samples run one by one."""
        if attn not in self._alone:
            self.model.set_attn_implementation(attn)
            self._alone[attn] = one_by_one(self.model, self.batch(), self.compact.image)
        return self._alone[attn]


@pytest.fixture(scope="module")
def llava(small_release):
    ds = PackedDataset(small_release)
    compact = Compact(ds)
    torch.manual_seed(0)
    model = float64_model(load_example().tiny_llava(compact.size, compact.image, hidden=32))
    return Setup(model, compact, ds, image_processor=CLIPImages(size=32, patch=4))


@pytest.fixture(scope="module")
def qwen(grid_release):
    ds = PackedDataset(grid_release)
    compact = Compact(ds)
    torch.manual_seed(0)
    model = float64_model(load_example().tiny_qwen2_vl(compact.size + 4, compact.image, hidden=32))
    return Setup(model, compact, ds, image_processor="qwen2-vl")


@pytest.mark.parametrize("which", ["llava", "qwen"])
@pytest.mark.parametrize("attn,form", [("sdpa", {}), ("eager", {}), ("eager", {"attention": "4d", "mask_dtype": torch.float64})])
def test_packed_loss_equals_samples_run_one_by_one(request, which, attn, form):
    setup = request.getfixturevalue(which)
    total, count = setup.alone(attn)
    batch = setup.batch(**form)
    assert batch.padding_mask.min() == 0 and len(batch.images[0]) > 0  # padding and images are in it
    assert ("attention_mask" in batch) == bool(form)
    assert count == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) > 0
    setup.model.set_attn_implementation(attn)
    assert abs(packed_loss(setup.model, batch) - total / count) < 1e-9, (packed_loss(setup.model, batch), total / count)
    if attn == "sdpa" and not form:  # transformers' own loss, which computes in float32
        from transformers.loss.loss_utils import ForCausalLMLoss

        setup.model.loss_function = ForCausalLMLoss
        try:
            assert abs(packed_loss(setup.model, batch) - total / count) < 1e-5
        finally:
            setup.model.loss_function = loss_keeping_dtype


@pytest.mark.parametrize("which", ["llava", "qwen"])
def test_flattened_loss_equals_samples_run_one_by_one(request, which):
    from transformers import AttentionInterface

    setup = request.getfixturevalue(which)
    total, count = setup.alone("sdpa")
    batch = setup.batch(flatten=True)
    assert batch["input_ids"].shape[0] == 1 and int(batch["cu_seq_lens_q"][-1]) == batch["input_ids"].shape[1]
    setup.model.set_attn_implementation("sdpa")
    assert abs(packed_loss(setup.model, batch) - total / count) < 1e-9
    # The varlen kwargs reach the text attention under the names transformers uses: an
    # attention that runs on them alone gives the same loss.
    calls = []
    AttentionInterface.register("varlen_reference", lambda *a, **kw: (calls.append(1), varlen_reference(*a, **kw))[1])
    setup.model.set_attn_implementation({"text_config": "varlen_reference", "vision_config": "sdpa"})
    try:
        assert abs(packed_loss(setup.model, batch) - total / count) < 1e-9
    finally:
        setup.model.set_attn_implementation("sdpa")
    assert len(calls) == 2  # one per decoder layer


@pytest.mark.parametrize("which", ["llava", "qwen"])
def test_no_2d_mask_or_cache_reaches_a_packed_forward(request, which):
    setup = request.getfixturevalue(which)
    model = setup.model
    total, count = setup.alone("sdpa")
    model.set_attn_implementation("sdpa")
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    try:
        for form in ({}, {"flatten": True}):
            packed_loss(model, setup.batch(**form))
    finally:
        hook.remove()
    assert len(seen) == 2
    assert all(kw.get("attention_mask") is None and kw.get("use_cache") is False for kw in seen), seen
    # The controls: the old batch (a 2-D mask, or the model's default use_cache=True)
    # attends across segments, and pixels in another order change the loss, so the
    # equalities above (to 1e-9) are no coincidence.
    batch = setup.batch()
    assert abs(packed_loss(model, batch, attention_mask=batch.padding_mask) - total / count) > 1e-7
    assert abs(packed_loss(model, {k: v for k, v in batch.items() if k != "use_cache"}) - total / count) > 1e-7
    assert abs(packed_loss(model, batch, pixel_values=batch["pixel_values"].flip(0)) - total / count) > 1e-7
    if which == "qwen":  # text positions on all four rows: packing detected, mRoPE lost
        flat_rope = batch["position_ids"][:1].expand(4, -1, -1)
        assert abs(packed_loss(model, batch, position_ids=flat_rope) - total / count) > 1e-7


def test_mrope_positions_equal_the_models_get_rope_index_per_segment(qwen):
    batch = qwen.batch()
    pos, grids = batch["position_ids"], batch["image_grid_thw"]
    assert pos.shape == (4,) + batch["input_ids"].shape
    at, checked = 0, 0
    for r, row in enumerate(batch.images):
        seg = batch.segment_ids[r]
        for s in [int(x) for x in seg.unique() if x > 0]:
            where = seg == s
            ids = batch["input_ids"][r][where][None]
            types = batch["mm_token_type_ids"][r][where][None]
            assert torch.equal(types, (ids == qwen.compact.image).long())
            mine = [k for k, rec in enumerate(row) if seg[rec["position"]] == s]
            if mine:
                g = grids[at + mine[0] : at + mine[-1] + 1]
                expected, _ = qwen.model.model.get_rope_index(ids, types, image_grid_thw=g)
                assert torch.equal(pos[1:, r][:, where], expected[:, 0])
                checked += 1
            else:
                assert torch.equal(pos[1:, r][:, where], torch.arange(int(where.sum())).expand(3, -1))
            assert torch.equal(pos[0, r][where], torch.arange(int(where.sum())))
        at += len(row)
    assert checked > 1


def test_thirty_steps_on_the_demo_lower_the_loss(small_release):
    ds = PackedDataset(small_release)
    compact = Compact(ds)
    torch.manual_seed(0)
    model = load_example().tiny_llava(compact.size, compact.image, hidden=32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loader = dataloader(small_release, batch_size=1, image_processor=CLIPImages(32, 4), shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    losses: list[float] = []
    while len(losses) < 30:
        for batch in loader:
            loss = model(**compact(batch)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            if len(losses) == 30:
                break
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses


@pytest.mark.parametrize("which", ["llava", "qwen2-vl"])
def test_example_script_trains(request, which, capsys):
    release = request.getfixturevalue("small_release" if which == "llava" else "grid_release")
    assert load_example().main([str(release), "--model", which, "--steps", "2", "--workers", "0"]) == 0
    losses = [float(m) for m in re.findall(r"step +\d+  loss (\S+)", capsys.readouterr().out)]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses)


def test_grid_positions_without_pixels_come_from_the_release(qwen, tmp_path):
    """Without an image processor the grids are the ones the release records: equal to the
    processor's, and no image file is opened (the release is moved away from its images)."""
    import shutil

    with_pixels = qwen.batch()
    moved = tmp_path / "release"
    shutil.copytree(qwen.ds.root, moved)
    ds = PackedDataset(moved)
    ours = dataloader(moved, image_roots={name: str(tmp_path / "nowhere") for name in ds.raw["image_roots"]}
                      ).collate_fn([ds[i] for i in qwen.rows])
    grids = [r["grid"] for row in ours.images for r in row]
    assert grids and grids == [tuple(g) for g in with_pixels["image_grid_thw"].tolist()]
    assert "pixel_values" not in ours and torch.equal(ours["position_ids"], with_pixels["position_ids"])


def test_a_grid_processor_with_another_rule_is_a_recipe_error_naming_both(qwen):
    from mmrecipe import RecipeError
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    other = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=28 * 28 * 64)
    with pytest.raises(RecipeError, match=r"gives \d+ tokens for .* \(grid 1x\d+x\d+, merge 2\), the release has \d+.*max_pixels = 12544"):
        dataloader(qwen.ds.root, image_processor=other)


segment_pieces = st.lists(st.tuples(st.integers(0, 6), st.integers(1, 4), st.integers(1, 4)), min_size=0, max_size=3)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(segment_pieces, st.integers(0, 5)), min_size=1, max_size=4))
def test_mrope_of_any_packed_row_equals_get_rope_index_per_segment(qwen, segments):
    # Each segment: (text before each image, image h, w in merged patches) pieces, then
    # trailing text. A segment may start or end with an image; images within one are
    # separated by text, as the models' templates do (get_rope_index reads two adjacent
    # images as one).
    model, image_id, merge = qwen.model.model, 7, 2
    ids_row, lengths, starts, grids, alone = [], [], [], [], []
    for pieces, tail in segments:
        ids, seg_grids = [], []
        for k, (text, h, w) in enumerate(pieces):
            ids += [1] * (text if k == 0 else max(text, 1))
            starts.append(len(ids_row) + len(ids))
            ids += [image_id] * (h * w)
            seg_grids.append((1, h * merge, w * merge))
        ids += [1] * (tail if pieces else max(tail, 1))
        ids_t = torch.tensor([ids])
        types = (ids_t == image_id).long()
        g = torch.tensor(seg_grids) if seg_grids else None
        alone.append(model.get_rope_index(ids_t, types, image_grid_thw=g)[0][:, 0] if seg_grids else
                     torch.arange(len(ids)).expand(3, -1))
        ids_row += ids
        lengths.append(len(ids))
        grids += seg_grids
    got = mrope_positions(np.array(lengths), np.array(starts, dtype=np.int64), np.array(grids).reshape(-1, 3), merge)
    assert got.shape == (4, len(ids_row))
    at = 0
    for n, expected in zip(lengths, alone):
        assert np.array_equal(got[1:, at : at + n], expected.numpy())
        assert np.array_equal(got[0, at : at + n], np.arange(n))
        at += n
