"""Exact mixtures, template choice and packing, checked on real builds through the
provenance every packed segment carries."""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import MODEL
from hypothesis import given, settings
from hypothesis import strategies as st

from mmrecipe import RecipeError, build
from mmrecipe.release.format import read_manifest


def largest_remainder(weights: list[float], total: int) -> list[int]:
    """Independent reference: exact rationals, ties to the earlier source."""
    w = [Fraction(x) for x in weights]
    quotas = [x / sum(w) * total for x in w]
    counts = [int(q) for q in quotas]
    order = sorted(range(len(w)), key=lambda i: (-(quotas[i] - int(quotas[i])), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def write_sources(folder: Path, sizes: list[int]) -> None:
    for s, n in enumerate(sizes):
        with open(folder / f"s{s}.jsonl", "w") as f:
            for r in range(n):
                f.write(json.dumps({"question": f"question {s}-{r} " + "word " * (r % 7), "answer": f"answer {r}" + " more" * (r % 5)}) + "\n")


def recipe_text(sizes, weights, mixture: str, seed=1, extra_output="", extra_source="") -> str:
    out = f"""
[recipe]
name = "mix"
seed = {seed}
[model]
tokenizer = "{MODEL}"
[output]
seq_len = 256
{extra_output}
[mixture]
total = {mixture}
"""
    for s, w in enumerate(weights):
        out += f"""
[[source]]
name = "s{s}"
path = "s{s}.jsonl"
layout = "qa"
fields = {{ question = "question", answer = "answer" }}
instructions = "vqa-short"
weight = {w!r}
{extra_source}
"""
    return out


def segments(release: Path) -> list[dict]:
    m = read_manifest(release)
    rows = []
    for shard in m.shards:
        t = pq.read_table(release / shard.path)
        for r in t.to_pylist():
            assert sum(r["segment_lengths"]) == len(r["input_ids"]) <= m.seq_len
            for k in range(len(r["segment_lengths"])):
                rows.append({c: r[f"segment_{c}"][k] for c in ("source", "row", "repeat", "template", "part")})
    return rows


def do_build(folder: Path, text: str, name: str = "out") -> Path:
    (folder / f"{name}.toml").write_text(text)
    return build(folder / f"{name}.toml", folder / name, progress=False).path


@settings(max_examples=15, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 25), min_size=1, max_size=4),
    data=st.data(),
)
def test_counts_exact_and_every_sample_packed_once(sizes, data):
    weights = data.draw(st.lists(st.floats(0.05, 10), min_size=len(sizes), max_size=len(sizes)))
    total = data.draw(st.integers(1, 150))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_sources(folder, sizes)
        segs = segments(do_build(folder, recipe_text(sizes, weights, f"{{ samples = {total} }}")))
    counts = Counter(s["source"] for s in segs)
    assert [counts[i] for i in range(len(sizes))] == largest_remainder(weights, total)
    # Every selected sample exactly once; whole passes before any partial one.
    keys = Counter((s["source"], s["row"], s["repeat"]) for s in segs)
    assert max(keys.values()) == 1
    for src, n in enumerate(sizes):
        reps = Counter(s["repeat"] for s in segs if s["source"] == src)
        full = [r for r, c in reps.items() if c == n]
        assert sorted(reps) == list(range(len(reps))) and len(full) >= len(reps) - 1


@settings(max_examples=10, deadline=None)
@given(sizes=st.lists(st.integers(3, 20), min_size=2, max_size=4), data=st.data())
def test_every_prefix_tracks_the_target_shares(sizes, data):
    weights = data.draw(st.lists(st.floats(0.1, 5), min_size=len(sizes), max_size=len(sizes)))
    total = data.draw(st.integers(10, 120))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_sources(folder, sizes)
        text = recipe_text(sizes, weights, f"{{ samples = {total} }}", extra_output='packing = "none"\nshuffle = false')
        order = [s["source"] for s in segments(do_build(folder, text))]
    counts = Counter(order)
    seen = Counter()
    for t, src in enumerate(order, start=1):
        seen[src] += 1
        for s, c in counts.items():
            assert abs(seen[s] - c * t / total) < 1 + 1e-9


def test_weight_change_keeps_other_sources_template_choices(tmp_path):
    sizes = [20, 30, 25]
    write_sources(tmp_path, sizes)
    a = segments(do_build(tmp_path, recipe_text(sizes, [1.0, 1.0, 1.0], "{ samples = 120 }"), "a"))
    b = segments(do_build(tmp_path, recipe_text(sizes, [1.0, 3.0, 1.0], "{ samples = 120 }"), "b"))
    choice_a = {(s["source"], s["row"]): s["template"] for s in a}
    choice_b = {(s["source"], s["row"]): s["template"] for s in b}
    shared = set(choice_a) & set(choice_b)
    assert len(shared) > 40
    assert all(choice_a[k] == choice_b[k] for k in shared)
    assert len(set(choice_a.values())) > 3  # the pool is actually sampled
    c = segments(do_build(tmp_path, recipe_text(sizes, [1.0, 1.0, 1.0], "{ samples = 120 }", seed=2), "c"))
    choice_c = {(s["source"], s["row"]): s["template"] for s in c}
    assert any(choice_a[k] != choice_c[k] for k in set(choice_a) & set(choice_c))


def test_token_totals(tmp_path):
    sizes = [10, 40]
    write_sources(tmp_path, sizes)
    out = do_build(tmp_path, recipe_text(sizes, [1.0, 1.0], "{ tokens = 6000 }"))
    stats = json.loads((out / "stats.json").read_text())
    for s in stats["sources"]:
        # Each source reaches its share (3000) and overshoots by less than one sample.
        assert 3000 <= s["tokens"] < 3000 + 256


def test_max_epochs_and_temperature(tmp_path):
    sizes = [5, 50]
    write_sources(tmp_path, sizes)
    with pytest.raises(RecipeError, match=r"source\[0\].max_epochs.*'s0' would be repeated 4.00 times"):
        do_build(tmp_path, recipe_text(sizes, [1.0, 1.0], "{ samples = 40 }", extra_source="max_epochs = 2"))
    flat = tmp_path / "flat.toml"
    flat.write_text(recipe_text(sizes, [1.0, 1.0], "{ samples = 55 }").replace("total =", "alpha = 1.0\ntotal ="))
    stats = build(flat, tmp_path / "flat", progress=False).summary
    assert [s["selected"] for s in stats["sources"]] == [5, 50]  # shares ∝ rows


def test_short_answer_wording(tmp_path):
    write_sources(tmp_path, [3])
    from mmrecipe.preview import preview

    (tmp_path / "r.toml").write_text(recipe_text([3], [1.0], '"natural"', extra_source='short_answer = "word"'))
    for s in preview(tmp_path / "r.toml", n=3):
        assert s.text.count("Answer the question using a single word or phrase.") == 1
