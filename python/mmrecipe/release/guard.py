"""Where a release may be written, by design rather than by cases: `--overwrite` replaces
only a folder that is a release (or is empty), the destination may not be, contain or sit
below any input of the build, and one build at a time holds a folder's lock."""

from __future__ import annotations

import fcntl
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import msgspec

from ..errors import ReleaseError
from .format import FORMAT, MANIFEST

_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")
NAME_LIMIT = 100


def default_name(name: str, version: str) -> str:
    """The folder name of a release built without -o: `NAME-VERSION`, with anything that
    could leave `out/` or trouble a shell (slashes, `..`, control characters) replaced."""
    text = _UNSAFE.sub("-", f"{name}-{version}").strip(".-") or "release"
    return text[:NAME_LIMIT]


def names_format(folder: Path, manifest: str, fmt: str) -> bool:
    """Whether `folder/manifest` is JSON whose `format` is of the family of `fmt` (any
    version): a folder mmrecipe wrote."""
    try:
        head = msgspec.json.decode((folder / manifest).read_bytes(), type=_Head)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return False
    return head.format.split("/")[0] == fmt.split("/")[0]


def is_release(folder: Path) -> bool:
    """A folder mmrecipe wrote: its manifest names the release format."""
    return names_format(folder, MANIFEST, FORMAT)


class _Head(msgspec.Struct):
    format: str


def check_destination(out: Path, overwrite: bool, inputs: list[Path],
                      replaceable: Callable[[Path], bool] = is_release, what: str = "a release") -> Path:
    """The absolute destination, once it is safe to write there: not an input, holding no
    input, not below a file, and (when it exists) a folder `overwrite` may replace: one
    that `replaceable` recognizes (a release, or what `what` names), or an empty one."""
    try:
        dest = out.expanduser().resolve()
    except (OSError, RuntimeError) as e:
        raise ReleaseError(f"-o {out}: not a usable path ({e})") from None
    if not dest.name or dest == dest.parent:
        raise ReleaseError(f"-o {out}: a release needs a folder of its own, not {dest}")
    for parent in dest.parents:
        if parent.exists() and not parent.is_dir():
            raise ReleaseError(f"-o {out}: {parent} is a file, so no folder can be made below it")
    for item in inputs:
        path = item.resolve()
        if path == dest or dest in path.parents:
            what = "is" if path == dest else "contains"
            raise ReleaseError(f"-o {out} {what} an input of this build ({path}); choose a folder outside the inputs")
    if dest.exists() or dest.is_symlink():
        if not dest.is_dir() or dest.is_symlink():
            raise ReleaseError(f"-o {out}: {dest} exists and is not a folder; choose another -o")
        if not overwrite:
            raise ReleaseError(f"{out} already exists; pass --overwrite to replace it")
        if not replaceable(dest) and any(dest.iterdir()):
            mark = f"no {MANIFEST} of an mmrecipe release" if replaceable is is_release else "not written by mmrecipe"
            raise ReleaseError(
                f"{out} is not {what} ({mark}) and is not empty: "
                f"--overwrite replaces only {what}; remove the folder yourself or choose another -o"
            )
    return dest


@contextmanager
def lock(dest: Path) -> Iterator[None]:
    """Holds `.NAME.lock` beside the destination for the whole build: a second build into
    the same folder fails at once, naming the process that has it. The file is removed
    when the build ends (a lock taken on a file already unlinked is retried)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    path = dest.parent / f".{dest.name}.lock"
    fd = _acquire(path, dest)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        try:
            os.unlink(path)  # still ours: nobody can lock it until we close
        except FileNotFoundError:
            pass
        os.close(fd)


def _acquire(path: Path, dest: Path) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise ReleaseError(f"another build (pid {other}) is writing {dest}; wait for it to finish or choose another -o") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder removed it as we opened it: take the new one
