"""The media of a packed row as records (source, source row, segment, path, position,
length), images and audio clips alike, and the error for one the loader cannot read."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import DataError


def media_records(item: dict[str, Any], segments: np.ndarray, paths: Sequence[Any], positions: Sequence[Any],
                  lengths: Sequence[Any], sources: list[str] | None, roots: Mapping[str, Path | None] | None) -> list[dict[str, Any]]:
    """One record per medium of row `item`, in order: `segments` is each one's segment in
    the row; its path is resolved against its source's root where `roots` knows it."""
    out = []
    for k, (path, pos, n) in enumerate(zip(paths, positions, lengths)):
        seg = int(segments[k])
        src = int(item["segment_source"][seg])
        name = sources[src] if sources is not None and src < len(sources) else str(src)
        full = rooted(roots, name, str(path)) if roots is not None else str(path)
        out.append({"source": name, "source_row": int(item["segment_row"][seg]), "segment": seg,
                    "path": full, "position": int(pos), "length": int(n)})
    return out


def rooted(roots: Mapping[str, Path | None], source: str, path: str) -> str:
    """`path` of a file of `source`, under the source's root where known (and `path` is relative)."""
    root = roots.get(source)
    return path if root is None or Path(path).is_absolute() else str(root / path)


def unreadable(item: dict[str, Any], rec: dict[str, Any], err: Exception, field: str) -> DataError:
    """A DataError for record `rec` (a medium of release row `item`) that raised `err`."""
    e = DataError(f"release row {item.get('index', '?')} (segment {rec['segment']}: source '{rec['source']}', "
                  f"row {rec['source_row']}): cannot read {field} {rec['path']}: {err}")
    e.source, e.row, e.field = rec["source"], rec["source_row"], field
    return e
