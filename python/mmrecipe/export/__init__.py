"""Exports of a release for the training stacks people already use: a Hugging Face
`datasets` folder that TRL's SFTTrainer takes as tokenized and packed (`hf`), Megatron-LM
indexed datasets (`megatron`) and MosaicML streaming shards (`mds`). Each reads the
release a row group at a time and writes `export.json` (the source release's id and the
sha256 of every file written), which `recipe verify` checks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import msgspec

from ..errors import ReleaseError
from ..release.guard import check_destination, lock
from ..release.write import staging, write_json
from .common import FORMAT, MANIFEST, ExportManifest, checked_release, hashed, is_export, release_images

FORMATS = ("hf", "megatron", "mds")

__all__ = ["FORMATS", "ExportResult", "export"]


@dataclass
class ExportResult:
    path: Path
    manifest: ExportManifest


def _writer(to: str):
    if to == "hf":
        from .hf import write
    elif to == "megatron":
        from .megatron import write
    elif to == "mds":
        from .mds import write
    else:
        raise ReleaseError(f"unknown export format {to!r}: choose one of {', '.join(FORMATS)}")
    return write


def export(release: str | Path, to: str, out: str | Path, *, overwrite: bool = False,
           drop_images: bool = False, epoch: int | None = None) -> ExportResult:
    """Writes the release at `release` in format `to` ("hf", "megatron" or "mds") into the
    folder `out`. The release must verify; `out` may exist only with `overwrite`, and
    only as an earlier export (or empty); a format that cannot carry the release's images
    (megatron) refuses them unless `drop_images`. A multi-epoch release exports the
    epoch `epoch` names."""
    write = _writer(to)
    release, manifest = checked_release(release, epoch)
    if manifest.audio:  # the formats carry no audio runs; an export would silently lose them
        raise ReleaseError(f"{release}: the release has audio (model.audio), which no export format carries yet; "
                           "train from the release itself (mmrecipe.torch)")
    if manifest.video:  # likewise for video runs
        raise ReleaseError(f"{release}: the release has video (model.video), which no export format carries yet; "
                           "train from the release itself (mmrecipe.torch)")
    out = Path(out)
    dest = check_destination(out, overwrite, [release], replaceable=is_export, what="an export")
    if release.resolve() in dest.parents:
        raise ReleaseError(f"-o {out} is inside the release {release}; choose a folder outside it")
    images = release_images(release, epoch or 0)
    with lock(dest), staging(dest, overwrite) as tmp:
        counts, notes = write(release, manifest, tmp, images=images, drop_images=drop_images)
        from .. import __version__

        result = ExportManifest(
            format=FORMAT, to=to, mmrecipe_version=__version__, release_id=manifest.release_id,
            release_name=manifest.name, release_version=manifest.version, sources=manifest.sources,
            seq_len=manifest.seq_len, pad_token_id=manifest.pad_token_id, rows=counts["rows"],
            segments=counts["segments"], tokens=counts["tokens"], images=images,
            drop_images=bool(drop_images and images), image_roots=dict(manifest.image_roots),
            image=manifest.image, files=hashed(tmp), notes=notes,
            epoch=epoch if manifest.epoch_count > 1 else msgspec.UNSET,
        )
        write_json(tmp / MANIFEST, result)
    return ExportResult(dest, result)
