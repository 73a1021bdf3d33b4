"""`recipe diff`: what changed between two releases (inputs, recipe keys, per-source counts)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec

from .format import read_manifest, read_stats


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts and lists as {dotted.key[index]: leaf}, the recipe's key-path style."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, list) and value:
        out = {}
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


_ABSENT = object()


def _change(key: str, old: Any, new: Any) -> dict[str, Any]:
    change: dict[str, Any] = {"key": key}
    if old is not _ABSENT:
        change["old"] = old
    if new is not _ABSENT:
        change["new"] = new
    return change


def _changed_keys(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    keys = list(a) + [k for k in b if k not in a]
    return [_change(k, a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in keys if a.get(k, _ABSENT) != b.get(k, _ABSENT)]


def diff_releases(a: str | Path, b: str | Path, epoch: int = 0) -> dict[str, Any]:
    """What changed from release `a` to release `b`: inputs, recipe keys, release fields,
    per-source counts and totals (of epoch `epoch` in each, for multi-epoch releases; the
    number of epochs is a release field)."""
    ma, mb = read_manifest(a), read_manifest(b)
    ma.epoch(epoch), mb.epoch(epoch)  # both have it
    sa, sb = read_stats(a, epoch), read_stats(b, epoch)

    ins_a = {(i.role, i.path): i for i in ma.inputs}
    ins_b = {(i.role, i.path): i for i in mb.inputs}
    added = [i for k, i in ins_b.items() if k not in ins_a]
    removed = [i for k, i in ins_a.items() if k not in ins_b]
    # Same role and content under another path (a recipe moved, a path made absolute).
    moved = []
    for old in list(removed):
        new = next((i for i in added if i.role == old.role and i.sha256 == old.sha256), None)
        if new is not None:
            moved.append({"role": old.role, "old": old.path, "new": new.path, "sha256": old.sha256})
            removed.remove(old)
            added.remove(new)
    inputs = {
        "added": [msgspec.to_builtins(i) for i in added],
        "removed": [msgspec.to_builtins(i) for i in removed],
        "changed": [
            {"role": i.role, "path": i.path, "old": i.sha256, "new": ins_b[k].sha256}
            for k, i in ins_a.items()
            if k in ins_b and i.sha256 != ins_b[k].sha256
        ],
        "moved": moved,
    }

    fields = ("format", "mmrecipe_version", "chat_template", "seq_len", "pad_token_id")
    release_fields = _changed_keys({f: getattr(ma, f) for f in fields} | {"epochs": ma.epoch_count},
                                   {f: getattr(mb, f) for f in fields} | {"epochs": mb.epoch_count})

    rows_a = {r["name"]: r for r in sa["sources"]}
    rows_b = {r["name"]: r for r in sb["sources"]}
    sources = []
    for name in list(rows_a) + [n for n in rows_b if n not in rows_a]:
        ra, rb = rows_a.get(name, {}), rows_b.get(name, {})
        row: dict[str, Any] = {"name": name}
        for key in ("selected", "tokens", "trained_tokens", "rows", "weight"):
            row[key] = [ra.get(key), rb.get(key)]
        row["changed"] = any(ra.get(k) != rb.get(k) for k in ("selected", "tokens", "trained_tokens", "rows", "weight"))
        sources.append(row)

    totals_a = {k: v for k, v in sa.items() if k != "sources"}
    totals_b = {k: v for k, v in sb.items() if k != "sources"}
    return {
        "a": {"path": str(a), "release_id": ma.release_id},
        "b": {"path": str(b), "release_id": mb.release_id},
        "identical": ma.release_id == mb.release_id,
        "epoch": epoch,
        "inputs": inputs,
        "recipe": _changed_keys(flatten(ma.recipe), flatten(mb.recipe)),
        "release": release_fields,
        "sources": sources,
        "totals": _changed_keys(totals_a, totals_b),
    }


def show(value: Any, width: int = 60) -> str:
    """A value as JSON, cut to `width` characters (chat templates are long)."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 1] + "…"
