"""The boundary with the Rust core: batches and packed rows cross as arrays by name, the
emitted names are the release's columns, and the core's errors are the public classes."""

from __future__ import annotations

import json
import os
import pickle
import signal
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import MODEL

from mmrecipe import _core, errors

PACKED_KEYS = {
    "row_offsets", "input_ids", "loss_mask",
    "segment_offsets", "segment_lengths", "segment_source", "segment_row", "segment_part",
    "segment_template", "segment_repeat", "segment_images",
    "image_offsets", "image_positions", "image_lengths", "image_path_offsets", "image_path_data",
    "image_grid_t", "image_grid_h", "image_grid_w",
    "audio_offsets", "audio_positions", "audio_lengths", "audio_path_offsets", "audio_path_data", "audio_samples",
    "video_offsets", "video_positions", "video_lengths", "video_path_offsets", "video_path_data", "video_grid_t",
    "video_grid_h", "video_grid_w", "video_frames",
}  # fmt: skip


def compiler(**kw) -> _core.Compiler:
    plan = {
        "seed": 0,
        "chat_template": _core.builtin_template("chatml"),
        "eos_token": "<|im_end|>",
        "seq_len": 64,
        "mixture": "natural",
        "sources": [{"name": "a"}],
    }
    return _core.Compiler(json.dumps(plan).encode(), str(MODEL / "tokenizer.json"), 1, **kw)


def strings(values: list[str]) -> tuple[np.ndarray, np.ndarray]:
    data = [v.encode() for v in values]
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in data])]).astype(np.int64)
    return offsets, np.frombuffer(b"".join(data), dtype=np.uint8).copy()


def columns(conversations: list[list[tuple[int, str]]]) -> dict:
    roles = [r for c in conversations for r, _ in c]
    content_offsets, content_data = strings([t for c in conversations for _, t in c])
    return {
        "rows": np.arange(len(conversations), dtype=np.uint64),
        "turn_offsets": np.concatenate([[0], np.cumsum([len(c) for c in conversations])]).astype(np.int64),
        "roles": np.array(roles, dtype=np.uint8),
        "content_offsets": content_offsets,
        "content_data": content_data,
        "image_offsets": np.zeros(len(conversations) + 1, dtype=np.int64),
        "image_path_offsets": np.zeros(1, dtype=np.int64),
        "image_path_data": np.zeros(0, dtype=np.uint8),
        "fields": [],
    }


CHATS = [[(1, "hi"), (2, "hello")], [(1, "how are you?"), (2, "fine, thanks")]]


def test_batches_cross_by_name_and_rows_come_back_by_column_name():
    c = compiler()
    assert c.add_batch(0, columns(CHATS)) == 2
    c.finish()
    packed = c.emit(0, 10)
    assert set(packed) == PACKED_KEYS
    assert packed["row_offsets"][-1] == len(packed["input_ids"]) > 0
    assert packed["segment_offsets"][-1] == len(packed["segment_lengths"]) == 2


def test_a_batch_without_a_named_array_is_refused():
    bad = columns(CHATS)
    del bad["roles"]
    with pytest.raises(Exception, match="roles"):
        compiler().add_batch(0, bad)


def test_release_columns_are_the_columns_of_a_shard(demo_release):
    """One vocabulary: what the core emits, what release.format names and types, and what
    a shard holds are the same columns in the same order."""
    from mmrecipe.release.format import COLUMN_NAMES, COLUMNS, OFFSETS

    shard = next((demo_release / "data").glob("*.parquet"))
    schema = pq.read_schema(shard)
    assert schema.names == _core.release_columns() == list(COLUMN_NAMES)
    assert [schema.field(c.name).type.value_type for c in COLUMNS] == [c.type for c in COLUMNS]
    assert set(_core.release_columns()) - {"image_paths"} <= PACKED_KEYS
    assert set(OFFSETS.values()) <= PACKED_KEYS


ERROR_CLASSES = [name for name in errors.__all__ if name.endswith("Error")]


@pytest.mark.parametrize("name", ERROR_CLASSES)
def test_error_classes_are_the_cores_under_their_public_name(name):
    cls = getattr(errors, name)
    assert cls is getattr(_core, name)
    assert issubclass(cls, errors.MMRecipeError) and cls.__module__ == "mmrecipe.errors"
    assert cls.__doc__


def test_core_errors_keep_their_attributes_through_pickle():
    err = errors.DataError("bad row")
    err.source, err.row, err.field = "a", 3, "messages"
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is errors.DataError and (back.source, back.row, back.field) == ("a", 3, "messages")


def test_recipe_error_key_and_problems():
    plain = errors.RecipeError("x: wrong")
    assert plain.key is None and plain.problems == ["x: wrong"]
    err = errors.recipe_error("two problems", key="x", problems=["x: a", "y: b"])
    assert isinstance(err, errors.RecipeError) and err.key == "x" and err.problems == ["x: a", "y: b"]
    assert errors.recipe_error("one", key="k").problems == ["one"]
    back = pickle.loads(pickle.dumps(err))
    assert (back.key, back.problems) == ("x", ["x: a", "y: b"])


def test_plan_errors_name_the_key():
    plan = {"seed": 0, "chat_template": "", "seq_len": 1, "mixture": "natural", "sources": []}
    with pytest.raises(errors.RecipeError) as e:
        _core.Compiler(json.dumps(plan).encode(), str(MODEL / "tokenizer.json"))
    assert e.value.key == "output.seq_len" and e.value.problems == [str(e.value)]


def test_an_unwritable_spill_folder_is_a_storage_error(tmp_path):
    missing = tmp_path / "gone"
    with pytest.raises(errors.StorageError) as e:
        compiler(spill_dir=str(missing))
    assert e.value.path is not None and e.value.path.startswith(str(missing))


def test_calls_out_of_order_are_internal_errors():
    with pytest.raises(errors.InternalError, match="before finish"):
        compiler().emit(0, 1)
    malformed = columns(CHATS)
    malformed["turn_offsets"] = np.array([0, 9, 4], dtype=np.int64)
    with pytest.raises(errors.InternalError, match="turn_offsets"):
        compiler().add_batch(0, malformed)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_runs_the_core_on_threads_of_its_own():
    """A DataLoader worker is a fork: the parent's worker threads are not in it, and a
    pool that handed them work would wait forever."""
    c = compiler()
    c.add_batch(0, columns(CHATS))  # the compiler's pool and the shared one have run here
    offsets, data = strings(["abc"])
    parent_keys = _core.content_keys(b"", offsets, data)
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if both pools work
        try:
            added = c.add_batch(0, columns(CHATS))
            same = bytes(_core.content_keys(b"", offsets, data)) == bytes(parent_keys)
            os._exit(0 if added == 2 and same else 1)
        except BaseException:
            os._exit(2)
    deadline = time.monotonic() + 120  # not a speed check: a hung child fails instead of hanging the run
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung on the core's thread pool")
    assert os.waitstatus_to_exitcode(done[1]) == 0
