"""vqdiff's own cache of converted checkpoints, kept apart from the Hub cache the downloads land in.

An entry is a complete diffusers-format folder (configs, tokenizer, one safetensors file per weight component in the
dtype the model runs in) that `load.load_components` reads as it is, plus a manifest written last:

    <root>/hub/models--<owner>--<name>/refs/<revision>          the commit a branch or tag pointed at, last seen
    <root>/hub/models--<owner>--<name>/<commit>/<variant>-<dtype>/  an entry: keyed by repo, commit, variant, dtype
    <root>/.locks/...                                            one file lock per entry

An entry is built under its lock in a temporary folder beside it and moved into place in one rename, so a reader sees
either no entry or a complete one, and two processes never build the same entry twice. Before use an entry is checked:
its manifest parses, every file it lists has the recorded size, and every safetensors header describes exactly the
bytes of its file. An entry that fails is rebuilt, never loaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from ..errors import UsageError, WeightsError
from ..files import nearest_existing, replace_text
from ..version import __version__
from .hub import repo_folder_name

MANIFEST = "vqdiff-manifest.json"
FORMAT = 1  # bump when the entry layout changes: older entries are then rebuilt
_LOCK_NOTICE_S = 0.5  # wait this long for a lock silently before saying that another process holds it


def default_cache_dir() -> Path:
    """VQDIFF_CACHE_DIR, else the platform's user cache folder for vqdiff (~/.cache/vqdiff on Linux)."""
    env = os.environ.get("VQDIFF_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("vqdiff", appauthor=False))


def check_cache_root(root: Path, what: str, hint: str) -> None:
    """A cache folder, or the first of its parents that exists, must be a folder: say so once, before any use."""
    try:
        folder = nearest_existing(root)
    except OSError:
        return  # unreadable: the first real use reports it
    if not folder.is_dir():
        where = root if folder == root else f"{root} (its parent {folder})"
        raise UsageError(f"{what} {where} is a file, not a folder", hint=hint)


def _repo_id(folder_name: str) -> str:
    return folder_name.removeprefix("models--").replace("--", "/", 1)


@dataclass(frozen=True)
class EntryKey:
    repo_id: str
    commit: str
    variant: str  # as requested: auto, fp16 or fp32
    dtype: str  # float32, float16 or bfloat16

    @property
    def name(self) -> str:
        return f"{self.variant}-{self.dtype}"


@dataclass(frozen=True)
class Entry:
    """A checked entry: its folder and what its manifest says."""

    key: EntryKey
    path: Path
    manifest: dict[str, Any]

    @property
    def size(self) -> int:
        return sum(int(v) for v in self.manifest.get("files", {}).values())

    @property
    def variants(self) -> dict[str, str]:
        return dict(self.manifest.get("variants", {}))


class ModelCache:
    """The cache under one root folder. Every method touches only that folder."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        check_cache_root(
            self.root, "vqdiff's cache folder", "point --cache-dir (or VQDIFF_CACHE_DIR) at a folder, or leave it out"
        )

    # -- layout -----------------------------------------------------------------------------------------------

    def repo_dir(self, repo_id: str) -> Path:
        return self.root / "hub" / repo_folder_name(repo_id)

    def entry_dir(self, key: EntryKey) -> Path:
        return self.repo_dir(key.repo_id) / key.commit / key.name

    def _lock_path(self, key: EntryKey) -> Path:
        return self.root / ".locks" / f"{repo_folder_name(key.repo_id)}--{key.commit}--{key.name}.lock"

    # -- refs -------------------------------------------------------------------------------------------------

    def write_ref(self, repo_id: str, revision: str, commit: str) -> None:
        if revision == commit:
            return
        path = self.repo_dir(repo_id) / "refs" / quote(revision, safe="")
        replace_text(path, commit)

    def read_ref(self, repo_id: str, revision: str) -> str | None:
        path = self.repo_dir(repo_id) / "refs" / quote(revision, safe="")
        try:
            return path.read_text(encoding="utf-8").strip() or None
        except OSError:
            return None

    def refs(self, repo_id: str) -> dict[str, str]:
        """revision name -> commit, for every ref recorded for a repo."""
        folder = self.repo_dir(repo_id) / "refs"
        out = {}
        for f in sorted(folder.iterdir()) if folder.is_dir() else []:
            if not f.name.startswith("."):
                out[unquote(f.name)] = f.read_text(encoding="utf-8").strip()
        return out

    # -- reading entries --------------------------------------------------------------------------------------

    def check(self, key: EntryKey) -> Entry:
        """The entry for `key` after the integrity checks; WeightsError saying what is wrong otherwise."""
        from .convert import safetensors_header

        folder = self.entry_dir(key)
        manifest_path = folder / MANIFEST
        if not manifest_path.is_file():
            raise WeightsError(f"{folder} has no manifest")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            files = {str(k): int(v) for k, v in manifest["files"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise WeightsError(f"{manifest_path} is unreadable") from None
        if manifest.get("format") != FORMAT:
            raise WeightsError(f"{folder} was written in another cache format ({manifest.get('format')})")
        for rel, size in files.items():
            path = folder / rel
            try:
                actual = path.stat().st_size
            except OSError:
                raise WeightsError(f"{path} is missing") from None
            if actual != size:
                raise WeightsError(f"{path} has {actual} bytes, the manifest says {size}")
            if path.suffix == ".safetensors":
                safetensors_header(path)
        return Entry(key, folder, manifest)

    def find(self, key: EntryKey) -> Entry | None:
        """The entry for `key` if it exists and passes the checks."""
        if not (self.entry_dir(key) / MANIFEST).is_file():
            return None
        try:
            return self.check(key)
        except WeightsError:
            return None

    def entries(self, repo_id: str | None = None) -> list[Entry]:
        """Every complete, valid entry (of one repo, or of all), newest first."""
        base = self.root / "hub"
        repos = [self.repo_dir(repo_id)] if repo_id else sorted(base.iterdir()) if base.is_dir() else []
        found = []
        for repo in repos:
            if not repo.is_dir() or not repo.name.startswith("models--"):
                continue
            for commit in sorted(repo.iterdir()):
                if commit.name == "refs" or not commit.is_dir():
                    continue
                for folder in sorted(commit.iterdir()):
                    variant, _, dtype = folder.name.partition("-")
                    if folder.name.startswith(".") or not dtype:
                        continue
                    entry = self.find(EntryKey(_repo_id(repo.name), commit.name, variant, dtype))
                    if entry is not None:
                        found.append(entry)
        return sorted(found, key=lambda e: str(e.manifest.get("created", "")), reverse=True)

    # -- writing entries --------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self, key: EntryKey, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
        """Hold the entry's file lock (between processes; the lock file itself stays, as is usual for locks)."""
        from filelock import FileLock, Timeout

        path = self._lock_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path))
        try:
            lock.acquire(timeout=_LOCK_NOTICE_S)
        except Timeout:
            if on_wait is not None:
                on_wait()
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def build(
        self,
        key: EntryKey,
        write: Callable[[Path], dict[str, Any]],
        on_wait: Callable[[], None] | None = None,
    ) -> Entry:
        """The entry for `key`: the existing one when valid, else one written by `write(folder)` under the lock.

        `write` fills a new folder and returns what the manifest should record besides the file sizes. A damaged
        entry is moved aside and replaced in one rename; leftovers of builds that were killed are removed.
        """
        with self.locked(key, on_wait):
            existing = self.find(key)  # another process may have built it while we waited
            if existing is not None:
                return existing
            final = self.entry_dir(key)
            final.parent.mkdir(parents=True, exist_ok=True)
            for stale in final.parent.glob(f".{key.name}.*"):  # only the lock holder writes these
                shutil.rmtree(stale, ignore_errors=True)
            tmp = final.parent / f".{key.name}.{uuid.uuid4().hex[:8]}.tmp"
            try:
                info = write(tmp)
                files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
                for rel in files:
                    _fsync(tmp / rel)
                manifest = {
                    "format": FORMAT,
                    "vqdiff": __version__,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "repo": key.repo_id,
                    "commit": key.commit,
                    "variant": key.variant,
                    "dtype": key.dtype,
                    **info,
                    "files": files,
                }
                manifest_tmp = tmp / f".{MANIFEST}.tmp"
                manifest_tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
                _fsync(manifest_tmp)
                os.replace(manifest_tmp, tmp / MANIFEST)  # written last: an entry without it is incomplete
                _fsync_dir(tmp)
                if final.exists():
                    trash = final.parent / f".{key.name}.{uuid.uuid4().hex[:8]}.old"
                    os.rename(final, trash)
                    shutil.rmtree(trash, ignore_errors=True)
                os.rename(tmp, final)
                _fsync_dir(final.parent)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return self.check(key)

    def remove(self, entry: Entry) -> None:
        """Delete an entry under its lock, then the commit and repo folders it leaves empty (and their refs)."""
        with self.locked(entry.key):
            trash = entry.path.parent / f".{entry.key.name}.{uuid.uuid4().hex[:8]}.old"
            with contextlib.suppress(FileNotFoundError):
                os.rename(entry.path, trash)
            shutil.rmtree(trash, ignore_errors=True)
        commit_dir = entry.path.parent
        try:
            commit_dir.rmdir()  # only when empty: another process may be building a sibling entry in it
        except OSError:
            return
        repo = commit_dir.parent
        for name, commit in self.refs(entry.key.repo_id).items():
            if commit == entry.key.commit:
                (repo / "refs" / quote(name, safe="")).unlink(missing_ok=True)
        if not any(p.is_dir() and p.name != "refs" for p in repo.iterdir()):
            shutil.rmtree(repo, ignore_errors=True)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # not possible on every platform; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
