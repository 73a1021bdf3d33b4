"""`recipe verify` on an export: do the files still hash to what export.json says, and is
nothing there that it does not list?"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..hashing import file_sha256
from ..release.verify import Problem
from .common import MANIFEST, read_export_manifest


@dataclass
class ExportReport:
    folder: Path
    to: str
    release_id: str
    files: int
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_export(folder: str | Path) -> ExportReport:
    folder = Path(folder)
    manifest = read_export_manifest(folder)
    report = ExportReport(folder, manifest.to, manifest.release_id, len(manifest.files))
    for item in manifest.files:
        path = folder / item.path
        if not path.is_file():
            report.problems.append(Problem("missing", item.path, "listed in export.json but not found"))
            continue
        actual = file_sha256(path)
        if actual != item.sha256:
            size = path.stat().st_size
            sizes = f", {size:,} bytes (export.json: {item.bytes:,})" if size != item.bytes else ""
            report.problems.append(Problem("changed", item.path, f"sha256 {actual[:12]}… (export.json: {item.sha256[:12]}…){sizes}"))
    listed = {item.path for item in manifest.files} | {MANIFEST}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if not path.is_dir() and rel not in listed:
            report.problems.append(Problem("extra", rel, "in the export but not in export.json"))
    return report
