"""The internal form of a source, shared by the readers, the layouts, the LLM stages and
the compiler boundary: one row per sample with its original row number, its turns (role
code, text), its image paths and one text column per template field."""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl

from ..recipe.plan import SourcePlan

ROW, ROLES, CONTENTS, IMAGES = "__row", "__roles", "__contents", "__images"
#: Beside IMAGES, for images held in the source's files (parquet cells): their bytes,
#: one list entry per image, for the core's header reader (never written to a release).
IMAGE_BYTES = "__image_bytes"
#: A source with audio (fields.audio or fields.audios): its clips' paths, relative to the
#: source's audio root, one list per sample. Absent from a source without audio.
AUDIOS = "__audios"
#: A source with video (fields.video or fields.videos): its clips' paths, as AUDIOS.
VIDEOS = "__videos"
#: Set by a container reader on a row it found unusable: why (sources/containers.py).
PROBLEM = "__problem"
SYSTEM, USER, ASSISTANT = 0, 1, 2


def field_column(name: str) -> str:
    """The column holding the resolved mapped field `name` (fields = { name = path })."""
    return f"__f_{name}"


def template_column(name: str) -> str:
    """The column of template field `name` as text, as the core reads it."""
    return f"__t_{name}"


@dataclass
class Normalized:
    """One source (or one slice of it) in the internal form: columns ROW, ROLES,
    CONTENTS, IMAGES (and IMAGE_BYTES for a parquet source with image bytes, AUDIOS for
    a source with audio), and one
    text column per template field (`template_column`)."""

    source: SourcePlan
    frame: pl.DataFrame
    #: What reading dropped on the way (rows without a join match under on_error = "skip").
    notes: list[str] = field(default_factory=list)
    #: Field keys that resolved to a value on at least one row.
    resolved: set[str] = field(default_factory=set)

    def __len__(self) -> int:
        return self.frame.height
