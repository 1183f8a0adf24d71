"""Writing output files safely: a temporary file in the same folder, then an atomic rename.

A failed or interrupted write leaves no half-written file, and an existing file is only replaced when asked.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import OutputError, WriteError, excerpt


def check_writable(path: Path, overwrite: bool) -> None:
    """Fail early, before any work, if `path` exists (without overwrite) or its folder cannot take a new file."""
    try:
        exists, is_dir = path.exists(), path.is_dir()
    except OSError as e:  # a name too long for the file system, say
        raise OutputError(f"cannot write {excerpt(path)}: {e.strerror or e}") from None
    if exists and not overwrite:
        raise OutputError(
            f"{excerpt(path)} already exists", hint="pass --overwrite to replace it, or choose another name"
        )
    if is_dir:
        raise OutputError(f"{excerpt(path)} is a directory")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"cannot write {excerpt(path)}: folder {excerpt(folder)} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {excerpt(path)}: folder {excerpt(folder)} is not writable")


def replace_text(path: Path, text: str) -> None:
    """Write a small text file (a ref, a note) in one step: readers see the old text or the new, never a part. A file
    that already holds `text` is left alone."""
    with contextlib.suppress(OSError, UnicodeDecodeError):
        if path.read_text(encoding="utf-8").strip() == text.strip():
            return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_suffix(path: Path, suffix: str, what: str) -> None:
    """Refuse a name whose suffix promises another format than the one written (a PNG named .jpg, say)."""
    if path.suffix.lower() != suffix:
        raise OutputError(f"{excerpt(path)}: {what} is written as {suffix}", hint=f"give it a name ending in {suffix}")


def nearest_existing(path: Path) -> Path:
    """`path` if it exists, else the nearest of its parents that does (where missing folders would be made)."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def check_folder_writable(folder: Path) -> None:
    """Fail early if `folder` cannot take new files: it, or the nearest part of its path that exists (where the
    missing folders would be made), must be a writable folder."""
    existing = nearest_existing(folder)
    if not existing.is_dir():
        raise OutputError(f"cannot make folder {excerpt(folder)}: {excerpt(existing)} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write in {excerpt(folder)}: {excerpt(existing)} is not writable")


def _umask() -> int:
    """The process's umask, read without changing it where Linux allows (os.umask can only be read by setting it)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _temporary_beside(path: Path) -> Iterator[tuple[BinaryIO, Path]]:
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=folder)
    tmp = Path(tmp_name)
    with contextlib.suppress(OSError):  # mkstemp makes 0600 files; an output file gets the usual mode (umask)
        os.fchmod(fd, 0o666 & ~_umask())
    try:
        with os.fdopen(fd, "wb") as f:
            yield f, tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _link_new(tmp: Path, path: Path) -> None:
    """Give the finished `tmp` the name `path`, which must not exist yet."""
    try:
        os.link(tmp, path)  # fails if path exists: no race between check and write
    except FileExistsError:
        raise OutputError(f"{excerpt(path)} already exists", hint="pass --overwrite to replace it") from None
    except OSError:  # file systems without hard links
        if path.exists():
            raise OutputError(f"{excerpt(path)} already exists", hint="pass --overwrite to replace it") from None
        os.replace(tmp, path)


def atomic_write(path: Path, write: Callable[[BinaryIO], object], overwrite: bool = False) -> None:
    """Write through `write(file)` into a temporary file, then move it to `path` in one step."""
    path = Path(path)
    try:
        with _temporary_beside(path) as (f, tmp):
            write(f)
            f.flush()
            os.fsync(f.fileno())
        try:
            if overwrite:
                os.replace(tmp, path)
            else:
                _link_new(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)  # gone after a replace; the temporary name of a link
    except OSError as e:
        raise WriteError(f"cannot write {excerpt(path)}: {e.strerror or e}") from None
