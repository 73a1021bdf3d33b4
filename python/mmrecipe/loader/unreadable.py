"""The error for a medium the loader cannot read, named by release row, segment, source row
and path (images and audio clips alike)."""

from __future__ import annotations

from typing import Any

from ..errors import DataError


def unreadable(item: dict[str, Any], rec: dict[str, Any], err: Exception, field: str) -> DataError:
    """A DataError for record `rec` (a medium of release row `item`) that raised `err`."""
    e = DataError(f"release row {item.get('index', '?')} (segment {rec['segment']}: source '{rec['source']}', "
                  f"row {rec['source_row']}): cannot read {field} {rec['path']}: {err}")
    e.source, e.row, e.field = rec["source"], rec["source_row"], field
    return e
